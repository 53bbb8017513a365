// Schemas of the kernels behind pyeff.ops.fake_quant. The public op (with its checks, quantisation
// parameters, fake kernel and autograd) is declared in pyeff/ops/fake_quant.py; these are its two
// passes, each registered per device in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  // [2, channels]: row 0 the minimum, row 1 the maximum (float32, float64 for float64 input).
  m.def("fake_quant_minmax(Tensor x, int? axis) -> Tensor");
  // q = clamp(floor(x * inv_scale + zero_point + r), qmin, qmax); out = (q - zero_point) * scale
  // with r = 0.5, or r ~ U[0,1) from (seed, element index) when seed is given.
  m.def(
      "fake_quant_apply(Tensor x, Tensor scale, Tensor inv_scale, Tensor zero_point, int qmin, "
      "int qmax, int? axis, int? seed) -> Tensor");
}
