// CPU kernels of pyeff.ops.fake_quant: one fused pass for the minimum and maximum, one for the
// rounding. float32 loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load
// time (target_clones); other dtypes take a portable path. Built with -ffp-contract=off so that
// results match the PyTorch reference bit for bit.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyeff {
namespace {

constexpr int kLanes = 16;

// A fresh output tensor whose large pages are asked to be 2 MiB huge pages where the kernel allows
// it (transparent huge pages in "madvise" mode): first-touch page faults of a large fresh buffer
// otherwise cost more than the rounding pass itself (64 MiB: ~30 ms of faults vs ~19 ms of work).
at::Tensor empty_output_like(const at::Tensor& x) {
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t nbytes = y.nbytes();
  if (nbytes >= 4 * kHuge) {
    const uintptr_t begin = (reinterpret_cast<uintptr_t>(y.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t end = (reinterpret_cast<uintptr_t>(y.data_ptr()) + nbytes) & ~(kHuge - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
  }
#endif
  return y;
}
constexpr int64_t kGrain = 1 << 15;

// ---------------------------------------------------------------------------------------------
// pass 1: minimum and maximum

struct MinMax {
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  bool nan = false;
  void merge(const MinMax& o) {
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
    nan = nan || o.nan;
  }
};

// min/max over n contiguous floats in kLanes-wide vectors (GCC vector extensions: lowered to
// AVX-512, AVX2 or SSE per clone). NaN is invisible to < and >; a running sum of v * 0 catches it
// (it is NaN for NaN and for inf).
typedef float lanes_t __attribute__((vector_size(kLanes * sizeof(float))));

PYEFF_CLONES void minmax_f32(const float* x, int64_t n, MinMax* out) {
  const float inf = std::numeric_limits<float>::infinity();
  lanes_t lo = {}, hi = {}, probe = {};
  lo += inf;
  hi -= inf;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    lanes_t v;
    std::memcpy(&v, x + i, sizeof(v));
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    probe += v * 0.f;
  }
  MinMax r;
  for (int j = 0; j < kLanes; ++j) {
    r.lo = std::min(r.lo, lo[j]);
    r.hi = std::max(r.hi, hi[j]);
    r.nan = r.nan || std::isnan(probe[j]);
  }
  for (; i < n; ++i) {
    const float v = x[i];
    r.lo = v < r.lo ? v : r.lo;
    r.hi = v > r.hi ? v : r.hi;
    r.nan = r.nan || std::isnan(v);
  }
  out->merge(r);
}

// element-wise running min/max over `rows` rows of `width` floats (for channel axes with a short
// inner extent, e.g. the last axis): lo[k] = min over rows of x[row, k].
PYEFF_CLONES void minmax_rows_f32(const float* __restrict__ x, int64_t rows, int64_t width,
                                  float* __restrict__ lo, float* __restrict__ hi,
                                  float* __restrict__ probe) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    for (int64_t k = 0; k < width; ++k) {
      const float v = row[k];
      lo[k] = v < lo[k] ? v : lo[k];
      hi[k] = v > hi[k] ? v : hi[k];
      probe[k] += v * 0.f;
    }
  }
}

at::Tensor minmax_cpu(const at::Tensor& x_in, std::optional<int64_t> axis) {
  TORCH_CHECK(x_in.device().is_cpu(), "pyeff::fake_quant_minmax (CPU kernel): x must be on the CPU");
  TORCH_CHECK(x_in.numel() > 0, "pyeff::fake_quant_minmax: x is empty");
  const bool is_double = x_in.scalar_type() == at::kDouble;
  // half and bfloat16 are quantised in float32; float64 keeps its precision
  at::Tensor x = (is_double || x_in.scalar_type() == at::kFloat) ? x_in : x_in.to(at::kFloat);
  // a per-tensor range reads the elements in memory order: any dense layout (channels_last) as is
  if (axis.has_value() || !x.is_non_overlapping_and_dense()) x = x.contiguous();
  const ChannelLayout l = channel_layout(x, axis);
  const int64_t C = l.channels;
  at::Tensor out = at::empty({2, C}, x.options());
  const int nthreads = at::get_num_threads();

  if (is_double) {
    // portable path: exactness matters more than speed here
    const double* px = x.data_ptr<double>();
    double* po = out.data_ptr<double>();
    std::vector<char> nan(C, 0);
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double lo = std::numeric_limits<double>::infinity(), hi = -lo;
        for (int64_t o = 0; o < l.outer; ++o) {
          const double* row = px + (o * C + c) * l.inner;
          for (int64_t i = 0; i < l.inner; ++i) {
            const double v = row[i];
            if (std::isnan(v)) nan[c] = 1;
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
          }
        }
        po[c] = nan[c] ? NAN : lo;
        po[C + c] = nan[c] ? NAN : hi;
      }
    });
    return out;
  }

  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  if (C == 1) {  // per tensor, or an axis of size 1: every element (outer rows included) is one channel
    std::vector<MinMax> part(nthreads);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      minmax_f32(px + b, e - b, &part[at::get_thread_num()]);
    });
    MinMax r;
    for (auto& p : part) r.merge(p);
    po[0] = r.nan ? NAN : r.lo;
    po[1] = r.nan ? NAN : r.hi;
    return out;
  }
  std::vector<MinMax> part(static_cast<size_t>(nthreads) * C);
  if (l.inner >= kLanes) {
    // each (outer, channel) row is a contiguous run of `inner` values
    const int64_t grain = std::max<int64_t>(1, kGrain / l.inner);
    at::parallel_for(0, l.outer * C, grain, [&](int64_t b, int64_t e) {
      MinMax* mine = &part[static_cast<size_t>(at::get_thread_num()) * C];
      for (int64_t row = b; row < e; ++row) minmax_f32(px + row * l.inner, l.inner, &mine[row % C]);
    });
  } else {
    // short inner extent: accumulate whole [C * inner] slabs element-wise, fold inner at the end
    const int64_t width = C * l.inner;
    std::vector<float> lo(static_cast<size_t>(nthreads) * width, std::numeric_limits<float>::infinity());
    std::vector<float> hi(static_cast<size_t>(nthreads) * width, -std::numeric_limits<float>::infinity());
    std::vector<float> probe(static_cast<size_t>(nthreads) * width, 0.f);
    const int64_t grain = std::max<int64_t>(1, kGrain / width);
    at::parallel_for(0, l.outer, grain, [&](int64_t b, int64_t e) {
      const size_t t = at::get_thread_num();
      minmax_rows_f32(px + b * width, e - b, width, &lo[t * width], &hi[t * width], &probe[t * width]);
    });
    for (int t = 0; t < nthreads; ++t)
      for (int64_t k = 0; k < width; ++k) {
        MinMax m;
        m.lo = lo[t * width + k];
        m.hi = hi[t * width + k];
        m.nan = std::isnan(probe[t * width + k]);
        part[static_cast<size_t>(t) * C + k / l.inner].merge(m);
      }
  }
  for (int64_t c = 0; c < C; ++c) {
    MinMax r;
    for (int t = 0; t < nthreads; ++t) r.merge(part[static_cast<size_t>(t) * C + c]);
    po[c] = r.nan ? NAN : r.lo;
    po[C + c] = r.nan ? NAN : r.hi;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// pass 2: quantise and dequantise

// n contiguous floats with one set of parameters. `index0` is the flat index of x[0] (for the
// stochastic-rounding stream); callers never let a run cross a multiple of 2^32, so the key is
// constant within it.
// Dequantised values saturate at +-omax, the output dtype's largest finite value: an outer level
// of the grid can lie past it (pyeff.ops.fake_quant.apply_reference).
PYEFF_CLONES void apply_f32(const float* x, float* y, int64_t n, uint64_t index0, float scale,
                            float inv_scale, float zp, float qmin, float qmax, bool stochastic,
                            uint32_t seed, float omax) {
  if (!stochastic) {
    for (int64_t i = 0; i < n; ++i) {
      float q = std::floor(x[i] * inv_scale + zp + 0.5f);
      q = std::min(std::max(q, qmin), qmax);
      y[i] = std::min(std::max((q - zp) * scale, -omax), omax);
    }
    return;
  }
  const uint32_t key = rounding_key(seed, index0);
  const uint32_t lo0 = static_cast<uint32_t>(index0);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = fmix32((lo0 + static_cast<uint32_t>(i)) ^ key);
    const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
    float q = std::floor(x[i] * inv_scale + zp + u);
    q = std::min(std::max(q, qmin), qmax);
    y[i] = std::min(std::max((q - zp) * scale, -omax), omax);
  }
}

