"""The quantisers (shared by every backend) and the reference kernel: plain PyTorch, the op's
specification."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyeff.ops.fake_quant import minmax_reference, quant_params


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_finite(minmax: Tensor, what: str) -> None:
    # on a GPU the check would cost a synchronisation per call; the CUDA kernels propagate NaN instead
    if minmax.device.type == "cpu" and not bool(torch.isfinite(minmax).all()):
        raise ValueError(f"pyeff.ops.quant_conv2d: {what} contains NaN or infinity; quantisation needs finite values")


def activation_params(x: Tensor, a_bits: int, minmax=None):
    """(scale, inv_scale, zero_point, qmax) of the per-tensor asymmetric activation quantiser, as
    1-element tensors of the compute dtype (float32, float64 for float64 x)."""
    mm = minmax(x, None) if minmax is not None else minmax_reference(x, None)
    check_finite(mm, "x")
    scale, inv, zp, _, qmax = quant_params(mm, a_bits, "asym")
    return scale, inv, zp, qmax


def fixed_range(a_range):
    """A `minmax` for activation_params that returns the given (lo, hi) instead of the data's."""
    def minmax(x: Tensor, axis) -> Tensor:
        return torch.tensor([[a_range[0]], [a_range[1]]], dtype=compute_dtype(x), device=x.device)
    return minmax


def weight_levels(weight: Tensor, w_bits: int):
    """(integer levels as int64 [K, ...], scale [K]) of the symmetric per-output-channel weight
    quantiser: the levels fake_quant(weight, w_bits, scheme="sym", axis=0) rounds to."""
    wc = weight.to(compute_dtype(weight))
    mm = minmax_reference(wc, 0)
    check_finite(mm, "weight")
    scale, inv, zp, qmin, qmax = quant_params(mm, w_bits, "sym")
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.floor(wc * inv.view(shape) + zp.view(shape) + 0.5).clamp(qmin, qmax)
    return q.to(torch.int64), scale


def activation_levels(x: Tensor, scale: Tensor, inv: Tensor, zp: Tensor, qmax: int) -> Tensor:
    xc = x.to(compute_dtype(x))
    return torch.floor(xc * inv + zp + 0.5).clamp(0, qmax)


def quant_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
                           dilation=1, groups: int = 1, *, w_bits: int = 8, a_bits: int = 8, a_range=None,
                           out_scale: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """The specification of quant_conv2d (same arguments, less `backend` and `packs`): fake-quantise
    both operands in float64 (the levels and scales of pyeff.ops.fake_quant) and run a float64
    convolution; the result in x's dtype, channels_last. `a_range` = (lo, hi): the activation
    quantiser's range instead of the input's min-max (values outside saturate). `out_scale` [K]
    multiplies each output channel before the bias is added; `relu` clamps at 0."""
    scale, inv, zp, qmax = activation_params(x, a_bits, None if a_range is None else fixed_range(a_range))
    xd = (activation_levels(x, scale, inv, zp, qmax).double() - zp.double()) * scale.double()
    wq, wscale = weight_levels(weight, w_bits)
    wd = wq.double() * wscale.double().view(-1, 1, 1, 1)
    out = F.conv2d(xd, wd, None, stride, padding, dilation, groups)
    if out_scale is not None:
        out = out * out_scale.double().view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    if relu:
        out = out.clamp_min(0)
    return out.to(x.dtype).contiguous(memory_format=torch.channels_last)
