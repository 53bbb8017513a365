// CPU kernels of pyeff.ops.quant_conv2d: quantise straight to uint8 digits in channels_last
// layout, im2col of those digits into int8 GEMM columns (never in float), and the fused
// dequantising epilogue. The int8 products themselves run in oneDNN (onednn::qconv2d_pointwise,
// AMX / AVX512-VNNI) or at::_int_mm, called from pyeff/ops/quant_conv.py.
// Built with -ffp-contract=off: the rounding matches fake_quant_apply bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"

namespace pyeff {
namespace {

// ---------------------------------------------------------------------------------------------
// quantise: q = clamp(floor(x * inv + zp + 0.5), 0, qmax), written as base-256 digits

// levels as int32 (any width, split into digits later) or straight as uint8 (one 8-bit slice)
// Returns whether x held a NaN: with a given range nothing else reads x, and a NaN would quantise
// to an arbitrary level. The flag rides on the pass (one compare and OR per element, vectorised).
template <typename T, typename Q>
inline bool levels(const T* __restrict__ x, Q* __restrict__ q, int64_t n, T inv, T zp, T qmax) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T y = x[i];
    nan |= static_cast<int>(y != y);
    T v = std::floor(y * inv + zp + T(0.5));
    v = std::min(std::max(v, T(0)), qmax);
    q[i] = static_cast<Q>(static_cast<int32_t>(v));
  }
  return nan != 0;
}

PYEFF_CLONES bool levels_f32(const float* __restrict__ x, int32_t* __restrict__ q, int64_t n, float inv,
                             float zp, float qmax) {
  return levels<float, int32_t>(x, q, n, inv, zp, qmax);
}

PYEFF_CLONES bool levels_u8_f32(const float* __restrict__ x, uint8_t* __restrict__ q, int64_t n, float inv,
                                float zp, float qmax) {
  return levels<float, uint8_t>(x, q, n, inv, zp, qmax);
}

// float32 through the per-instruction-set clones, other types through the plain template
template <typename T, typename Q>
inline bool levels_fast(const T* x, Q* q, int64_t n, T inv, T zp, T qmax) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<Q, int32_t>)
    return levels_f32(x, q, n, inv, zp, qmax);
  else if constexpr (std::is_same_v<T, float>)
    return levels_u8_f32(x, q, n, inv, zp, qmax);
  else
    return levels<T, Q>(x, q, n, inv, zp, qmax);
}

// rows of an NCHW image (channel stride `cstride`) at positions [p0, p0 + len) -> channels_last
// digits: levels per channel into a small [C][kTile] tile, then a byte transpose per slice.
constexpr int64_t kTile = 64;

// after the four interleaving rounds below, register k holds the 16 channels of position
// bit-reverse(k) (4 bits), in channel order
constexpr int kPerm[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

// dst[p * dstride + c] = src[c * sstride + p] for a rows x cols byte block
inline void transpose_bytes(const uint8_t* src, int64_t sstride, uint8_t* dst, int64_t dstride, int64_t rows,
                            int64_t cols) {
  int64_t c0 = 0, p0 = 0;
#if defined(__SSE2__)
  // 16 x 16 blocks: four rounds of interleaving (bytes, words, dwords, qwords)
  for (c0 = 0; c0 + 16 <= rows; c0 += 16) {
    for (p0 = 0; p0 + 16 <= cols; p0 += 16) {
      __m128i a[16], b[16];
      for (int i = 0; i < 16; ++i)
        a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + (c0 + i) * sstride + p0));
      for (int i = 0; i < 8; ++i) {
        b[i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
        b[i + 8] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
      }
      for (int i = 0; i < 8; ++i) {
        a[i] = _mm_unpacklo_epi16(b[2 * i], b[2 * i + 1]);
        a[i + 8] = _mm_unpackhi_epi16(b[2 * i], b[2 * i + 1]);
      }
      for (int i = 0; i < 8; ++i) {
        b[i] = _mm_unpacklo_epi32(a[2 * i], a[2 * i + 1]);
        b[i + 8] = _mm_unpackhi_epi32(a[2 * i], a[2 * i + 1]);
      }
      for (int i = 0; i < 8; ++i) {
        a[i] = _mm_unpacklo_epi64(b[2 * i], b[2 * i + 1]);
        a[i + 8] = _mm_unpackhi_epi64(b[2 * i], b[2 * i + 1]);
      }
      for (int k = 0; k < 16; ++k)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (p0 + kPerm[k]) * dstride + c0), a[k]);
    }
    for (int64_t c = c0; c < c0 + 16; ++c)
      for (int64_t p = p0; p < cols; ++p) dst[p * dstride + c] = src[c * sstride + p];
  }
