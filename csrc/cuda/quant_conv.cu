// CUDA kernels of pyeff.ops.quant_conv2d: quantise to channels_last byte digits, im2col of the
// digits into int8 columns (u - 128), and the fused dequantising epilogue. The int8 GEMM between
// them is at::_int_mm (cuBLASLt, int8 tensor cores), called from pyeff/ops/quant_conv.py.
// Explicit _rn intrinsics keep the rounding free of fused multiply-adds (as fake_quant_apply).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"

namespace pyeff {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int32_t level(float x, float inv, float zp, float qmax) {
  float q = floorf(__fadd_rn(__fadd_rn(__fmul_rn(x, inv), zp), 0.5f));
  return static_cast<int32_t>(fminf(fmaxf(q, 0.f), qmax));
}
__device__ __forceinline__ int32_t level(double x, double inv, double zp, double qmax) {
  double q = floor(__dadd_rn(__dadd_rn(__dmul_rn(x, inv), zp), 0.5));
  return static_cast<int32_t>(fmin(fmax(q, 0.0), qmax));
}

// one thread per element of the output [S, N, H, W, C]; reads x through its strides
template <typename scalar_t>
__global__ void quantize_kernel(const scalar_t* __restrict__ x, uint8_t* __restrict__ out, int64_t N, int64_t C,
                                int64_t H, int64_t W, int64_t sn, int64_t sc, int64_t sh, int64_t sw, int slices,
                                scalar_t inv, scalar_t zp, scalar_t qmax) {
  const int64_t total = N * H * W * C;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = i % C, w = (i / C) % W, h = (i / (C * W)) % H, n = i / (C * W * H);
    const int32_t q = level(x[n * sn + c * sc + h * sh + w * sw], inv, zp, qmax);
    for (int s = 0; s < slices; ++s) out[s * total + i] = static_cast<uint8_t>((q >> (8 * s)) & 255);
  }
}

at::Tensor quantize_cuda(const at::Tensor& x_in, const at::Tensor& inv_scale, const at::Tensor& zero_point,
                         int64_t qmax, int64_t slices) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 4, "pyeff::quant_conv_quantize (CUDA kernel): x must be 4-D on a GPU");
  TORCH_CHECK(slices >= 1 && slices <= 2 && qmax >= 1 && qmax < (int64_t{1} << (8 * slices)),
              "pyeff::quant_conv_quantize: qmax does not fit the slices");
  c10::cuda::CUDAGuard guard(x_in.device());
  const bool is_double = x_in.scalar_type() == at::kDouble;
  at::Tensor x = x_in.to(is_double ? at::kDouble : at::kFloat);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({slices, N, H, W, C}, x.options().dtype(at::kByte));
  const int64_t total = N * H * W * C;
  if (total > 0) {
    const double inv_d = inv_scale.to(at::kCPU, at::kDouble).item<double>();
    const double zp_d = zero_point.to(at::kCPU, at::kDouble).item<double>();
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "quant_conv_quantize_cuda", [&] {
      quantize_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), out.data_ptr<uint8_t>(), N, C, H, W, x.stride(0), x.stride(1), x.stride(2),
          x.stride(3), int(slices), scalar_t(inv_d), scalar_t(zp_d), scalar_t(qmax));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out.permute({0, 1, 4, 2, 3});
}

struct ConvGeom {
  int64_t N, C, H, W, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw, Cg, Kd, M, k_pad, S, G;
};

// one thread per output byte of [G, S*M, k_pad]
__global__ void im2col_kernel(const uint8_t* __restrict__ d, int8_t* __restrict__ cols, ConvGeom g,
                              const int32_t* __restrict__ pad_digits) {
  const int64_t total = g.G * g.S * g.M * g.k_pad;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t col = i % g.k_pad, r = i / g.k_pad;
    const int64_t grp = r / (g.S * g.M), j = (r / g.M) % g.S, m = r % g.M;
    int8_t v = 0;
    if (col < g.Kd) {
      const int64_t c = col % g.Cg, kw = (col / g.Cg) % g.KW, kh = col / (g.Cg * g.KW);
      const int64_t n = m / (g.OH * g.OW), oh = (m / g.OW) % g.OH, ow = m % g.OW;
      const int64_t ih = oh * g.sh - g.ph + kh * g.dh, iw = ow * g.sw - g.pw + kw * g.dw;
      const uint8_t u = (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W)
                            ? static_cast<uint8_t>(pad_digits[j])
                            : d[(((j * g.N + n) * g.H + ih) * g.W + iw) * g.C + grp * g.Cg + c];
      v = static_cast<int8_t>(u ^ 0x80);
    }
    cols[i] = v;
  }
}

