// CPU kernels of pyeff.ops.masked_conv2d: a direct convolution that visits, per sample, only the
// active output channels and, inside them, only the active input channels.
//
// Why a direct kernel and not oneDNN: with per-sample random masks no two samples share a channel
// subset, so oneDNN would need one small call per sample (or a dense call and a mask, which saves
// nothing). The direct kernel's unit of work is one (sample, output channel) plane, so its cost is
// proportional to the number of active (sample, out, in) triples.
//
// float32, stride 1, groups 1, x86 with AVX-512: output pixels are vectorised 16 at a time along
// the flattened output plane (rows are merged when the output is as wide as the input), each
// kernel tap is a zero-masked unaligned load (the masks implement the padding, so there is no
// padded copy of the input), and a register tile of KT output channels x R pixel vectors
// (up to 4 x 6 accumulators) shares every load across KT channels. Everything else (float64,
// float16/bfloat16 via float32, strides, groups, CPUs without AVX-512) takes a portable loop nest
// with the same work-skipping, vectorised by the compiler.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <array>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PYEFF_X86 1
#include <immintrin.h>
#endif

namespace pyeff {
namespace {

struct Geom {
  int64_t N, C, K, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, groups;
  int64_t taps() const { return KH * KW; }
};

Geom make_geom(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  Geom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = w.size(0);
  g.KH = w.size(2);
  g.KW = w.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  g.OH = conv_out_size(g.H, g.KH, g.sh, g.ph, g.dh);
  g.OW = conv_out_size(g.W, g.KW, g.sw, g.pw, g.dw);
  return g;
}

void check_args(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& in_mask,
                const at::Tensor& out_mask, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, op, ": x and weight must be 4-D");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && w.size(0) % groups == 0 &&
                  w.size(1) * groups == x.size(1),
              op, ": channels do not match groups");
  TORCH_CHECK(in_mask.scalar_type() == at::kBool && out_mask.scalar_type() == at::kBool, op,
              ": masks must be bool");
  TORCH_CHECK(in_mask.dim() == 2 && in_mask.size(0) == x.size(0) && in_mask.size(1) == x.size(1),
              op, ": in_mask must be [N, C]");
  TORCH_CHECK(out_mask.dim() == 2 && out_mask.size(0) == x.size(0) && out_mask.size(1) == w.size(0),
              op, ": out_mask must be [N, K]");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation need two values");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              op, ": stride and dilation must be >= 1 and padding >= 0");
}

// indices of the true entries of each row of a [N, L] bool mask, as CSR (offsets [N + 1])
void mask_lists(const at::Tensor& mask, std::vector<int32_t>& idx, std::vector<int64_t>& off) {
  const int64_t N = mask.size(0), L = mask.size(1);
  const bool* m = mask.data_ptr<bool>();
  off.assign(N + 1, 0);
  idx.clear();
  idx.reserve(N * L);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < L; ++l)
      if (m[n * L + l]) idx.push_back(static_cast<int32_t>(l));
    off[n + 1] = static_cast<int64_t>(idx.size());
  }
}

// ---------------------------------------------------------------------------------------------
// portable direct convolution (any dtype, stride, dilation, groups)

template <typename T, typename acc_t>
void plane_generic(const Geom& g, const T* xs, const T* wk, const int32_t* cidx, int64_t nc,
                   acc_t bias, acc_t* acc, T* out) {
  const int64_t OHW = g.OH * g.OW;
  for (int64_t q = 0; q < OHW; ++q) acc[q] = bias;
  const int64_t taps = g.taps();
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t c = cidx[i];  // local to the group
    const T* xc = xs + c * g.H * g.W;
    for (int64_t a = 0; a < g.KH; ++a) {
      for (int64_t b = 0; b < g.KW; ++b) {
        const acc_t wv = static_cast<acc_t>(wk[c * taps + a * g.KW + b]);
        // valid output columns: 0 <= ow * sw - pw + b * dw < W
        const int64_t off_w = b * g.dw - g.pw;
        int64_t ow0 = off_w >= 0 ? 0 : (-off_w + g.sw - 1) / g.sw;
        int64_t ow1 = (g.W - 1 - off_w) < 0 ? 0 : std::min<int64_t>(g.OW, (g.W - 1 - off_w) / g.sw + 1);
        if (ow0 >= ow1) continue;
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const int64_t ih = oh * g.sh - g.ph + a * g.dh;
          if (ih < 0 || ih >= g.H) continue;
          const T* xr = xc + ih * g.W + off_w;
          acc_t* ar = acc + oh * g.OW;
          if (g.sw == 1) {
            for (int64_t ow = ow0; ow < ow1; ++ow) ar[ow] += wv * static_cast<acc_t>(xr[ow]);
          } else {
            for (int64_t ow = ow0; ow < ow1; ++ow) ar[ow] += wv * static_cast<acc_t>(xr[ow * g.sw]);
          }
        }
      }
    }
  }
  for (int64_t q = 0; q < OHW; ++q) out[q] = static_cast<T>(acc[q]);
}