#endif
  for (int64_t c = c0; c < rows; ++c)
    for (int64_t p = 0; p < cols; ++p) dst[p * dstride + c] = src[c * sstride + p];
}

template <typename T>
bool quantize_tile_nchw(const T* x, int64_t cstride, uint8_t* const* out, int64_t C, int64_t len, int slices,
                        T inv, T zp, T qmax, int32_t* tile, uint8_t* bytes) {
  bool nan = false;
  if (slices == 1) {
    for (int64_t c = 0; c < C; ++c)
      nan |= levels_fast<T, uint8_t>(x + c * cstride, bytes + c * kTile, len, inv, zp, qmax);
    transpose_bytes(bytes, kTile, out[0], C, C, len);
    return nan;
  }
  for (int64_t c = 0; c < C; ++c)
    nan |= levels_fast<T, int32_t>(x + c * cstride, tile + c * kTile, len, inv, zp, qmax);
  for (int s = 0; s < slices; ++s) {
    const int shift = 8 * s;
    for (int64_t i = 0; i < C * kTile; ++i) bytes[i] = static_cast<uint8_t>(tile[i] >> shift);
    transpose_bytes(bytes, kTile, out[s], C, C, len);
  }
  return nan;
}

// channels_last source: element order already matches
template <typename T>
bool quantize_run_nhwc(const T* x, uint8_t* const* out, int64_t n, int slices, T inv, T zp, T qmax) {
  constexpr int64_t kChunk = 1024;
  int32_t buf[kChunk];
  bool nan = false;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t len = std::min(kChunk, n - i0);
    nan |= levels_fast<T, int32_t>(x + i0, buf, len, inv, zp, qmax);
    for (int s = 0; s < slices; ++s) {
      uint8_t* o = out[s] + i0;
      const int shift = 8 * s;
      for (int64_t i = 0; i < len; ++i) o[i] = static_cast<uint8_t>((buf[i] >> shift) & 255);
    }
  }
  return nan;
}

// x (float, 4-D) -> digits [S, N, C, H, W] with channels_last slices, for given inv_scale / zp;
// *has_nan (when given) says whether x held a NaN
at::Tensor quantize_digits(const at::Tensor& x_in, double inv_d, double zp_d, int64_t qmax, int64_t slices,
                           bool* has_nan = nullptr) {
  const auto compute = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool cl = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  at::Tensor x = x_in.to(compute).contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  at::Tensor out = at::empty({slices, N, H, W, C}, x.options().dtype(at::kByte)).permute({0, 1, 4, 2, 3});
  if (x.numel() == 0) return out;
  uint8_t* base = out.data_ptr<uint8_t>();
  const int64_t per_slice = N * C * HW;
  std::atomic<bool> nan{false};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "quant_conv_quantize", [&] {
    const scalar_t inv = static_cast<scalar_t>(inv_d), zp = static_cast<scalar_t>(zp_d);
    const scalar_t qm = static_cast<scalar_t>(qmax);
    const scalar_t* px = x.data_ptr<scalar_t>();
    if (cl) {
      const int64_t total = N * HW * C;
      at::parallel_for(0, total, 1 << 14, [&](int64_t b, int64_t e) {
        bool found;
        if (slices == 1) {
          found = levels_fast<scalar_t, uint8_t>(px + b, base + b, e - b, inv, zp, qm);
        } else {
          uint8_t* o[2] = {base + b, base + per_slice + b};
          found = quantize_run_nhwc<scalar_t>(px + b, o, e - b, int(slices), inv, zp, qm);
        }
        if (found) nan.store(true, std::memory_order_relaxed);
      });
    } else {
      // parallel over (image, tile of positions)
      const int64_t tiles = (HW + kTile - 1) / kTile;
      at::parallel_for(0, N * tiles, std::max<int64_t>(1, 256 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
        std::vector<int32_t> tile(slices > 1 ? static_cast<size_t>(C) * kTile : 0);
        std::vector<uint8_t> bytes(static_cast<size_t>(C) * kTile);
        bool found = false;
        for (int64_t it = b; it < e; ++it) {
          const int64_t n = it / tiles, p0 = (it % tiles) * kTile, len = std::min<int64_t>(kTile, HW - p0);
          uint8_t* o[2] = {base + (n * HW + p0) * C, base + per_slice + (n * HW + p0) * C};
          found |= quantize_tile_nchw<scalar_t>(px + n * C * HW + p0, HW, o, C, len, int(slices), inv, zp, qm,
                                                tile.data(), bytes.data());
        }
        if (found) nan.store(true, std::memory_order_relaxed);
      });
    }
  });
  if (has_nan) *has_nan = nan.load();
  return out;
}

