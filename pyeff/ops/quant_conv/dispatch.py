"""Backend choice and the call of the chosen backend's kernels."""
import torch
from torch import Tensor

from pyeff import _extension
from pyeff.ops import _backend
from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.quant_conv.native import run_native
from pyeff.ops.quant_conv.reference import quant_conv2d_reference
from pyeff.ops.quant_conv.triton import run_triton
from pyeff.ops.quant_conv.weights import WeightForms

# fastest first, as measured by bench/quant_conv.py
PREFERENCE = {"cpu": ("native",), "cuda": ("native", "triton")}
KERNEL_OPS = ("quant_conv_quantize", "quant_conv_quantize_auto", "quant_conv_im2col", "quant_conv_window_sums",
              "quant_conv_epilogue")


_built = False


def native_ops_built() -> bool:
    global _built  # once true, true for good (asked on every call)
    _built = _built or (_extension.loaded() and all(hasattr(torch.ops.pyeff, n) for n in KERNEL_OPS))
    return _built


def resolve(device: torch.device, backend: str) -> str:
    choice = _backend.resolve("quant_conv2d", device, backend, PREFERENCE)
    if choice == "native" and not native_ops_built():
        if backend not in (None, "", "auto"):
            raise RuntimeError("pyeff.ops.quant_conv2d: backend 'native' is not usable: pyeff._C was built without "
                               "the quant_conv kernels (rebuild with pip install --no-build-isolation -e .)")
        return "reference"
    return choice


def run(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend, a_range, out_scale, relu,
        forms: WeightForms) -> Tensor:
    """The op's output from the resolved `backend`, weight forms from `forms`."""
    if x.shape[0] == 0:
        OH, OW = conv_out_hw(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
        return x.new_empty((0, weight.shape[0], OH, OW)).contiguous(memory_format=torch.channels_last)
    if backend == "reference":
        return quant_conv2d_reference(x, weight, bias, stride, padding, dilation, groups, w_bits=w_bits,
                                      a_bits=a_bits, a_range=a_range, out_scale=out_scale, relu=relu)
    kernel = run_native if backend == "native" else run_triton
    return kernel(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range, out_scale, relu,
                  forms)
