// CUDA kernel of pyeff.ops.masked_conv2d: a direct convolution with one block per
// (pixel tile, output channel, sample). A block whose output channel is inactive for its sample only
// writes zeros; active blocks loop over the active input channels of their sample (the test is
// uniform across the block, so there is no divergence) and accumulate in float32 (float64 for
// float64). Any stride, padding, dilation and groups. The weight gradient on CUDA is computed by the
// caller with cuDNN on the masked tensors (pyeff/ops/masked_conv.py).
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
__global__ void masked_conv2d_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                         const scalar_t* __restrict__ bias, const bool* __restrict__ in_mask,
                                         const bool* __restrict__ out_mask, scalar_t* __restrict__ y,
                                         int C, int K, int H, int W, int OH, int OW, int KH, int KW, int sh,
                                         int sw, int ph, int pw, int dh, int dw, int groups) {
  const int k = blockIdx.y;
  const int64_t n = blockIdx.z;
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  const int OHW = OH * OW;
  if (q >= OHW) return;
  scalar_t* out = y + (n * K + k) * OHW + q;
  if (!out_mask[n * K + k]) {
    *out = scalar_t(0);
    return;
  }
  const int oh = q / OW, ow = q - oh * OW;
  const int Cg = C / groups, Kg = K / groups, g = k / Kg;
  acc_t acc = bias ? static_cast<acc_t>(bias[k]) : acc_t(0);
  for (int cl = 0; cl < Cg; ++cl) {
    const int c = g * Cg + cl;
    if (!in_mask[n * C + c]) continue;
    const scalar_t* xc = x + (n * C + c) * static_cast<int64_t>(H) * W;
    const scalar_t* wk = w + (static_cast<int64_t>(k) * Cg + cl) * KH * KW;
    for (int a = 0; a < KH; ++a) {
      const int ih = oh * sh - ph + a * dh;
      if (ih < 0 || ih >= H) continue;
      for (int b = 0; b < KW; ++b) {
        const int iw = ow * sw - pw + b * dw;
        if (iw < 0 || iw >= W) continue;
        acc += static_cast<acc_t>(xc[ih * W + iw]) * static_cast<acc_t>(wk[a * KW + b]);
      }
    }
  }
  *out = static_cast<scalar_t>(acc);
}

at::Tensor masked_conv2d_fwd_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                                  const std::optional<at::Tensor>& bias_in, const at::Tensor& in_mask_in,
                                  const at::Tensor& out_mask_in, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "pyeff::masked_conv2d_fwd (CUDA kernel)";
  TORCH_CHECK(x_in.is_cuda() && w_in.is_cuda() && in_mask_in.is_cuda() && out_mask_in.is_cuda(), op,
              ": all tensors must be on the GPU");
  TORCH_CHECK(x_in.dim() == 4 && w_in.dim() == 4, op, ": x and weight must be 4-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation need two values");
  TORCH_CHECK(in_mask_in.scalar_type() == at::kBool && out_mask_in.scalar_type() == at::kBool, op,
              ": masks must be bool");
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t K = w_in.size(0), KH = w_in.size(2), KW = w_in.size(3);
  TORCH_CHECK(groups >= 1 && C % groups == 0 && K % groups == 0 && w_in.size(1) * groups == C, op,
              ": channels do not match groups");
  TORCH_CHECK(in_mask_in.sizes() == at::IntArrayRef({N, C}) && out_mask_in.sizes() == at::IntArrayRef({N, K}),
              op, ": masks must be [N, C] and [N, K]");
  TORCH_CHECK(K <= 65535 && N <= 65535, op, ": at most 65535 samples and output channels");
  const int64_t OH = conv_out_size(H, KH, stride[0], padding[0], dilation[0]);
  const int64_t OW = conv_out_size(W, KW, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(OH > 0 && OW > 0, op, ": the output would be empty");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = x_in.contiguous(), w = w_in.to(x_in.scalar_type()).contiguous();
  at::Tensor in_mask = in_mask_in.contiguous(), out_mask = out_mask_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(x.scalar_type()).contiguous();
  TORCH_CHECK(!bias.defined() || (bias.is_cuda() && bias.dim() == 1 && bias.size(0) == K), op,
              ": bias must be [K] on the GPU");
  at::Tensor y = at::empty({N, K, OH, OW}, x.options());
  if (N == 0) return y;
  const dim3 grid((OH * OW + kThreads - 1) / kThreads, K, N);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    masked_conv2d_fwd_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), bias.defined() ? bias.data_ptr<scalar_t>() : nullptr,
        in_mask.data_ptr<bool>(), out_mask.data_ptr<bool>(), y.data_ptr<scalar_t>(), C, K, H, W, OH, OW,
        KH, KW, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CUDA, m) { m.impl("masked_conv2d_fwd", &masked_conv2d_fwd_cuda); }

}  // namespace pyeff
