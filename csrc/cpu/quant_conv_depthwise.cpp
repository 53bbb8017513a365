// The depthwise route of pyeff.ops.quant_conv2d (CPU): each output channel reads one input channel
// (groups == C), so there is no reduction over channels for an int8 GEMM to win on, and oneDNN's
// int8 kernels for it (above all with a channel multiplier, or two byte slices) are slow. This
// kernel computes the integer sum sum_taps (q - zp) * w_level directly in float64: every product
// is below 2^32 and every sum below 2^53, so the accumulator is exact for every bit width, and the
// dequantising epilogue (scale, bias, ReLU) is fused. Inner loops run over the channels, which are
// contiguous in the channels_last digits, so they vectorise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace pyeff {
namespace {

struct DepthwiseArgs {
  const uint8_t* d0;  // digit slice 0, [N, H, W, C]
  const uint8_t* d1;  // digit slice 1 or nullptr
  int32_t zp;
  const double* w;    // weight levels [KH, KW, K]
  const double* fac;  // [K] a_scale * w_scale (* out_scale)
  const double* bias; // [K]
  int64_t N, C, H, W, K, m, KH, KW, OH, OW, sh, sw, ph, pw, dh, dw;
  bool relu;
};

// output rows [b, e) of (n, oh). Per row, each input row of the window is converted to q - zp
// once (float64: an integer below 2^17 in magnitude), then every tap adds a run of [ow, channel]
// products into the float64 row accumulator v [OW, K]; the epilogue is applied on the way out.
// (Measured: accumulating each tap into v beat keeping 8-channel blocks in registers across the
// taps by 4x here; the per-block tap loop did not vectorise well.)
template <typename out_t>
__attribute__((always_inline)) inline void depthwise_rows(const DepthwiseArgs& a, int64_t b, int64_t e,
                                                          double* __restrict__ v, double* __restrict__ q,
                                                          out_t* __restrict__ out) {
  const int64_t C = a.C, K = a.K, m = a.m, OW = a.OW;
  for (int64_t row = b; row < e; ++row) {
    const int64_t n = row / a.OH, oh = row % a.OH;
    for (int64_t i = 0; i < OW * K; ++i) v[i] = 0.0;
    for (int64_t kh = 0; kh < a.KH; ++kh) {
      const int64_t ih = oh * a.sh - a.ph + kh * a.dh;
      if (ih < 0 || ih >= a.H) continue;  // padding is a zero activation (q == zp)
      const int64_t off = (n * a.H + ih) * a.W * C;
      const uint8_t* __restrict__ p0 = a.d0 + off;
      if (a.d1) {
        const uint8_t* __restrict__ p1 = a.d1 + off;
        for (int64_t i = 0; i < a.W * C; ++i)
          q[i] = static_cast<double>(static_cast<int32_t>(p0[i]) + 256 * static_cast<int32_t>(p1[i]) - a.zp);
      } else {
        for (int64_t i = 0; i < a.W * C; ++i) q[i] = static_cast<double>(static_cast<int32_t>(p0[i]) - a.zp);
      }
      for (int64_t kw = 0; kw < a.KW; ++kw) {
        const double* __restrict__ wt = a.w + (kh * a.KW + kw) * K;
        // the outputs whose tap kw lands on the input: 0 <= ow * sw - pw + kw * dw < W
        const int64_t shift = kw * a.dw - a.pw;
        const int64_t lo = shift >= 0 ? 0 : (-shift + a.sw - 1) / a.sw;
        const int64_t hi = std::min<int64_t>(OW, a.W - 1 - shift < 0 ? 0 : (a.W - 1 - shift) / a.sw + 1);
        for (int64_t ow = lo; ow < hi; ++ow) {
          const double* __restrict__ src = q + (ow * a.sw + shift) * C;
          double* __restrict__ acc = v + ow * K;
          // products and sums are exact integers in float64
          if (m == 1) {
            for (int64_t c = 0; c < C; ++c) acc[c] += src[c] * wt[c];
          } else {
            for (int64_t c = 0; c < C; ++c)
              for (int64_t j = 0; j < m; ++j) acc[c * m + j] += src[c] * wt[c * m + j];
          }
        }
      }
    }
    out_t* __restrict__ o = out + (n * a.OH + oh) * OW * K;
    for (int64_t ow = 0; ow < OW; ++ow) {
      for (int64_t k = 0; k < K; ++k) {
        double y = v[ow * K + k] * a.fac[k] + a.bias[k];
        if (a.relu) y = y > 0.0 ? y : 0.0;
        o[ow * K + k] = static_cast<out_t>(y);
      }
    }
  }
}

PYEFF_CLONES void depthwise_rows_f32(const DepthwiseArgs& a, int64_t b, int64_t e, double* v, double* q, float* out) {
  depthwise_rows<float>(a, b, e, v, q, out);
}
PYEFF_CLONES void depthwise_rows_f64(const DepthwiseArgs& a, int64_t b, int64_t e, double* v, double* q, double* out) {
  depthwise_rows<double>(a, b, e, v, q, out);
}

at::Tensor depthwise_cpu(const at::Tensor& digits_in, int64_t zero_point, const at::Tensor& levels_in,
                         const at::Tensor& fac_in, const std::optional<at::Tensor>& bias_in, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, bool relu, at::ScalarType out_dtype) {
  const char* op = "pyeff::quant_conv_depthwise";
  TORCH_CHECK(digits_in.device().is_cpu() && digits_in.scalar_type() == at::kByte && digits_in.dim() == 5,
              op, ": digits must be uint8 [S, N, C, H, W] on the CPU");
  const int64_t S = digits_in.size(0), N = digits_in.size(1), C = digits_in.size(2), H = digits_in.size(3),
                W = digits_in.size(4);
  TORCH_CHECK(S == 1 || S == 2, op, ": 1 or 2 digit slices, got ", S);
  TORCH_CHECK(levels_in.dim() == 4 && levels_in.size(1) == 1, op, ": levels must be [K, 1, kh, kw]");
  const int64_t K = levels_in.size(0), KH = levels_in.size(2), KW = levels_in.size(3);
  TORCH_CHECK(C >= 1 && K % C == 0, op, ": K = ", K, " must be a multiple of C = ", C);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] >= 1 &&
                  stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && padding[0] >= 0 && padding[1] >= 0,
              op, ": stride and dilation must be >= 1 and padding >= 0 (two values each)");
  TORCH_CHECK(fac_in.numel() == K, op, ": fac needs K values");
  const int64_t OH = conv_out_size(H, KH, stride[0], padding[0], dilation[0]);
  const int64_t OW = conv_out_size(W, KW, stride[1], padding[1], dilation[1]);
  TORCH_CHECK(OH > 0 && OW > 0, op, ": empty output");
  // [S, N, H, W, C] contiguous (a no-op for quantiser output)
  at::Tensor d = digits_in.permute({0, 1, 3, 4, 2}).contiguous();
  at::Tensor w = levels_in.to(at::kCPU, at::kDouble).permute({2, 3, 0, 1}).contiguous();  // [KH, KW, K, 1]
  at::Tensor fac = fac_in.to(at::kCPU, at::kDouble).contiguous();
  at::Tensor bias = bias_in.has_value() ? bias_in->to(at::kCPU, at::kDouble).contiguous()
                                        : at::zeros({K}, fac.options());
  TORCH_CHECK(bias.numel() == K, op, ": bias needs K values");
  const auto write_type = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({N, K, OH, OW},
                             fac.options().dtype(write_type).memory_format(at::MemoryFormat::ChannelsLast));
  const uint8_t* base = d.data_ptr<uint8_t>();
  const DepthwiseArgs args{base, S == 2 ? base + N * H * W * C : nullptr, static_cast<int32_t>(zero_point),
                           w.data_ptr<double>(), fac.data_ptr<double>(), bias.data_ptr<double>(),
                           N, C, H, W, K, K / C, KH, KW, OH, OW, stride[0], stride[1], padding[0], padding[1],
                           dilation[0], dilation[1], relu};
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, OW * K * KH * KW));
  at::parallel_for(0, N * OH, grain, [&](int64_t b, int64_t e) {
    std::vector<double> v(OW * K), q(W * C);
    if (write_type == at::kDouble)
      depthwise_rows_f64(args, b, e, v.data(), q.data(), out.data_ptr<double>());
    else
      depthwise_rows_f32(args, b, e, v.data(), q.data(), out.data_ptr<float>());
  });
  return out_dtype == write_type ? out : out.to(out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyeff, CPU, m) {
  m.impl("quant_conv_depthwise", &depthwise_cpu);
}

}  // namespace pyeff