void check_quantize_args(const at::Tensor& x, int64_t qmax, int64_t slices, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "pyeff::", op, " (CPU kernel): x must be on the CPU");
  TORCH_CHECK(x.dim() == 4, "pyeff::", op, ": x must be 4-D [N, C, H, W]");
  TORCH_CHECK(slices >= 1 && slices <= 2 && qmax >= 1 && qmax < (int64_t{1} << (8 * slices)),
              "pyeff::", op, ": qmax ", qmax, " does not fit ", slices, " byte slice(s)");
}

at::Tensor quantize_cpu(const at::Tensor& x_in, const at::Tensor& inv_scale, const at::Tensor& zero_point,
                        int64_t qmax, int64_t slices) {
  check_quantize_args(x_in, qmax, slices, "quant_conv_quantize");
  return quantize_digits(x_in, inv_scale.to(at::kCPU, at::kDouble).item<double>(),
                         zero_point.to(at::kCPU, at::kDouble).item<double>(), qmax, slices);
}

// the per-tensor asymmetric parameters of pyeff.ops.fake_quant.quant_params, in the same dtype
// and operation order (so bit-identical): range widened to hold 0, scale = (hi - lo) / qmax (1
// for an empty range, at least the smallest normal), zero point round-half-even(-lo / scale)
template <typename T>
void asym_params(T lo, T hi, int64_t qmax, double* scale, double* inv, double* zp) {
  lo = std::min(lo, T(0));
  hi = std::max(hi, T(0));
  const T q = static_cast<T>(qmax);
  T s = hi - lo;
  // a range wider than T's largest value: each end divided first, then at most the largest value
  s = std::isinf(s) ? std::min(hi / q - lo / q, std::numeric_limits<T>::max()) : s / q;
  s = s == T(0) ? T(1) : std::max(s, std::numeric_limits<T>::min());
  const T iv = T(1) / s;
  const T z = std::min(std::max(std::nearbyint(-lo / s), T(0)), static_cast<T>(qmax));
  *scale = static_cast<double>(s);
  *inv = static_cast<double>(iv);
  *zp = static_cast<double>(z);
}

// range (given, or the min-max of x), parameters and digits in one call: the CPU front end of
// quant_conv2d. Returns (digits, float64 [scale, inv_scale, zero_point, lo, hi]); digits are empty
// when the range is not finite or x holds a NaN (the caller raises).
std::tuple<at::Tensor, at::Tensor> quantize_auto_cpu(const at::Tensor& x_in, std::optional<at::ArrayRef<double>> a_range,
                                                     int64_t qmax, int64_t slices) {
  check_quantize_args(x_in, qmax, slices, "quant_conv_quantize_auto");
  const auto compute = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = x_in.scalar_type() == compute ? x_in : x_in.to(compute);
  double lo, hi;
  if (a_range.has_value()) {
    TORCH_CHECK(a_range->size() == 2, "pyeff::quant_conv_quantize_auto: a_range must hold (lo, hi)");
    lo = (*a_range)[0];
    hi = (*a_range)[1];
  } else {
    TORCH_CHECK(x.numel() > 0, "pyeff::quant_conv_quantize_auto: x is empty");
    static auto minmax = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyeff::fake_quant_minmax", "")
                             .typed<at::Tensor(const at::Tensor&, std::optional<int64_t>)>();
    at::Tensor mm = minmax.call(x, std::nullopt).to(at::kDouble);
    lo = mm.data_ptr<double>()[0];
    hi = mm.data_ptr<double>()[1];
  }
  at::Tensor params = at::empty({5}, x.options().dtype(at::kDouble));
  double* p = params.data_ptr<double>();
  p[3] = lo;
  p[4] = hi;
  if (!std::isfinite(lo) || !std::isfinite(hi)) {
    p[0] = p[1] = p[2] = std::numeric_limits<double>::quiet_NaN();
    return {at::empty({0}, x.options().dtype(at::kByte)), params};
  }
  if (compute == at::kDouble)
    asym_params<double>(lo, hi, qmax, p, p + 1, p + 2);
  else
    asym_params<float>(static_cast<float>(lo), static_cast<float>(hi), qmax, p, p + 1, p + 2);
  bool nan = false;
  at::Tensor digits = quantize_digits(x, p[1], p[2], qmax, slices, &nan);
  if (nan) {  // only reachable with a given range (a NaN makes the min-max NaN): same answer as there
    p[0] = p[1] = p[2] = p[3] = p[4] = std::numeric_limits<double>::quiet_NaN();
    return {at::empty({0}, x.options().dtype(at::kByte)), params};
  }
  return {digits, params};
}