template <typename T>
void forward_generic(const Geom& g, const T* x, const T* w, const T* bias,
                     const std::vector<int32_t>& cidx, const std::vector<int64_t>& coff,
                     const std::vector<int32_t>& kidx, const std::vector<int64_t>& koff, T* y) {
  using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;
  const int64_t OHW = g.OH * g.OW, Cg = g.C / g.groups, Kg = g.K / g.groups;
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> acc(OHW);
    std::vector<int32_t> local;
    for (int64_t n = n0; n < n1; ++n) {
      T* yn = y + n * g.K * OHW;
      std::fill(yn, yn + g.K * OHW, T(0));
      int64_t last_group = -1;
      for (int64_t j = koff[n]; j < koff[n + 1]; ++j) {
        const int64_t k = kidx[j], grp = k / Kg;
        if (grp != last_group) {  // active input channels of this group, local indices
          local.clear();
          for (int64_t i = coff[n]; i < coff[n + 1]; ++i)
            if (cidx[i] / Cg == grp) local.push_back(cidx[i] - grp * Cg);
          last_group = grp;
        }
        const T* xs = x + (n * g.C + grp * Cg) * g.H * g.W;
        plane_generic<T, acc_t>(g, xs, w + k * Cg * g.taps(), local.data(), local.size(),
                                bias ? static_cast<acc_t>(bias[k]) : acc_t(0), acc.data(), yn + k * OHW);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// AVX-512 direct convolution (float32, stride 1, groups 1)

#ifdef PYEFF_X86
// Register tiles: KT output channels x R pixel vectors, KT * R + R + 1 <= 32 zmm registers. Full
// tiles are 4 x 6 (24 FMAs per 6 loads + 4 broadcasts; 6 x 4, 8 x 3 and 5 x 5 measured no better);
// a sample's active channels are split into tiles as evenly as possible (7 -> 4 + 3, 5 -> 3 + 2)
// and narrower tiles take more pixel vectors, so few FMAs wait on loads.
constexpr int kMaxKT = 4;
constexpr int kMaxR = 10;                                  // the widest tile (KT = 1, 2)
constexpr int kRFor[kMaxKT + 1] = {0, 10, 10, 7, 6};        // pixel vectors per tile, by KT
constexpr int kBlockVec = 60;                              // pixel vectors per L1 block

// The active input channels of one sample are copied into a zero-padded buffer whose rows have
// stride Wp = W + gap, the `gap` zero columns being shared by the right edge of one row and the
// left edge of the next. Output pixel (oh, ow) then sits at flat position o = oh * Wp + ow and reads
// tap (a, b) at buffer position o + a * dh * Wp + b * dw: every tap is one unaligned load at a
// constant offset, no masks and no per-pixel index arithmetic. The columns ow >= OW of the flat
// range are computed and dropped (gap / Wp of the work: 1/33 at 32 px, 1/9 at 8 px).
struct PadPlan {
  int64_t Wp, lead, len, nflat, nvec;  // lead: buffer offset of input pixel (0, 0)
  std::vector<int64_t> tap_off;        // [taps]
  std::vector<uint16_t> keep;          // [nvec] lanes that are real output pixels
  std::vector<int64_t> first;          // [nvec] output index of the first kept lane
};

PadPlan make_plan(const Geom& g) {
  PadPlan p;
  const int64_t gap = std::max<int64_t>(g.pw, std::max<int64_t>(0, g.OW - g.W));
  p.Wp = g.W + gap;
  p.lead = g.ph * p.Wp + g.pw;
  for (int64_t a = 0; a < g.KH; ++a)
    for (int64_t b = 0; b < g.KW; ++b) p.tap_off.push_back(a * g.dh * p.Wp + b * g.dw);
  p.nflat = (g.OH - 1) * p.Wp + g.OW;
  p.nvec = (p.nflat + 15) / 16;
  const int64_t reach = p.nvec * 16 + p.tap_off.back();
  p.len = (std::max(reach, p.lead + g.H * p.Wp) + 15) / 16 * 16 + 16;
  for (int64_t v = 0; v < p.nvec; ++v) {
    uint16_t keep = 0;
    int64_t first = -1;
    for (int i = 0; i < 16; ++i) {
      const int64_t o = v * 16 + i, oh = o / p.Wp, ow = o % p.Wp;
      if (o < p.nflat && ow < g.OW) {
        keep |= uint16_t(1u << i);
        if (first < 0) first = oh * g.OW + ow;
      }
    }
    p.keep.push_back(keep);
    p.first.push_back(first);
  }
  return p;
}

template <int KT, int R>
__attribute__((target("avx512f"))) void tile_avx512(const float* buf, int64_t bstride,
                                                    const float* const* wk, const int64_t* woff,
                                                    int64_t nc, const int64_t* tap_off, int64_t taps,
                                                    const float* bias, float* const* yk,
                                                    const uint16_t* keep, const int64_t* first) {
  // buf points at flat output position v0 * 16 of channel 0; keep/first at vector v0
  __m512 acc[KT][R];
  for (int j = 0; j < KT; ++j) {
    const __m512 b0 = _mm512_set1_ps(bias[j]);
    for (int r = 0; r < R; ++r) acc[j][r] = b0;
  }
  for (int64_t i = 0; i < nc; ++i) {
    const float* xc = buf + i * bstride;
    const int64_t wo = woff[i];
    for (int64_t t = 0; t < taps; ++t) {
      const float* xp = xc + tap_off[t];
      __m512 v[R];
      for (int r = 0; r < R; ++r) v[r] = _mm512_loadu_ps(xp + 16 * r);
      for (int j = 0; j < KT; ++j) {
        const __m512 b = _mm512_set1_ps(wk[j][wo + t]);
        for (int r = 0; r < R; ++r) acc[j][r] = _mm512_fmadd_ps(v[r], b, acc[j][r]);
      }
    }
  }
  // drop the lanes that fall on the gap columns: the kept lanes are consecutive in the output
  for (int r = 0; r < R; ++r) {
    const uint16_t k = keep[r];
    if (k == 0xFFFF) {
      for (int j = 0; j < KT; ++j) _mm512_storeu_ps(yk[j] + first[r], acc[j][r]);
    } else if (k) {
      const __mmask16 out = static_cast<__mmask16>((1u << __builtin_popcount(k)) - 1u);
      for (int j = 0; j < KT; ++j) _mm512_mask_storeu_ps(yk[j] + first[r], out, _mm512_maskz_compress_ps(k, acc[j][r]));
    }
  }
}

using TileFn = void (*)(const float*, int64_t, const float* const*, const int64_t*, int64_t,
                        const int64_t*, int64_t, const float*, float* const*, const uint16_t*,
                        const int64_t*);

template <int KT, int R>
constexpr TileFn tile_or_null() {
  if constexpr (R <= kRFor[KT]) return &tile_avx512<KT, R>;
  return nullptr;
}

template <int KT, int... Rs>
constexpr std::array<TileFn, sizeof...(Rs)> tiles_for(std::integer_sequence<int, Rs...>) {
  return {tile_or_null<KT, Rs + 1>()...};
}

template <int... KTs>
constexpr std::array<std::array<TileFn, kMaxR>, sizeof...(KTs)> tile_table(std::integer_sequence<int, KTs...>) {
  return {tiles_for<KTs + 1>(std::make_integer_sequence<int, kMaxR>{})...};
}

TileFn pick_tile(int kt, int r) {
  static constexpr auto table = tile_table(std::make_integer_sequence<int, kMaxKT>{});
  return table[kt - 1][r - 1];
}

// rows of `width` floats from stride `src_stride` to stride `dst_stride` (short rows: no memcpy call
// per row, which costs as much as the copy at 8-16 px)
__attribute__((target("avx512f"))) void copy_rows(float* dst, int64_t dst_stride, const float* src,
                                                  int64_t src_stride, int64_t rows, int64_t width) {
  for (int64_t h = 0; h < rows; ++h) {
    const float* s = src + h * src_stride;
    float* d = dst + h * dst_stride;
    int64_t w = 0;
    for (; w + 16 <= width; w += 16) _mm512_storeu_ps(d + w, _mm512_loadu_ps(s + w));
    if (w < width) {
      const __mmask16 m = static_cast<__mmask16>((1u << (width - w)) - 1u);
      _mm512_mask_storeu_ps(d + w, m, _mm512_maskz_loadu_ps(m, s + w));
    }
  }
}

bool has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

void forward_avx512(const Geom& g, const float* x, const float* w, const float* bias,
                    const std::vector<int32_t>& cidx, const std::vector<int64_t>& coff,
                    const std::vector<int32_t>& kidx, const std::vector<int64_t>& koff, float* y) {
  const PadPlan p = make_plan(g);
  const int64_t taps = g.taps(), plane = g.H * g.W, oplane = g.OH * g.OW;
  at::parallel_for(0, g.N, 1, [&](int64_t n0, int64_t n1) {
    std::vector<float> buf;  // the sample's active input channels, padded (borders stay zero)
    std::vector<int64_t> woff(g.C);
    for (int64_t n = n0; n < n1; ++n) {
      float* yn = y + n * g.K * oplane;
      const int64_t nk = koff[n + 1] - koff[n];
      {  // exact zeros for the inactive planes (all of them when nothing is active)
        int64_t j = koff[n];
        for (int64_t k = 0; k < g.K; ++k) {
          if (j < koff[n + 1] && kidx[j] == k) {
            ++j;
            continue;
          }
          std::memset(yn + k * oplane, 0, sizeof(float) * oplane);
        }
      }
      if (nk == 0) continue;
      const int32_t* ks = kidx.data() + koff[n];
      const int32_t* cs = cidx.data() + coff[n];
      const int64_t nc = coff[n + 1] - coff[n];
      if (static_cast<int64_t>(buf.size()) < std::max<int64_t>(nc, 1) * p.len)
        buf.assign(std::max<int64_t>(nc, 1) * p.len, 0.f);
      for (int64_t i = 0; i < nc; ++i) {
        const float* src = x + (n * g.C + cs[i]) * plane;
        float* dst = buf.data() + i * p.len + p.lead;
        copy_rows(dst, p.Wp, src, g.W, g.H, g.W);
        woff[i] = cs[i] * taps;
      }
      // split the active channels into ceil(nk / 4) tiles as evenly as possible
      const int64_t ntiles = (nk + kMaxKT - 1) / kMaxKT;
      // pixel blocks outside, channel tiles inside: a block's input rows stay in L1/L2
      for (int64_t b0 = 0; b0 < p.nvec; b0 += kBlockVec) {
        const int64_t b1 = std::min<int64_t>(p.nvec, b0 + kBlockVec);
        int64_t j0 = 0;
        for (int64_t tile = 0; tile < ntiles; ++tile) {
          const int kt = static_cast<int>((nk - j0) / (ntiles - tile) + ((nk - j0) % (ntiles - tile) ? 1 : 0));
          const float* wk[kMaxKT];
          float bk[kMaxKT];
          float* yk[kMaxKT];
          for (int j = 0; j < kt; ++j) {
            wk[j] = w + static_cast<int64_t>(ks[j0 + j]) * g.C * taps;
            bk[j] = bias ? bias[ks[j0 + j]] : 0.f;
            yk[j] = yn + static_cast<int64_t>(ks[j0 + j]) * oplane;
          }
          for (int64_t v0 = b0; v0 < b1; v0 += kRFor[kt]) {
            const int r = static_cast<int>(std::min<int64_t>(kRFor[kt], b1 - v0));
            pick_tile(kt, r)(buf.data() + v0 * 16, p.len, wk, woff.data(), nc, p.tap_off.data(), taps, bk,
                             yk, p.keep.data() + v0, p.first.data() + v0);
          }
          j0 += kt;
        }
      }
    }
  });
}

// Weight gradient, float32, stride 1, groups 1: the same padded buffers (grad_out is laid out with
// the same row stride Wp, its extra columns zero). For a tile of KT active output channels and one
// active input channel, KT x taps vector accumulators run over the flat output positions:
// acc[j][t] += g[k_j][o] * x[c][o + tap_off[t]]; the vectors are added into per-thread vector sums
// (reduced to scalars once at the end), so the horizontal reductions do not scale with the batch.
constexpr int kWgKT = 3;    // output channels per tile
constexpr int kWgTaps = 9;  // taps per register tile (3x3 in one pass)

template <int KT, int NT>
__attribute__((target("avx512f"))) void wgrad_tile_avx512(const float* const* g, const float* xc,
                                                          const int64_t* tap_off, int64_t nvec,
                                                          float* const* vsum) {
  __m512 acc[KT][NT];
  for (int j = 0; j < KT; ++j)
    for (int t = 0; t < NT; ++t) acc[j][t] = _mm512_setzero_ps();
  for (int64_t v = 0; v < nvec; ++v) {
    __m512 gv[KT];
    for (int j = 0; j < KT; ++j) gv[j] = _mm512_loadu_ps(g[j] + 16 * v);
    for (int t = 0; t < NT; ++t) {
      __m512 xv = _mm512_loadu_ps(xc + 16 * v + tap_off[t]);
      __asm__("" : "+v"(xv));  // one load per tap, not one folded into each of the KT FMAs
      for (int j = 0; j < KT; ++j) acc[j][t] = _mm512_fmadd_ps(gv[j], xv, acc[j][t]);
    }
  }
  for (int j = 0; j < KT; ++j)
    for (int t = 0; t < NT; ++t)
      _mm512_storeu_ps(vsum[j] + 16 * t, _mm512_add_ps(_mm512_loadu_ps(vsum[j] + 16 * t), acc[j][t]));
}

using WgTileFn = void (*)(const float* const*, const float*, const int64_t*, int64_t, float* const*);

template <int KT, int... Ts>
constexpr std::array<WgTileFn, sizeof...(Ts)> wg_tiles_for(std::integer_sequence<int, Ts...>) {
  return {&wgrad_tile_avx512<KT, Ts + 1>...};
}

WgTileFn pick_wg_tile(int kt, int nt) {
  static const std::array<std::array<WgTileFn, kWgTaps>, kWgKT> table = {
      wg_tiles_for<1>(std::make_integer_sequence<int, kWgTaps>{}),
      wg_tiles_for<2>(std::make_integer_sequence<int, kWgTaps>{}),
      wg_tiles_for<3>(std::make_integer_sequence<int, kWgTaps>{})};
  return table[kt - 1][nt - 1];
}

__attribute__((target("avx512f"))) float hsum16(const float* v) {
  return _mm512_reduce_add_ps(_mm512_loadu_ps(v));
}

void weight_grad_avx512(const Geom& g, const float* go, const float* x, const std::vector<int32_t>& cidx,
                        const std::vector<int64_t>& coff, const at::Tensor& out_mask, float* gw) {
  const PadPlan p = make_plan(g);
  const int64_t taps = g.taps(), plane = g.H * g.W, oplane = g.OH * g.OW;
  const bool* om = out_mask.data_ptr<bool>();
  const int64_t glen = p.nvec * 16;
  // threads own disjoint ranges of output channels: no reduction across threads
  at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
    const int64_t nk = k1 - k0;
    std::vector<float> vsum(nk * g.C * taps * 16, 0.f);  // [k][c][tap][16]
    std::vector<float> xbuf, gbuf(std::max<int64_t>(nk, 1) * glen, 0.f);
    std::vector<int64_t> act;
    for (int64_t n = 0; n < g.N; ++n) {
      act.clear();
      for (int64_t k = k0; k < k1; ++k)
        if (om[n * g.K + k]) act.push_back(k);
      const int64_t nc = coff[n + 1] - coff[n];
      if (act.empty() || nc == 0) continue;
      const int32_t* cs = cidx.data() + coff[n];
      if (static_cast<int64_t>(xbuf.size()) < nc * p.len) xbuf.assign(nc * p.len, 0.f);
      for (int64_t i = 0; i < nc; ++i) {
        const float* src = x + (n * g.C + cs[i]) * plane;
        float* dst = xbuf.data() + i * p.len + p.lead;
        copy_rows(dst, p.Wp, src, g.W, g.H, g.W);
      }
      for (size_t j = 0; j < act.size(); ++j) {  // grad_out rows at stride Wp; the gaps stay zero
        const float* src = go + (n * g.K + act[j]) * oplane;
        float* dst = gbuf.data() + j * glen;
        copy_rows(dst, p.Wp, src, g.OW, g.OH, g.OW);
      }
      for (size_t j0 = 0; j0 < act.size(); j0 += kWgKT) {
        const int kt = static_cast<int>(std::min<size_t>(kWgKT, act.size() - j0));
        const float* gp[kWgKT];
        for (int j = 0; j < kt; ++j) gp[j] = gbuf.data() + (j0 + j) * glen;
        for (int64_t i = 0; i < nc; ++i) {
          for (int64_t t0 = 0; t0 < taps; t0 += kWgTaps) {
            const int nt = static_cast<int>(std::min<int64_t>(kWgTaps, taps - t0));
            float* vs[kWgKT];
            for (int j = 0; j < kt; ++j)
              vs[j] = vsum.data() + (((act[j0 + j] - k0) * g.C + cs[i]) * taps + t0) * 16;
            pick_wg_tile(kt, nt)(gp, xbuf.data() + i * p.len, p.tap_off.data() + t0, p.nvec, vs);
          }
        }
      }
    }
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t ct = 0; ct < g.C * taps; ++ct)
        gw[k * g.C * taps + ct] = hsum16(vsum.data() + ((k - k0) * g.C * taps + ct) * 16);
  });
}
#endif