// same, with per-element parameters (used for a short inner extent)
PYEFF_CLONES void apply_vec_f32(const float* x, float* y, int64_t n, uint64_t index0,
                                const float* scale, const float* inv_scale, const float* zp,
                                float qmin, float qmax, bool stochastic, uint32_t seed, float omax) {
  const uint32_t key = rounding_key(seed, index0);
  const uint32_t lo0 = static_cast<uint32_t>(index0);
  for (int64_t i = 0; i < n; ++i) {
    float r = 0.5f;
    if (stochastic) {
      const uint32_t h = fmix32((lo0 + static_cast<uint32_t>(i)) ^ key);
      r = static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
    }
    float q = std::floor(x[i] * inv_scale[i] + zp[i] + r);
    q = std::min(std::max(q, qmin), qmax);
    y[i] = std::min(std::max((q - zp[i]) * scale[i], -omax), omax);
  }
}

// split [index0, index0 + n) at multiples of 2^32 so that each piece has one rounding key
template <typename F>
void for_each_key_run(uint64_t index0, int64_t n, F&& f) {
  int64_t done = 0;
  while (done < n) {
    const uint64_t idx = index0 + done;
    const uint64_t to_boundary = (uint64_t{1} << 32) - (idx & 0xFFFFFFFFull);
    const int64_t len = static_cast<int64_t>(std::min<uint64_t>(to_boundary, n - done));
    f(done, idx, len);
    done += len;
  }
}