at::Tensor im2col_cuda(const at::Tensor& digits, at::IntArrayRef pad_digits, at::IntArrayRef kernel,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                       int64_t k_pad) {
  TORCH_CHECK(digits.is_cuda() && digits.scalar_type() == at::kByte && digits.dim() == 5,
              "pyeff::quant_conv_im2col (CUDA kernel): digits must be uint8 [S, N, C, H, W] on a GPU");
  c10::cuda::CUDAGuard guard(digits.device());
  ConvGeom g;
  g.S = digits.size(0); g.N = digits.size(1); g.C = digits.size(2); g.H = digits.size(3); g.W = digits.size(4);
  g.KH = kernel[0]; g.KW = kernel[1]; g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1];
  g.dh = dilation[0]; g.dw = dilation[1]; g.G = groups; g.Cg = g.C / groups;
  g.OH = conv_out_size(g.H, g.KH, g.sh, g.ph, g.dh);
  g.OW = conv_out_size(g.W, g.KW, g.sw, g.pw, g.dw);
  g.Kd = g.Cg * g.KH * g.KW; g.M = g.N * g.OH * g.OW; g.k_pad = k_pad;
  TORCH_CHECK(static_cast<int64_t>(pad_digits.size()) == g.S && k_pad >= g.Kd, "pyeff::quant_conv_im2col: bad arguments");
  at::Tensor d = digits.permute({0, 1, 3, 4, 2}).contiguous();
  std::vector<int32_t> pads(pad_digits.begin(), pad_digits.end());
  at::Tensor pad_t = at::tensor(pads, at::TensorOptions().dtype(at::kInt)).to(digits.device());
  at::Tensor cols = at::empty({groups, g.S * g.M, k_pad}, digits.options().dtype(at::kChar));
  const int64_t total = cols.numel();
  if (total > 0) {
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
    im2col_kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        d.data_ptr<uint8_t>(), cols.data_ptr<int8_t>(), g, pad_t.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return cols;
}

constexpr int kMaxAcc = 64;
template <typename acc_t>
struct AccPtrs {
  const acc_t* p[kMaxAcc];
  int64_t ld[kMaxAcc];
};

// one thread per output element (m, k); out is [M, K] (channels_last)
template <typename acc_t, typename out_t>
__global__ void epilogue_kernel(AccPtrs<acc_t> acc, const double* __restrict__ corr, const double* __restrict__ rowsum,
                                const double* __restrict__ w_scale, const double* __restrict__ bias,
                                out_t* __restrict__ out, int64_t M, int64_t K, int64_t G, int64_t S_a, int64_t S_w,
                                double a_scale) {
  const int64_t Kg = K / G, cols = S_w * Kg;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < M * K; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t m = i / K, k = i % K, g = k / Kg, kk = k % Kg;
    double v = 0;
    for (int64_t j = 0; j < S_a; ++j) {
      const acc_t* row = acc.p[j * G + g] + m * acc.ld[j * G + g];
      for (int64_t l = 0; l < S_w; ++l)
        v += ldexp(static_cast<double>(row[l * Kg + kk]) + corr[(j * G + g) * cols + l * Kg + kk], int(8 * (j + l)));
    }
    if (rowsum) v += 128.0 * rowsum[m * G + g];
    double r = __dmul_rn(v, __dmul_rn(a_scale, w_scale[k]));
    if (bias) r = __dadd_rn(r, bias[k]);
    out[i] = static_cast<out_t>(r);
  }
}