// ---------------------------------------------------------------------------------------------
// im2col of the digits: int8 columns, value u - 128 (u ^ 0x80)

at::Tensor im2col_cpu(const at::Tensor& digits, at::IntArrayRef pad_digits, at::IntArrayRef kernel,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      int64_t k_pad) {
  TORCH_CHECK(digits.device().is_cpu() && digits.scalar_type() == at::kByte && digits.dim() == 5,
              "pyeff::quant_conv_im2col (CPU kernel): digits must be uint8 [S, N, C, H, W] on the CPU");
  const int64_t S = digits.size(0), N = digits.size(1), C = digits.size(2), H = digits.size(3), W = digits.size(4);
  TORCH_CHECK(static_cast<int64_t>(pad_digits.size()) == S && kernel.size() == 2 && stride.size() == 2 &&
                  padding.size() == 2 && dilation.size() == 2 && groups >= 1 && C % groups == 0,
              "pyeff::quant_conv_im2col: bad arguments");
  TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 &&
                  dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              "pyeff::quant_conv_im2col: kernel, stride and dilation must be >= 1 and padding >= 0");
  // [S, N, H, W, C] contiguous
  at::Tensor d = digits.permute({0, 1, 3, 4, 2}).contiguous();
  const int64_t KH = kernel[0], KW = kernel[1];
  const int64_t OH = conv_out_size(H, KH, stride[0], padding[0], dilation[0]);
  const int64_t OW = conv_out_size(W, KW, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(OH > 0 && OW > 0, "pyeff::quant_conv_im2col: empty output");
  const int64_t Cg = C / groups, Kd = Cg * KH * KW, M = N * OH * OW;
  TORCH_CHECK(k_pad >= Kd, "pyeff::quant_conv_im2col: k_pad ", k_pad, " < ", Kd);
  at::Tensor cols = at::empty({groups, S * M, k_pad}, digits.options().dtype(at::kChar));
  const uint8_t* pd = d.data_ptr<uint8_t>();
  int8_t* pc = cols.data_ptr<int8_t>();
  const int64_t rows = groups * S * M;
  at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / k_pad), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int64_t g = r / (S * M), j = (r / M) % S, m = r % M;
      const int64_t n = m / (OH * OW), oh = (m / OW) % OH, ow = m % OW;
      const int8_t fill = static_cast<int8_t>(static_cast<uint8_t>(pad_digits[j]) ^ 0x80);
      int8_t* out = pc + r * k_pad;
      const uint8_t* img = pd + ((j * N + n) * H * W) * C + g * Cg;
      for (int64_t kh = 0; kh < KH; ++kh) {
        const int64_t ih = oh * stride[0] - padding[0] + kh * dilation[0];
        for (int64_t kw = 0; kw < KW; ++kw, out += Cg) {
          const int64_t iw = ow * stride[1] - padding[1] + kw * dilation[1];
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
            std::memset(out, fill, Cg);
          } else {
            const uint8_t* src = img + (ih * W + iw) * C;
            for (int64_t c = 0; c < Cg; ++c) out[c] = static_cast<int8_t>(src[c] ^ 0x80);
          }
        }
      }
      std::memset(out, 0, k_pad - Kd);
    }
  });
  return cols;
}

// ---------------------------------------------------------------------------------------------
// window sums of the activation levels (for the 16-bit weight offset)

