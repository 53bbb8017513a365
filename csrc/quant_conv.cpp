// Schemas of the kernels behind pyeff.ops.quant_conv2d / quant_linear. The public op (checks,
// quantisation parameters, weight slicing, fake kernel, autograd, backend choice) is declared in
// pyeff/ops/quant_conv.py; these are its compiled passes, registered per device in cpu/ and cuda/.
//
// Integer scheme (see pyeff/ops/quant_conv.py for the derivation):
//   activation levels q in [0, qmax], zero point zp; a b-bit level is split into S_a = ceil(b/8)
//   unsigned base-256 digits u_j (slice j holds (q >> 8j) & 255), zero-point digits z_j likewise;
//   weight levels are split into S_w signed int8 digits in Python.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  // x [N, C, H, W] (float) -> uint8 [S, N, C, H, W] whose slices are channels_last; slice j holds
  // digit j of q = clamp(floor(x * inv_scale + zero_point + 0.5), 0, qmax), computed exactly as
  // fake_quant_apply does (float32, float64 for float64 input).
  m.def("quant_conv_quantize(Tensor x, Tensor inv_scale, Tensor zero_point, int qmax, int slices) -> Tensor");
  // the CPU front end: the range (a_range, or x's min-max), the parameters of the asymmetric
  // quantiser (fake_quant's, bit for bit) and the digits, in one call. Returns (digits, float64
  // [scale, inv_scale, zero_point, lo, hi]); digits are empty when the range is not finite.
  m.def("quant_conv_quantize_auto(Tensor x, float[]? a_range, int qmax, int slices) -> (Tensor, Tensor)");
  // digits [S, N, C, H, W] (channels_last slices, from quant_conv_quantize) -> int8 columns
  // [G, S * M, k_pad] with M = N*OH*OW rows (n, oh, ow) and columns (kh, kw, c) of group g;
  // value u - 128, padding positions hold pad_digits[j] - 128, columns past C/G*kh*kw hold 0.
  m.def(
      "quant_conv_im2col(Tensor digits, int[] pad_digits, int[] kernel, int[] stride, int[] padding, "
      "int[] dilation, int groups, int k_pad) -> Tensor");
  // digits [S, N, C, H, W] -> float64 [N*OH*OW, G]: per output position and group, the sum over
  // its window of (q - zp) = sum_j 256^j (u_j - zero_digits[j]); padding counts 0 (CPU only)
  m.def(
      "quant_conv_window_sums(Tensor digits, int[] zero_digits, int groups, int[] kernel, int[] stride, "
      "int[] padding, int[] dilation) -> Tensor");
  // out[n, g*Kg + k, oh, ow] (channels_last, dtype out_dtype) =
  //   v * a_scale * w_scale[k] + bias[k], with the exact integer
  //   v = sum_j sum_l 256^(j+l) T_j[m, l*Kg + k] + 128 * rowsum[m, g],
  //   T_j = acc[j*G + g] (int32 or float32 holding integers, [M, cols] with unit column stride)
  //         + corr[j, g*cols + column]  (float64 [S_a, G*cols], cols = S_w*Kg); rowsum (float64
  //   [M, G], optional) = sum of (q - zp) over row m's window in group g (for offset weights).
  // the depthwise route (CPU only; groups == C, K = m * C): out[n, k, oh, ow] (channels_last) =
  //   fac[k] * sum over the window of (q - zero_point) * levels[k, 0, kh, kw] + bias[k], ReLU'd if
  //   relu; the sum is exact (float64), the output in out_dtype
  m.def(
      "quant_conv_depthwise(Tensor digits, int zero_point, Tensor levels, Tensor fac, Tensor? bias, int[] stride, "
      "int[] padding, int[] dilation, bool relu, ScalarType out_dtype) -> Tensor");
  m.def(
      "quant_conv_epilogue(Tensor[] acc, Tensor corr, int slices_w, Tensor? rowsum, float a_scale, "
      "Tensor w_scale, Tensor? bias, int[] out_shape, ScalarType out_dtype) -> Tensor");
}