at::Tensor epilogue_cuda(at::TensorList acc_in, const at::Tensor& corr_in, int64_t slices_w,
                         const std::optional<at::Tensor>& rowsum_in, double a_scale, const at::Tensor& w_scale_in,
                         const std::optional<at::Tensor>& bias_in, at::IntArrayRef out_shape, at::ScalarType out_dtype) {
  TORCH_CHECK(out_shape.size() == 4 && corr_in.dim() == 2, "pyeff::quant_conv_epilogue: bad arguments");
  const int64_t N = out_shape[0], K = out_shape[1], OH = out_shape[2], OW = out_shape[3], M = N * OH * OW;
  const int64_t S_a = corr_in.size(0);
  const int64_t G = acc_in.size() / S_a;
  TORCH_CHECK(static_cast<int64_t>(acc_in.size()) == S_a * G && acc_in.size() <= kMaxAcc && K % G == 0,
              "pyeff::quant_conv_epilogue: acc must hold S_a * G (<= 64) tensors");
  c10::cuda::CUDAGuard guard(acc_in[0].device());
  const auto dev = acc_in[0].device();
  const auto acc_type = acc_in[0].scalar_type();
  TORCH_CHECK(acc_type == at::kInt || acc_type == at::kFloat, "pyeff::quant_conv_epilogue: acc must be int32 or float32");
  std::vector<at::Tensor> acc;
  for (const auto& a : acc_in) {
    TORCH_CHECK(a.is_cuda() && a.scalar_type() == acc_type && a.dim() == 2 && a.size(0) == M,
                "pyeff::quant_conv_epilogue: each acc must be [M, cols] on the GPU");
    acc.push_back(a.stride(1) == 1 ? a : a.contiguous());
  }
  auto dopt = at::TensorOptions().device(dev).dtype(at::kDouble);
  at::Tensor corr = corr_in.to(dopt).contiguous();
  at::Tensor w_scale = w_scale_in.to(dopt).contiguous();
  at::Tensor bias = bias_in.has_value() ? bias_in->to(dopt).contiguous() : at::Tensor();
  at::Tensor rowsum = rowsum_in.has_value() ? rowsum_in->to(dopt).contiguous() : at::Tensor();
  const auto write_type = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  // allocated as channels_last (NHWC memory) rather than permuted: a view would make the public op's
  // output a view, which autograd then refuses to modify in place (torch.relu_(y))
  at::Tensor out = at::empty({N, K, OH, OW}, dopt.dtype(write_type).memory_format(at::MemoryFormat::ChannelsLast));
  if (M * K > 0) {
    const int64_t blocks = std::min<int64_t>((M * K + kThreads - 1) / kThreads, 65535);
    auto stream = at::cuda::getCurrentCUDAStream();
    auto launch = [&](auto acc_tag, auto out_tag) {
      using acc_t = decltype(acc_tag);
      using out_t = decltype(out_tag);
      AccPtrs<acc_t> ptrs;
      for (size_t i = 0; i < acc.size(); ++i) {
        ptrs.p[i] = acc[i].data_ptr<acc_t>();
        ptrs.ld[i] = acc[i].stride(0);
      }
      epilogue_kernel<acc_t, out_t><<<blocks, kThreads, 0, stream>>>(
          ptrs, corr.data_ptr<double>(), rowsum.defined() ? rowsum.data_ptr<double>() : nullptr,
          w_scale.data_ptr<double>(), bias.defined() ? bias.data_ptr<double>() : nullptr, out.data_ptr<out_t>(), M, K,
          G, S_a, slices_w, a_scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (acc_type == at::kInt) {
      if (write_type == at::kDouble) launch(int32_t{}, double{}); else launch(int32_t{}, float{});
    } else {
      if (write_type == at::kDouble) launch(float{}, double{}); else launch(float{}, float{});
    }
  }
  return out_dtype == write_type ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CUDA, m) {
  m.impl("quant_conv_quantize", &quantize_cuda);
  m.impl("quant_conv_im2col", &im2col_cuda);
  m.impl("quant_conv_epilogue", &epilogue_cuda);
}

}  // namespace pyeff
