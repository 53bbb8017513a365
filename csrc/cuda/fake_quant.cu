// CUDA kernels of pyeff.ops.fake_quant. Per-block partial minima/maxima (NaN-propagating), folded
// by a second tiny launch; then one element-wise pass. Explicit _rn intrinsics keep the arithmetic
// free of fused multiply-adds, so results match the PyTorch reference bit for bit.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cfloat>
#include <limits>

#include "../common.h"

namespace pyeff {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t nan_min(acc_t a, acc_t b) {
  return (a != a || b != b) ? NAN : (b < a ? b : a);
}
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || b != b) ? NAN : (b > a ? b : a);
}

template <typename acc_t>
__device__ __forceinline__ void block_minmax(acc_t& lo, acc_t& hi) {
  __shared__ acc_t slo[kThreads / 32], shi[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) {
    lo = nan_min(lo, __shfl_down_sync(0xffffffffu, lo, off));
    hi = nan_max(hi, __shfl_down_sync(0xffffffffu, hi, off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    slo[warp] = lo;
    shi[warp] = hi;
  }
  __syncthreads();
  if (warp == 0) {
    lo = lane < kThreads / 32 ? slo[lane] : slo[0];
    hi = lane < kThreads / 32 ? shi[lane] : shi[0];
    for (int off = 16; off > 0; off >>= 1) {
      lo = nan_min(lo, __shfl_down_sync(0xffffffffu, lo, off));
      hi = nan_max(hi, __shfl_down_sync(0xffffffffu, hi, off));
    }
  }
}

// grid (splits, channels): block (s, c) reduces its share of channel c's outer*inner values into
// partial[0, c, s] (minimum) and partial[1, c, s] (maximum).
template <typename scalar_t, typename acc_t>
__global__ void minmax_partial_kernel(const scalar_t* __restrict__ x, acc_t* __restrict__ partial,
                                      int64_t outer, int64_t C, int64_t inner) {
  const int64_t c = blockIdx.y;
  const int64_t per_channel = outer * inner;
  const int64_t splits = gridDim.x;
  acc_t lo = INFINITY, hi = -INFINITY;
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < per_channel;
       j += splits * (int64_t)blockDim.x) {
    int64_t offset = j;  // per-tensor: no index arithmetic
    if (C > 1) {
      const int64_t o = j / inner, i = j - o * inner;
      offset = (o * C + c) * inner + i;
    }
    const acc_t v = static_cast<acc_t>(x[offset]);
    lo = nan_min(lo, v);
    hi = nan_max(hi, v);
  }
  block_minmax(lo, hi);
  if (threadIdx.x == 0) {
    partial[c * splits + blockIdx.x] = lo;
    partial[(C + c) * splits + blockIdx.x] = hi;
  }
}

template <typename acc_t>
__global__ void minmax_fold_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out,
                                   int64_t C, int64_t splits) {
  const int64_t c = blockIdx.x;
  acc_t lo = INFINITY, hi = -INFINITY;
  for (int64_t s = threadIdx.x; s < splits; s += blockDim.x) {
    lo = nan_min(lo, partial[c * splits + s]);
    hi = nan_max(hi, partial[(C + c) * splits + s]);
  }
  block_minmax(lo, hi);
  if (threadIdx.x == 0) {
    out[c] = lo;
    out[C + c] = hi;
  }
}

