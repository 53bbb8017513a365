// Schema of the kernel behind the exact step of pyeff.ops.psg_conv2d_weight_grad. The public op
// (checks, the int8 predictor, the choice between whole exact rows and single entries) lives in
// pyeff/ops/psg.py; this kernel is registered per device in cpu/ and cuda/ (Triton: kernels/psg.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  // out[e] = the weight gradient of a convolution at the flat index index[e] of a weight of shape
  // weight_shape = [K, C / groups, kh, kw]:
  //   sum over n, oh, ow of grad_out[n, k, oh, ow] * x[n, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw]
  // (zero outside x). x [N, C, H, W], grad_out [N, K, OH, OW], index int64 [E], sorted ascending.
  // Only the listed entries are computed: the cost is E * N * OH * OW multiply-adds.
  m.def(
      "psg_exact_entries(Tensor x, Tensor grad_out, Tensor index, int[4] weight_shape, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor");
}