at::Tensor masked_conv2d_fwd_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                                 const std::optional<at::Tensor>& bias_in, const at::Tensor& in_mask_in,
                                 const at::Tensor& out_mask_in, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "pyeff::masked_conv2d_fwd (CPU kernel)";
  check_args(op, x_in, w_in, in_mask_in, out_mask_in, stride, padding, dilation, groups);
  TORCH_CHECK(x_in.device().is_cpu(), op, ": x must be on the CPU");
  const auto dtype = x_in.scalar_type();
  const auto compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = x_in.to(compute).contiguous();
  at::Tensor w = w_in.to(compute).contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(compute).contiguous();
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(0)), op, ": bias must be [K]");
  at::Tensor in_mask = in_mask_in.contiguous(), out_mask = out_mask_in.contiguous();
  const Geom g = make_geom(x, w, stride, padding, dilation, groups);
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": the output would be empty");
  std::vector<int32_t> cidx, kidx;
  std::vector<int64_t> coff, koff;
  mask_lists(in_mask, cidx, coff);
  mask_lists(out_mask, kidx, koff);
  at::Tensor y = at::empty({g.N, g.K, g.OH, g.OW}, x.options());
  if (g.N == 0) return y.to(dtype);
  if (compute == at::kDouble) {
    forward_generic<double>(g, x.data_ptr<double>(), w.data_ptr<double>(),
                            bias.defined() ? bias.data_ptr<double>() : nullptr, cidx, coff, kidx, koff,
                            y.data_ptr<double>());
    return y;
  }