at::Tensor minmax_cuda(const at::Tensor& x_in, std::optional<int64_t> axis) {
  TORCH_CHECK(x_in.is_cuda(), "pyeff::fake_quant_minmax (CUDA kernel): x must be on a CUDA device");
  TORCH_CHECK(x_in.numel() > 0, "pyeff::fake_quant_minmax: x is empty");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  const ChannelLayout l = channel_layout(x, axis);
  const bool is_double = x.scalar_type() == at::kDouble;
  auto acc_opts = x.options().dtype(is_double ? at::kDouble : at::kFloat);
  const int64_t per_channel = l.outer * l.inner;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t want = (per_channel + kThreads * 8 - 1) / (kThreads * 8);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, std::max<int64_t>(1, 4 * sms / l.channels)));
  TORCH_CHECK(l.channels <= 65535, "pyeff::fake_quant_minmax: at most 65535 channels on CUDA");
  at::Tensor partial = at::empty({2, l.channels, splits}, acc_opts);
  at::Tensor out = at::empty({2, l.channels}, acc_opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_minmax", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    minmax_partial_kernel<scalar_t, acc_t><<<dim3(splits, l.channels), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), l.outer, l.channels, l.inner);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    minmax_fold_kernel<acc_t><<<l.channels, kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), out.data_ptr<acc_t>(), l.channels, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// dequantised values saturate at +-omax, the output dtype's largest finite value
__device__ __forceinline__ float fq_round(float x, float inv, float zp, float r, float qmin,
                                          float qmax, float scale, float omax) {
  float q = floorf(__fadd_rn(__fadd_rn(__fmul_rn(x, inv), zp), r));
  q = fminf(fmaxf(q, qmin), qmax);
  return fminf(fmaxf(__fmul_rn(__fsub_rn(q, zp), scale), -omax), omax);
}
__device__ __forceinline__ double fq_round(double x, double inv, double zp, double r, double qmin,
                                           double qmax, double scale, double omax) {
  double q = floor(__dadd_rn(__dadd_rn(__dmul_rn(x, inv), zp), r));
  q = fmin(fmax(q, qmin), qmax);
  return fmin(fmax(__dmul_rn(__dsub_rn(q, zp), scale), -omax), omax);
}

template <typename scalar_t, typename acc_t>
__global__ void apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n,
                             int64_t C, int64_t inner, const acc_t* __restrict__ scale,
                             const acc_t* __restrict__ inv, const acc_t* __restrict__ zp,
                             acc_t qmin, acc_t qmax, bool stochastic, uint32_t seed, acc_t omax) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = C == 1 ? 0 : (i / inner) % C;
    const acc_t r = stochastic ? static_cast<acc_t>(uniform01(rounding_key(seed, i), i)) : acc_t(0.5);
    y[i] = static_cast<scalar_t>(
        fq_round(static_cast<acc_t>(x[i]), inv[c], zp[c], r, qmin, qmax, scale[c], omax));
  }
}

at::Tensor apply_cuda(const at::Tensor& x_in, const at::Tensor& scale_in, const at::Tensor& inv_in,
                      const at::Tensor& zp_in, int64_t qmin, int64_t qmax,
                      std::optional<int64_t> axis, std::optional<int64_t> seed) {
  TORCH_CHECK(x_in.is_cuda(), "pyeff::fake_quant_apply (CUDA kernel): x must be on a CUDA device");
  TORCH_CHECK(qmin < qmax, "pyeff::fake_quant_apply: qmin (", qmin, ") must be below qmax (", qmax, ")");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous();
  const ChannelLayout l = channel_layout(x, axis);
  const bool is_double = x.scalar_type() == at::kDouble;
  const auto acc = is_double ? at::kDouble : at::kFloat;
  at::Tensor scale = scale_in.to(x.device(), acc).contiguous().view(-1);
  at::Tensor inv = inv_in.to(x.device(), acc).contiguous().view(-1);
  at::Tensor zp = zp_in.to(x.device(), acc).contiguous().view(-1);
  TORCH_CHECK(scale.numel() == l.channels && inv.numel() == l.channels && zp.numel() == l.channels,
              "pyeff::fake_quant_apply: scale, inv_scale and zero_point need ", l.channels,
              " values (one per channel)");
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(sms) * 16);
  const bool stochastic = seed.has_value();
  const uint32_t s = stochastic ? static_cast<uint32_t>(*seed & 0xFFFFFFFF) : 0u;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fake_quant_apply", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    apply_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, l.channels, l.inner,
        scale.data_ptr<acc_t>(), inv.data_ptr<acc_t>(), zp.data_ptr<acc_t>(), acc_t(qmin),
        acc_t(qmax), stochastic, s, static_cast<acc_t>(std::numeric_limits<scalar_t>::max()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CUDA, m) {
  m.impl("fake_quant_minmax", &minmax_cuda);
  m.impl("fake_quant_apply", &apply_cuda);
}

}  // namespace pyeff
