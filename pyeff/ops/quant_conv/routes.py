"""Which route the native CPU backend takes: decided here and nowhere else.

  "direct": one oneDNN int8 convolution with the dequantisation, bias and ReLU fused (<= 8 bits
            both, float32-exact output: not for float64 inputs);
  "sliced": one oneDNN int8 convolution per activation byte slice with unit scales, combined by
            pyeff's epilogue; needs every slice accumulator below 2^24, exact in oneDNN's float32
            output (checked from the weights' L1 norms and the zero-point digits);
  "gemm":   pyeff's im2col of the digits, at::_int_mm (int32 accumulation) and epilogue: exact in
            float64 for every width; the only route without VNNI/AMX (where oneDNN halves int8
            weights to dodge 16-bit saturation, which is not exact) or oneDNN.
CPU_PATH_ENV=gemm forces the last (tests, benchmarks); auto and onednn let the rules decide.
"""
import functools
import os
from pathlib import Path

import torch
from torch import Tensor

from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.quant_conv.reference import activation_params, fixed_range
from pyeff.ops.quant_conv.slicing import act_slices, digit_max, zero_point_digits
from pyeff.ops.quant_conv.weights import WeightForms, digits

CPU_PATH_ENV = "PYEFF_QUANT_CONV_CPU_PATH"
CPU_PATHS = ("auto", "onednn", "gemm")
ROUTES = ("direct", "sliced", "gemm")
_EXACT_F32 = 1 << 24  # integers below this are exact in float32


@functools.lru_cache(maxsize=None)
def cpu_has_int8_dot() -> bool:
    """True where oneDNN's int8 kernels are exact: AVX512-VNNI, AVX-VNNI or AMX-INT8."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return False


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise") \
        and torch.backends.mkldnn.is_available()


def _onednn_allowed() -> bool:
    forced = os.environ.get(CPU_PATH_ENV, "auto").lower()
    if forced not in CPU_PATHS:
        raise ValueError(f"pyeff.ops.quant_conv2d: {CPU_PATH_ENV} must be one of {', '.join(CPU_PATHS)}, "
                         f"got {forced!r}")
    return forced != "gemm" and cpu_has_int8_dot() and onednn_available()


def _single_slice(x_dtype: torch.dtype, w_bits: int, a_bits: int) -> bool:
    return a_bits <= 8 and w_bits <= 8 and x_dtype != torch.float64


@functools.lru_cache(maxsize=4096)
def _windows_reach_input(size: int, kernel: int, stride: int, padding: int, dilation: int, out: int) -> bool:
    """Whether every output window along one axis has a tap on the input (not only on padding)."""
    for o in range(out):
        first = o * stride - padding
        # the taps first + k * dilation, k < kernel: is one of them in [0, size)?
        k = 0 if first >= 0 else (-first + dilation - 1) // dilation  # the first tap at or after 0
        if k >= kernel or first + k * dilation >= size:
            return False
    return True


def onednn_geometry_ok(in_hw, kernel, stride, padding, dilation, out_hw) -> bool:
    """False where oneDNN's int8 convolution is not safe (found by tests/test_fuzz_quant_conv.py;
    pyeff's GEMM route is exact there):
    - an output window that sees only padding (padding as wide as the dilated kernel, or a dilated
      kernel stepping over a tiny input): it crashed (segfault) on tiny inputs with stride /
      padding / dilation mixed per axis;
    - a single output along a strided axis: with 2-3 taps there and enough taps along the other
      axis (2x3, 3x3, 4x2 kernels seen) it returned garbage (uninitialised values, different from
      run to run); no tap count was found safe for all kernels, so every such plane takes gemm."""
    for a in range(2):
        if not _windows_reach_input(int(in_hw[a]), int(kernel[a]), int(stride[a]), int(padding[a]),
                                    int(dilation[a]), int(out_hw[a])):
            return False
        if out_hw[a] == 1 and stride[a] > 1:
            return False
    return True


def sliced_ok(channels_per_group: int, stride) -> bool:
    """False where the sliced route's oneDNN convolutions (unit scales, an input zero point) are not
    exact: depthwise with a width stride returned wrong accumulators on one thread
    (torch.set_num_threads(1); found by tests/test_fuzz_quant_conv.py)."""
    return not (channels_per_group == 1 and stride[1] > 1)


def choose(x_dtype: torch.dtype, w_bits: int, a_bits: int, zp: int, qmax: int, l1max,
           geometry_ok: bool = True, slices_ok: bool = True) -> str:
    """The route for these operands. `l1max()`: the weights' largest stacked-filter L1 norm, asked
    only when the sliced route is in question (it needs the digit pack). `geometry_ok`:
    onednn_geometry_ok of the convolution; `slices_ok`: sliced_ok."""
    if not geometry_ok or not _onednn_allowed():
        return "gemm"
    if _single_slice(x_dtype, w_bits, a_bits):
        return "direct"
    if not slices_ok:
        return "gemm"
    amax = max(max(z, digit_max(qmax, j) - z) for j, z in enumerate(zero_point_digits(zp, act_slices(a_bits))))
    return "sliced" if amax * l1max() < _EXACT_F32 else "gemm"


def cpu_route(x: Tensor, weight: Tensor, *, w_bits: int = 8, a_bits: int = 8, groups: int = 1, a_range=None,
              stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> str:
    """The route ("direct", "sliced" or "gemm") that quant_conv2d's native CPU backend takes for
    these operands (quant_linear: a [out, in] weight), under the current CPU_PATH_ENV. The native
    CUDA backend always takes "gemm"."""
    if x.device.type != "cpu":
        return "gemm"
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    _, _, zp, qmax = activation_params(x, a_bits, None if a_range is None else fixed_range(a_range))
    return choose(x.dtype, w_bits, a_bits, int(zp.item()), qmax,
                  lambda: digits(WeightForms(None, weight), weight, w_bits, groups).l1max,
                  onednn_geometry_ok(x.shape[-2:], weight.shape[-2:], _pair(stride), _pair(padding), _pair(dilation),
                                     conv_out_hw(x.shape[-2:], weight.shape[-2:], _pair(stride), _pair(padding),
                                                 _pair(dilation))),
                  sliced_ok(weight.shape[1], _pair(stride)))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