#ifdef PYEFF_X86
  if (has_avx512() && g.sh == 1 && g.sw == 1 && g.groups == 1) {
    forward_avx512(g, x.data_ptr<float>(), w.data_ptr<float>(),
                   bias.defined() ? bias.data_ptr<float>() : nullptr, cidx, coff, kidx, koff,
                   y.data_ptr<float>());
    return y.to(dtype);
  }
#endif
  forward_generic<float>(g, x.data_ptr<float>(), w.data_ptr<float>(),
                         bias.defined() ? bias.data_ptr<float>() : nullptr, cidx, coff, kidx, koff,
                         y.data_ptr<float>());
  return y.to(dtype);
}

// ---------------------------------------------------------------------------------------------
// weight gradient: per (output channel, sample with it active, active input channel of its
// group, tap) one dot product over the output plane

template <typename T>
void weight_grad_generic(const Geom& g, const T* go, const T* x, const std::vector<int32_t>& cidx,
                         const std::vector<int64_t>& coff, const at::Tensor& out_mask, T* gw) {
  using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;
  const int64_t OHW = g.OH * g.OW, Cg = g.C / g.groups, Kg = g.K / g.groups, taps = g.taps();
  const bool* om = out_mask.data_ptr<bool>();
  at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> acc(Cg * taps);
    for (int64_t k = k0; k < k1; ++k) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const int64_t grp = k / Kg;
      for (int64_t n = 0; n < g.N; ++n) {
        if (!om[n * g.K + k]) continue;
        const T* gr = go + (n * g.K + k) * OHW;
        for (int64_t i = coff[n]; i < coff[n + 1]; ++i) {
          const int64_t c = cidx[i];
          if (c / Cg != grp) continue;
          const T* xc = x + (n * g.C + c) * g.H * g.W;
          for (int64_t a = 0; a < g.KH; ++a)
            for (int64_t b = 0; b < g.KW; ++b) {
              const int64_t off_w = b * g.dw - g.pw;
              const int64_t ow0 = off_w >= 0 ? 0 : (-off_w + g.sw - 1) / g.sw;
              const int64_t ow1 =
                  (g.W - 1 - off_w) < 0 ? 0 : std::min<int64_t>(g.OW, (g.W - 1 - off_w) / g.sw + 1);
              acc_t s = 0;
              for (int64_t oh = 0; oh < g.OH; ++oh) {
                const int64_t ih = oh * g.sh - g.ph + a * g.dh;
                if (ih < 0 || ih >= g.H) continue;
                const T* xr = xc + ih * g.W + off_w;
                const T* gq = gr + oh * g.OW;
                acc_t part = 0;
                if (g.sw == 1) {
                  for (int64_t ow = ow0; ow < ow1; ++ow)
                    part += static_cast<acc_t>(gq[ow]) * static_cast<acc_t>(xr[ow]);
                } else {
                  for (int64_t ow = ow0; ow < ow1; ++ow)
                    part += static_cast<acc_t>(gq[ow]) * static_cast<acc_t>(xr[ow * g.sw]);
                }
                s += part;
              }
              acc[(c - grp * Cg) * taps + a * g.KW + b] += s;
            }
        }
      }
      for (int64_t i = 0; i < Cg * taps; ++i) gw[k * Cg * taps + i] = static_cast<T>(acc[i]);
    }
  });
}