template <typename T>
void apply_generic(const T* x, T* y, const ChannelLayout& l, const double* scale, const double* inv,
                   const double* zp, double qmin, double qmax, bool stochastic, uint32_t seed, double omax) {
  const int64_t n = l.outer * l.channels * l.inner;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t c = (i / l.inner) % l.channels;
      const double r =
          stochastic ? static_cast<double>(uniform01(rounding_key(seed, i), i)) : 0.5;
      double q = std::floor(static_cast<double>(x[i]) * inv[c] + zp[c] + r);
      q = std::min(std::max(q, qmin), qmax);
      y[i] = static_cast<T>(std::min(std::max((q - zp[c]) * scale[c], -omax), omax));
    }
  });
}

at::Tensor apply_cpu(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& inv_in,
                     const at::Tensor& zp_in, int64_t qmin, int64_t qmax,
                     std::optional<int64_t> axis, std::optional<int64_t> seed) {
  TORCH_CHECK(x_in.device().is_cpu(), "pyeff::fake_quant_apply (CPU kernel): x must be on the CPU");
  TORCH_CHECK(qmin < qmax, "pyeff::fake_quant_apply: qmin (", qmin, ") must be below qmax (", qmax, ")");
  const bool is_double = x_in.scalar_type() == at::kDouble;
  const auto compute = is_double ? at::kDouble : at::kFloat;
  // one deterministic per-tensor quantiser: element order does not matter, so a channels_last x is
  // read and written in its own layout (a copy to NCHW first cost 9x the kernel)
  const bool keep_layout = !axis.has_value() && !seed.has_value() && x_in.dim() >= 4 && !x_in.is_contiguous() &&
                           (x_in.is_contiguous(at::MemoryFormat::ChannelsLast) ||
                            x_in.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  at::Tensor x = keep_layout ? x_in.to(compute) : x_in.to(compute).contiguous();
  const ChannelLayout l = channel_layout(x, axis);
  const int64_t C = l.channels;
  at::Tensor scale = scale_in.to(at::kCPU, compute).contiguous().view(-1);
  at::Tensor inv = inv_in.to(at::kCPU, compute).contiguous().view(-1);
  at::Tensor zp = zp_in.to(at::kCPU, compute).contiguous().view(-1);
  TORCH_CHECK(scale.numel() == C && inv.numel() == C && zp.numel() == C,
              "pyeff::fake_quant_apply: scale, inv_scale and zero_point need ", C,
              " values (one per channel), got ", scale.numel(), ", ", inv.numel(), ", ", zp.numel());
  const bool stochastic = seed.has_value();
  const uint32_t s = stochastic ? static_cast<uint32_t>(*seed & 0xFFFFFFFF) : 0u;
  at::Tensor y = keep_layout ? at::empty_like(x) : empty_output_like(x);
  if (x.numel() == 0) return y.to(x_in.scalar_type());

  if (is_double) {
    apply_generic<double>(x.data_ptr<double>(), y.data_ptr<double>(), l, scale.data_ptr<double>(),
                          inv.data_ptr<double>(), zp.data_ptr<double>(), double(qmin), double(qmax),
                          stochastic, s, std::numeric_limits<double>::max());
    return y;
  }
  const float* px = x.data_ptr<float>();
  float* py = y.data_ptr<float>();
  const float* ps = scale.data_ptr<float>();
  const float* pi = inv.data_ptr<float>();
  const float* pz = zp.data_ptr<float>();
  const float fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  // the output dtype's largest finite value (half and bfloat16 are computed in float32)
  const float omax = x_in.scalar_type() == at::kHalf       ? 65504.0f
                     : x_in.scalar_type() == at::kBFloat16 ? static_cast<float>(std::numeric_limits<c10::BFloat16>::max())
                                                           : std::numeric_limits<float>::max();

  if (C == 1) {  // per tensor, or an axis of size 1: all outer * inner elements
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      for_each_key_run(b, e - b, [&](int64_t off, uint64_t idx, int64_t len) {
        apply_f32(px + b + off, py + b + off, len, idx, ps[0], pi[0], pz[0], fmin, fmax, stochastic, s, omax);
      });
    });
  } else if (l.inner >= kLanes) {
    const int64_t grain = std::max<int64_t>(1, kGrain / l.inner);
    at::parallel_for(0, l.outer * C, grain, [&](int64_t b, int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t c = row % C;
        const uint64_t base = static_cast<uint64_t>(row) * l.inner;
        for_each_key_run(base, l.inner, [&](int64_t off, uint64_t idx, int64_t len) {
          apply_f32(px + base + off, py + base + off, len, idx, ps[c], pi[c], pz[c], fmin, fmax,
                    stochastic, s, omax);
        });
      }
    });
  } else {
    const int64_t width = C * l.inner;
    std::vector<float> es(width), ei(width), ez(width);  // parameters expanded over inner
    for (int64_t k = 0; k < width; ++k) {
      es[k] = ps[k / l.inner];
      ei[k] = pi[k / l.inner];
      ez[k] = pz[k / l.inner];
    }
    const int64_t grain = std::max<int64_t>(1, kGrain / width);
    at::parallel_for(0, l.outer, grain, [&](int64_t b, int64_t e) {
      for (int64_t o = b; o < e; ++o) {
        const uint64_t base = static_cast<uint64_t>(o) * width;
        for_each_key_run(base, width, [&](int64_t off, uint64_t idx, int64_t len) {
          apply_vec_f32(px + base + off, py + base + off, len, idx, es.data() + off, ei.data() + off,
                        ez.data() + off, fmin, fmax, stochastic, s, omax);
        });
      }
    });
  }
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("fake_quant_minmax", &minmax_cpu);
  m.impl("fake_quant_apply", &apply_cpu);
}

}  // namespace pyeff
