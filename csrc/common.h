// Helpers shared by pyeff's C++ and CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <cstdint>

// Hot CPU loops are compiled for AVX-512, AVX2 and baseline x86-64, and the loader picks the best
// one the running CPU supports, so one wheel is fast on every machine.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && defined(__linux__) && !defined(__CUDACC__)
#define PYEFF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYEFF_CLONES
#endif

namespace pyeff {

// A tensor viewed as [outer, channels, inner] around an optional channel axis
// (per-tensor ops use channels = 1, inner = numel).
struct ChannelLayout {
  int64_t outer = 1, channels = 1, inner = 1;
};

inline ChannelLayout channel_layout(const at::Tensor& x, std::optional<int64_t> axis) {
  ChannelLayout l;
  if (!axis.has_value()) {
    l.inner = x.numel();
    return l;
  }
  const int64_t dim = x.dim();
  int64_t a = *axis < 0 ? *axis + dim : *axis;
  TORCH_CHECK(a >= 0 && a < dim, "pyeff: axis ", *axis, " is out of range for a tensor with ", dim,
              " dimensions");
  for (int64_t d = 0; d < a; ++d) l.outer *= x.size(d);
  l.channels = x.size(a);
  for (int64_t d = a + 1; d < dim; ++d) l.inner *= x.size(d);
  return l;
}

// Counter-based random numbers for stochastic rounding: the same (seed, element index) gives the
// same value on every backend (C++, CUDA, Triton, and the PyTorch reference), so stochastic
// results are reproducible and comparable across devices. murmur3's 32-bit finaliser.
#if defined(__CUDACC__)
#define PYEFF_HD __host__ __device__ __forceinline__
#else
#define PYEFF_HD inline
#endif

// Output length of a convolution along one axis, as PyTorch defines it; 0 when the padded input is
// shorter than the dilated kernel (C++ division truncates toward zero, so test before dividing).
PYEFF_HD int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t span = in + 2 * padding - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

PYEFF_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

PYEFF_HD uint32_t rounding_key(uint32_t seed, uint64_t index) {
  return fmix32(seed ^ (static_cast<uint32_t>(index >> 32) * 0x9E3779B9u));
}

// uniform in [0, 1) with 24 random bits (exact in float32)
PYEFF_HD float uniform01(uint32_t key, uint64_t index) {
  return static_cast<float>(fmix32(static_cast<uint32_t>(index) ^ key) >> 8) * (1.0f / 16777216.0f);
}

}  // namespace pyeff