at::Tensor masked_conv2d_weight_grad_cpu(const at::Tensor& go_in, const at::Tensor& x_in,
                                         const at::Tensor& in_mask_in, const at::Tensor& out_mask_in,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t groups) {
  const char* op = "pyeff::masked_conv2d_weight_grad (CPU kernel)";
  TORCH_CHECK(kernel_size.size() == 2, op, ": kernel_size needs two values");
  TORCH_CHECK(go_in.dim() == 4, op, ": grad_out must be 4-D");
  const auto dtype = x_in.scalar_type();
  const auto compute = dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = x_in.to(compute).contiguous();
  at::Tensor go = go_in.to(compute).contiguous();
  const int64_t K = go.size(1);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, op, ": channels do not match groups");
  at::Tensor wshape = at::empty({K, x.size(1) / groups, kernel_size[0], kernel_size[1]}, x.options());
  check_args(op, x, wshape, in_mask_in, out_mask_in, stride, padding, dilation, groups);
  const Geom g = make_geom(x, wshape, stride, padding, dilation, groups);
  TORCH_CHECK(go.size(0) == g.N && go.size(2) == g.OH && go.size(3) == g.OW, op,
              ": grad_out has the wrong shape");
  at::Tensor in_mask = in_mask_in.contiguous(), out_mask = out_mask_in.contiguous();
  std::vector<int32_t> cidx;
  std::vector<int64_t> coff;
  mask_lists(in_mask, cidx, coff);
  at::Tensor gw = at::empty_like(wshape);
#ifdef PYEFF_X86
  if (compute == at::kFloat && has_avx512() && g.sh == 1 && g.sw == 1 && g.groups == 1) {
    weight_grad_avx512(g, go.data_ptr<float>(), x.data_ptr<float>(), cidx, coff, out_mask, gw.data_ptr<float>());
    return gw.to(dtype);
  }
#endif
  if (compute == at::kDouble)
    weight_grad_generic<double>(g, go.data_ptr<double>(), x.data_ptr<double>(), cidx, coff, out_mask,
                                gw.data_ptr<double>());
  else
    weight_grad_generic<float>(g, go.data_ptr<float>(), x.data_ptr<float>(), cidx, coff, out_mask,
                               gw.data_ptr<float>());
  return gw.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("masked_conv2d_fwd", &masked_conv2d_fwd_cpu);
  m.impl("masked_conv2d_weight_grad", &masked_conv2d_weight_grad_cpu);
}

}  // namespace pyeff
