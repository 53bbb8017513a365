// CUDA kernel of pyeff::psg_exact_entries (schema in ../psg.cpp): one block per listed entry of a
// convolution's weight gradient. The block's threads stride over the N * OH * OW output positions,
// each accumulating grad_out * x in the input's dtype (float32 or float64), then the block reduces its
// partial sums in shared memory. Any stride, padding, dilation and groups.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"

namespace pyeff {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void psg_exact_entries_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                         const int64_t* __restrict__ index, scalar_t* __restrict__ out, int64_t N,
                                         int C, int H, int W, int K, int OH, int OW, int Cg, int Kg, int KH, int KW,
                                         int sh, int sw, int ph, int pw, int dh, int dw) {
  __shared__ acc_t partial[kThreads];
  const int64_t flat = index[blockIdx.x];
  const int taps = KH * KW;
  const int k = static_cast<int>(flat / (static_cast<int64_t>(Cg) * taps));
  const int rest = static_cast<int>(flat % (static_cast<int64_t>(Cg) * taps));
  const int c = (k / Kg) * Cg + rest / taps, i = (rest % taps) / KW, j = rest % KW;
  const int64_t plane_out = static_cast<int64_t>(OH) * OW, positions = N * plane_out;
  acc_t acc = acc_t(0);
  for (int64_t p = threadIdx.x; p < positions; p += blockDim.x) {
    const int64_t n = p / plane_out;
    const int q = static_cast<int>(p - n * plane_out), oh = q / OW, ow = q - oh * OW;
    const int ih = oh * sh - ph + i * dh, iw = ow * sw - pw + j * dw;
    if (ih >= 0 && ih < H && iw >= 0 && iw < W) {
      acc += static_cast<acc_t>(g[(n * K + k) * plane_out + q]) *
             static_cast<acc_t>(x[((n * C + c) * H + ih) * W + iw]);
    }
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<scalar_t>(partial[0]);
}

at::Tensor psg_exact_entries_cuda(const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& index_in,
                                  at::IntArrayRef weight_shape, at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x_in.dim() == 4 && g_in.dim() == 4, "pyeff::psg_exact_entries: x and grad_out must be 4-D");
  TORCH_CHECK(x_in.scalar_type() == g_in.scalar_type(), "pyeff::psg_exact_entries: x and grad_out dtypes differ");
  TORCH_CHECK(index_in.scalar_type() == at::kLong && index_in.dim() == 1,
              "pyeff::psg_exact_entries: index must be a 1-D int64 tensor");
  TORCH_CHECK(weight_shape.size() == 4 && groups >= 1, "pyeff::psg_exact_entries: bad weight_shape / groups");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), g = g_in.contiguous(), index = index_in.contiguous();
  const int64_t E = index.numel();
  at::Tensor out = at::empty({E}, x.options());
  if (E == 0) return out;
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(1) == weight_shape[0] && x.size(1) == weight_shape[1] * groups,
              "pyeff::psg_exact_entries: x, grad_out and weight_shape disagree");
  TORCH_CHECK(E < (int64_t{1} << 31), "pyeff::psg_exact_entries: too many entries for one launch");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "psg_exact_entries_cuda", [&] {
    using acc_t = scalar_t;  // float32 or float64 only: each accumulates in its own width
    psg_exact_entries_kernel<scalar_t, acc_t><<<static_cast<unsigned>(E), kThreads, 0,
                                               at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        x.size(0), x.size(1), x.size(2), x.size(3), g.size(1), g.size(2), g.size(3), weight_shape[1],
        weight_shape[0] / groups, weight_shape[2], weight_shape[3], stride[0], stride[1], padding[0], padding[1],
        dilation[0], dilation[1]);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CUDA, m) { m.impl("psg_exact_entries", &psg_exact_entries_cuda); }

}  // namespace pyeff
