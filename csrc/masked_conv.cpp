// Schemas of the kernels behind pyeff.ops.masked_conv2d. The public op (checks, choice of
// strategy, fake kernels, autograd) lives in pyeff/ops/masked_conv.py; these kernels are
// registered per device in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  // y[n, k] = (k active in out_mask[n]) ? bias[k] + sum over active c of w[k, c] (*) x[n, c] : 0
  // x [N, C, H, W], weight [K, C / groups, kh, kw], in_mask [N, C] bool, out_mask [N, K] bool.
  // Inactive input channels are never read and inactive outputs are written as exact zeros.
  m.def(
      "masked_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor in_mask, Tensor out_mask, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // grad_weight[k, c] = sum over samples n where k and c are both active of
  // grad_out[n, k] (*) x[n, c]: the weight gradient of masked_conv2d_fwd (zero where no sample
  // has the pair active).
  m.def(
      "masked_conv2d_weight_grad(Tensor grad_out, Tensor x, Tensor in_mask, Tensor out_mask, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
}