at::Tensor window_sums_cpu(const at::Tensor& digits_in, at::IntArrayRef zdig, int64_t groups, at::IntArrayRef kernel,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(digits_in.device().is_cpu() && digits_in.scalar_type() == at::kByte && digits_in.dim() == 5,
              "pyeff::quant_conv_window_sums (CPU kernel): digits must be uint8 [S, N, C, H, W] on the CPU");
  const int64_t S = digits_in.size(0), N = digits_in.size(1), C = digits_in.size(2), H = digits_in.size(3),
                W = digits_in.size(4);
  TORCH_CHECK(static_cast<int64_t>(zdig.size()) == S && kernel.size() == 2 && stride.size() == 2 &&
                  padding.size() == 2 && dilation.size() == 2 && groups >= 1 && C % groups == 0,
              "pyeff::quant_conv_window_sums: bad arguments");
  TORCH_CHECK(kernel[0] >= 1 && kernel[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 &&
                  dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              "pyeff::quant_conv_window_sums: kernel, stride and dilation must be >= 1 and padding >= 0");
  const at::Tensor d = digits_in.permute({0, 1, 3, 4, 2}).contiguous();  // [S, N, H, W, C]
  const int64_t KH = kernel[0], KW = kernel[1], Cg = C / groups;
  const int64_t OH = conv_out_size(H, KH, stride[0], padding[0], dilation[0]);
  const int64_t OW = conv_out_size(W, KW, stride[1], padding[1], dilation[1]);
  at::Tensor out = at::empty({N * OH * OW, groups}, digits_in.options().dtype(at::kDouble));
  const uint8_t* pd = d.data_ptr<uint8_t>();
  double* po = out.data_ptr<double>();
  std::vector<int64_t> zd(zdig.begin(), zdig.end());
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> a(static_cast<size_t>(H * W * groups));  // per pixel and group: sum of (q - zp)
    for (int64_t n = b; n < e; ++n) {
      std::fill(a.begin(), a.end(), 0);
      for (int64_t j = 0; j < S; ++j) {
        const uint8_t* img = pd + (j * N + n) * H * W * C;
        const int64_t f = int64_t{1} << (8 * j);
        for (int64_t p = 0; p < H * W; ++p)
          for (int64_t g = 0; g < groups; ++g) {
            const uint8_t* src = img + p * C + g * Cg;
            int32_t sum = 0;
            for (int64_t c = 0; c < Cg; ++c) sum += src[c];
            a[p * groups + g] += f * (static_cast<int64_t>(sum) - Cg * zd[j]);
          }
      }
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          double* o = po + ((n * OH + oh) * OW + ow) * groups;
          for (int64_t g = 0; g < groups; ++g) {
            int64_t t = 0;
            for (int64_t kh = 0; kh < KH; ++kh) {
              const int64_t ih = oh * stride[0] - padding[0] + kh * dilation[0];
              if (ih < 0 || ih >= H) continue;
              for (int64_t kw = 0; kw < KW; ++kw) {
                const int64_t iw = ow * stride[1] - padding[1] + kw * dilation[1];
                if (iw >= 0 && iw < W) t += a[(ih * W + iw) * groups + g];
              }
            }
            o[g] = static_cast<double>(t);
          }
        }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// epilogue: exact integer combination of the slices in float64, then scale and bias

struct EpilogueArgs {
  const void* const* acc;  // [S_a * G] row-major [M, >= cols] blocks, row stride ld
  const int64_t* ld;
  const double* corr;      // [S_a, G * cols]
  int64_t S_a, G, S_w, Kg, K;
  const double* rowsum;    // [M, G] or null
  const double* fac;       // [K] a_scale * w_scale
  const double* bias;      // [K] (zeros when there is none)
  void* out;               // [M, K]
};

// rows [b, e) of the epilogue; inlined into one clone per instruction set, so the short loops over
// Kg vectorise and no call is paid per row
template <typename acc_t, typename out_t>
__attribute__((always_inline)) inline void epilogue_rows(const EpilogueArgs& a, int64_t b, int64_t e,
                                                         double* __restrict__ v) {
  const int64_t Kg = a.Kg, cols = a.S_w * Kg;
  out_t* out = static_cast<out_t*>(a.out);
  for (int64_t m = b; m < e; ++m) {
    for (int64_t g = 0; g < a.G; ++g) {
      const double ones_sum = a.rowsum ? 128.0 * a.rowsum[m * a.G + g] : 0.0;
      for (int64_t k = 0; k < Kg; ++k) v[k] = ones_sum;
      for (int64_t j = 0; j < a.S_a; ++j) {
        const acc_t* row = static_cast<const acc_t*>(a.acc[j * a.G + g]) + m * a.ld[j * a.G + g];
        const double* crow = a.corr + (j * a.G + g) * cols;
        for (int64_t l = 0; l < a.S_w; ++l) {
          const double f = std::ldexp(1.0, int(8 * (j + l)));
          const acc_t* r = row + l * Kg;
          const double* c = crow + l * Kg;
          for (int64_t k = 0; k < Kg; ++k) v[k] += f * (static_cast<double>(r[k]) + c[k]);
        }
      }
      out_t* __restrict__ o = out + m * a.K + g * Kg;
      const double* __restrict__ fa = a.fac + g * Kg;
      const double* __restrict__ bi = a.bias + g * Kg;
      for (int64_t k = 0; k < Kg; ++k) o[k] = static_cast<out_t>(v[k] * fa[k] + bi[k]);
    }
  }
}

PYEFF_CLONES void epilogue_rows_i32_f32(const EpilogueArgs& a, int64_t b, int64_t e, double* v) {
  epilogue_rows<int32_t, float>(a, b, e, v);
}
PYEFF_CLONES void epilogue_rows_i32_f64(const EpilogueArgs& a, int64_t b, int64_t e, double* v) {
  epilogue_rows<int32_t, double>(a, b, e, v);
}
PYEFF_CLONES void epilogue_rows_f32_f32(const EpilogueArgs& a, int64_t b, int64_t e, double* v) {
  epilogue_rows<float, float>(a, b, e, v);
}
PYEFF_CLONES void epilogue_rows_f32_f64(const EpilogueArgs& a, int64_t b, int64_t e, double* v) {
  epilogue_rows<float, double>(a, b, e, v);
}

template <typename acc_t, typename out_t>
void epilogue_impl(const std::vector<at::Tensor>& acc, const double* corr, int64_t S_a, int64_t G, int64_t S_w,
                   const double* rowsum, double a_scale, const double* w_scale, const double* bias, out_t* out,
                   int64_t M, int64_t K) {
  std::vector<const void*> ptr(acc.size());
  std::vector<int64_t> ld(acc.size());
  for (size_t i = 0; i < acc.size(); ++i) {
    ptr[i] = acc[i].data_ptr<acc_t>();
    ld[i] = acc[i].stride(0);
  }
  // (v + ones) * a_scale * w_scale + bias, as before the restructuring: the scale product first
  std::vector<double> fac(K), bias_v(K, 0.0);
  for (int64_t k = 0; k < K; ++k) fac[k] = a_scale * w_scale[k];
  if (bias) std::copy(bias, bias + K, bias_v.begin());
  const EpilogueArgs args{ptr.data(), ld.data(), corr, S_a, G, S_w, K / G, K, rowsum, fac.data(), bias_v.data(), out};
  at::parallel_for(0, M, 256, [&](int64_t b, int64_t e) {
    std::vector<double> v(K / G);
    if constexpr (std::is_same_v<acc_t, int32_t> && std::is_same_v<out_t, float>)
      epilogue_rows_i32_f32(args, b, e, v.data());
    else if constexpr (std::is_same_v<acc_t, int32_t>)
      epilogue_rows_i32_f64(args, b, e, v.data());
    else if constexpr (std::is_same_v<out_t, float>)
      epilogue_rows_f32_f32(args, b, e, v.data());
    else
      epilogue_rows_f32_f64(args, b, e, v.data());
  });
}

at::Tensor epilogue_cpu(at::TensorList acc_in, const at::Tensor& corr_in, int64_t slices_w,
                        const std::optional<at::Tensor>& rowsum_in, double a_scale,
                        const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in,
                        at::IntArrayRef out_shape, at::ScalarType out_dtype) {
  TORCH_CHECK(out_shape.size() == 4, "pyeff::quant_conv_epilogue: out_shape must be [N, K, OH, OW]");
  const int64_t N = out_shape[0], K = out_shape[1], OH = out_shape[2], OW = out_shape[3], M = N * OH * OW;
  TORCH_CHECK(corr_in.dim() == 2, "pyeff::quant_conv_epilogue: corr must be [S_a, G*cols]");
  const int64_t S_a = corr_in.size(0);
  TORCH_CHECK(S_a >= 1 && static_cast<int64_t>(acc_in.size()) % S_a == 0,
              "pyeff::quant_conv_epilogue: acc must hold S_a * G tensors");
  const int64_t G = acc_in.size() / S_a;
  TORCH_CHECK(G >= 1 && slices_w >= 1, "pyeff::quant_conv_epilogue: acc must hold S_a * G tensors (G >= 1) and "
              "slices_w must be >= 1");
  TORCH_CHECK(K % G == 0, "pyeff::quant_conv_epilogue: K not divisible by groups");
  const int64_t cols = slices_w * (K / G);
  TORCH_CHECK(corr_in.size(1) == G * cols, "pyeff::quant_conv_epilogue: corr has ", corr_in.size(1),
              " columns, expected ", G * cols);
  std::vector<at::Tensor> acc;
  const auto acc_type = acc_in[0].scalar_type();
  TORCH_CHECK(acc_type == at::kInt || acc_type == at::kFloat, "pyeff::quant_conv_epilogue: acc must be int32 or float32");
  for (const auto& a : acc_in) {
    TORCH_CHECK(a.device().is_cpu() && a.scalar_type() == acc_type && a.dim() == 2 && a.size(0) == M &&
                    a.size(1) >= cols,
                "pyeff::quant_conv_epilogue: each acc must be [M, >= cols] of one dtype");
    acc.push_back(a.stride(1) == 1 ? a : a.contiguous());
  }
  at::Tensor corr = corr_in.to(at::kCPU, at::kDouble).contiguous();
  at::Tensor w_scale = w_scale_in.to(at::kCPU, at::kDouble).contiguous();
  TORCH_CHECK(w_scale.numel() == K, "pyeff::quant_conv_epilogue: w_scale needs K values");
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->to(at::kCPU, at::kDouble).contiguous();
    TORCH_CHECK(bias.numel() == K, "pyeff::quant_conv_epilogue: bias needs K values");
  }
  at::Tensor rowsum;
  if (rowsum_in.has_value()) {
    rowsum = rowsum_in->to(at::kCPU, at::kDouble).contiguous();
    TORCH_CHECK(rowsum.numel() == M * G, "pyeff::quant_conv_epilogue: rowsum must be [M, G]");
  }
  const double* prs = rowsum.defined() ? rowsum.data_ptr<double>() : nullptr;
  const auto write_type = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  // allocated as channels_last (NHWC memory) rather than permuted: a view would make the public op's
  // output a view, which autograd then refuses to modify in place (torch.relu_(y))
  at::Tensor out = at::empty({N, K, OH, OW}, corr_in.options().device(at::kCPU).dtype(write_type).memory_format(at::MemoryFormat::ChannelsLast));
  if (M > 0 && K > 0) {
    const double* pb = bias.defined() ? bias.data_ptr<double>() : nullptr;
    AT_DISPATCH_SWITCH(acc_type, "quant_conv_epilogue",
      AT_DISPATCH_CASE(at::kInt, [&] {
        if (write_type == at::kDouble)
          epilogue_impl<int32_t, double>(acc, corr.data_ptr<double>(), S_a, G, slices_w, prs, a_scale,
                                         w_scale.data_ptr<double>(), pb, out.data_ptr<double>(), M, K);
        else
          epilogue_impl<int32_t, float>(acc, corr.data_ptr<double>(), S_a, G, slices_w, prs, a_scale,
                                        w_scale.data_ptr<double>(), pb, out.data_ptr<float>(), M, K);
      })
      AT_DISPATCH_CASE(at::kFloat, [&] {
        if (write_type == at::kDouble)
          epilogue_impl<float, double>(acc, corr.data_ptr<double>(), S_a, G, slices_w, prs, a_scale,
                                       w_scale.data_ptr<double>(), pb, out.data_ptr<double>(), M, K);
        else
          epilogue_impl<float, float>(acc, corr.data_ptr<double>(), S_a, G, slices_w, prs, a_scale,
                                      w_scale.data_ptr<double>(), pb, out.data_ptr<float>(), M, K);
      }));
  }
  return out_dtype == write_type ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("quant_conv_quantize", &quantize_cpu);
  m.impl("quant_conv_quantize_auto", &quantize_auto_cpu);
  m.impl("quant_conv_im2col", &im2col_cpu);
  m.impl("quant_conv_window_sums", &window_sums_cpu);
  m.impl("quant_conv_epilogue", &epilogue_cpu);
}

}  // namespace pyeff
