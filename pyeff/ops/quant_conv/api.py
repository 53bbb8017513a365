"""The public functions: input checks with actionable messages, then the kernels directly (nothing
to record) or the torch op (autograd, torch.compile)."""
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from pyeff.ops._checks import (check_backend, check_bits, check_conv_sizes, check_no_nan, check_same_device,
                               check_tensor)
from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.packs import WeightPacks
from pyeff.ops.quant_conv.autograd import quant_conv2d_op
from pyeff.ops.quant_conv.dispatch import resolve, run
from pyeff.ops.quant_conv.weights import WeightForms


_INT_MAX = 1 << 30  # larger strides break oneDNN (2**31 - 1 fails; measured), larger still the int lists


def _pair(op: str, name: str, v, lo: int):
    # fast path for plain ints (the isinstance checks against numbers.Integral cost ~15 us a call)
    if type(v) is int and lo <= v <= _INT_MAX:
        return [v, v]
    if type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int \
            and lo <= v[0] <= _INT_MAX and lo <= v[1] <= _INT_MAX:
        return [v[0], v[1]]
    if isinstance(v, str):
        raise ValueError(f"pyeff.ops.{op}: {name}={v!r} is not supported; give integers")
    vals = (v, v) if not isinstance(v, (tuple, list)) else tuple(v)
    if len(vals) != 2 or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in vals):
        raise TypeError(f"pyeff.ops.{op}: {name} must be an int or a pair of ints, got {v!r}")
    if any(int(i) < lo for i in vals):
        raise ValueError(f"pyeff.ops.{op}: {name} must be >= {lo}, got {v!r}")
    if any(int(i) > _INT_MAX for i in vals):
        raise ValueError(f"pyeff.ops.{op}: {name} must be <= 2**30, got {v!r}")
    return [int(i) for i in vals]


def _check_bits(op: str, w_bits, a_bits):
    if isinstance(w_bits, numbers.Integral) and not isinstance(w_bits, bool) and int(w_bits) == 1:
        raise ValueError(f"pyeff.ops.{op}: w_bits=1 leaves the symmetric weight quantiser only the level 0; "
                         "expected an integer in [2, 16]")
    return check_bits(op, "w_bits", w_bits, 2, 16), check_bits(op, "a_bits", a_bits, 1, 16)


def _check_packs(op: str, packs):
    if packs is not None and not isinstance(packs, WeightPacks):
        raise TypeError(f"pyeff.ops.{op}: packs must be a pyeff.ops.packs.WeightPacks (e.g. packs_of(module)) or "
                        f"None, got {type(packs).__name__}")


def _conv2d(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range, out_scale, relu, backend,
            packs, source):
    """quant_conv2d after its checks; `source`: the caller's tensor behind `weight`, which `packs`
    checks for changes."""
    op = "quant_conv2d"
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight)
    if x.dim() != 4:
        raise ValueError(f"pyeff.ops.{op}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}"
                         + (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""))
    if weight.dim() != 4:
        raise ValueError(f"pyeff.ops.{op}: weight must be 4-D [K, C/groups, kh, kw], got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"pyeff.ops.{op}: weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    if bias is not None:
        check_tensor(op, "bias", bias, dim=1)
        if bias.dtype != x.dtype:
            raise TypeError(f"pyeff.ops.{op}: bias has dtype {bias.dtype} but x has {x.dtype}; they must match")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"pyeff.ops.{op}: bias has {bias.shape[0]} values for {weight.shape[0]} output channels")
    check_same_device(op, x=x, weight=weight, bias=bias)
    check_conv_sizes(op, x, weight)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"pyeff.ops.{op}: groups must be a positive integer, got {groups!r}")
    groups = int(groups)
    C, K = x.shape[1], weight.shape[0]
    if K % groups:
        raise ValueError(f"pyeff.ops.{op}: {K} output channels are not divisible by groups={groups}")
    if C != weight.shape[1] * groups:
        raise ValueError(f"pyeff.ops.{op}: x has {C} channels but weight expects {weight.shape[1]} x groups={groups} "
                         f"= {weight.shape[1] * groups}")
    stride, padding, dilation = (_pair(op, "stride", stride, 1), _pair(op, "padding", padding, 0),
                                 _pair(op, "dilation", dilation, 1))
    w_bits, a_bits = _check_bits(op, w_bits, a_bits)
    if x.shape[0] and (x.shape[2] == 0 or x.shape[3] == 0):
        raise ValueError(f"pyeff.ops.{op}: x has no pixels (shape {tuple(x.shape)}); the activation range of an "
                         "empty input is undefined")
    OH, OW = conv_out_hw(x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"pyeff.ops.{op}: input {tuple(x.shape[-2:])} (padded by {padding}) is smaller than the "
                         f"dilated kernel {tuple(weight.shape[-2:])}")
    if a_range is not None:
        try:
            lo, hi = (float(v) for v in a_range)
        except (TypeError, ValueError):
            raise TypeError(f"pyeff.ops.{op}: a_range must be a pair of floats (lo, hi), got {a_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ValueError(f"pyeff.ops.{op}: a_range must be finite with lo <= hi, got {(lo, hi)}")
        a_range = [lo, hi]
    if out_scale is not None:
        check_tensor(op, "out_scale", out_scale, dim=1)
        if out_scale.dtype != x.dtype or out_scale.shape[0] != K:
            raise ValueError(f"pyeff.ops.{op}: out_scale must be [{K}] of dtype {x.dtype}, got "
                             f"{tuple(out_scale.shape)} of {out_scale.dtype}")
        check_same_device(op, x=x, out_scale=out_scale)
    _check_packs(op, packs)
    check_backend(op, backend)
    relu = bool(relu)
    backend = backend or "auto"
    if a_range is not None and x.device.type == "cpu" and not torch.compiler.is_compiling() \
            and resolve(x.device, backend) != "native":
        # NaN with a given range: the native quantiser flags it in its own pass (no extra read);
        # the other CPU backends pay one sum over x. Infinities saturate to the range, as in the reference.
        check_no_nan(op, "x", x)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, out_scale))) \
            and not torch.compiler.is_compiling():
        # nothing to record: the kernels directly (the custom op's dispatch costs ~0.1 ms a call),
        # with the weight forms kept in `packs`
        return run(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, resolve(x.device, backend),
                   a_range, out_scale, relu, WeightForms(packs, source))
    return quant_conv2d_op(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend,
                           a_range, out_scale, relu)


def quant_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, *, w_bits: int = 8, a_bits: int = 8, a_range=None,
                 out_scale: Optional[Tensor] = None, relu: bool = False, backend: Optional[str] = None,
                 packs: Optional[WeightPacks] = None) -> Tensor:
    """2-D convolution computed in integers: F.conv2d's arguments, with the activations quantised to
    `a_bits` (asymmetric, per tensor, min-max of this call's input, or `a_range`) and the weights to `w_bits`
    (symmetric, per output channel); int8 GEMMs with int32 accumulation (widths above 8 bits as
    int8 slices) and a fused dequantising epilogue that adds the bias.

    Args:
        x: [N, C, H, W] float16 / bfloat16 / float32 / float64.
        weight: [K, C / groups, kh, kw], same dtype and device as x.
        bias: None or [K].
        stride, padding, dilation: int or pair (padding >= 0, no strings).
        groups: divides C and K.
        w_bits: 2-16. a_bits: 1-16.
        a_range: None, or (lo, hi) finite floats with lo <= hi: quantise the activations over this
            range, widened to hold 0 as the min-max range is, instead of the call's min-max; values
            outside the widened range saturate, exactly as if x were clipped to it first. A running
            range (DFS) saves the min-max pass and makes a sample's output independent of its batch.
        out_scale: None or [K], same dtype and device as x: each output channel is multiplied by it
            before the bias is added, in the dequantising epilogue. With relu=True the output is
            clamped at 0 there too. Together they fold an inference BatchNorm and ReLU into the conv:
            out_scale = gamma / sqrt(var + eps), bias = beta + (conv_bias - mean) * out_scale.
        backend: "auto", "native", "triton" or "reference" (see pyeff.ops._backend).
        packs: None, or the WeightPacks of the module that owns `weight` (pyeff.ops.packs.packs_of):
            the quantised and packed weight is kept there and rebuilt only when the weight changes.
            Used by calls that record no autograd graph; without it the weight is packed per call.

    Returns [N, K, OH, OW] in x's dtype, channels_last memory format. Equal to
    quant_conv2d_reference (float64 convolution of the fake-quantised operands) up to the final
    rounding to x's dtype. Gradients are straight-through (see pyeff.ops.quant_conv).

    Example:
        >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> quant_conv2d(x, w, padding=1, w_bits=4, a_bits=4).shape
        torch.Size([2, 4, 8, 8])
    """
    return _conv2d(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range, out_scale, relu,
                   backend, packs, weight)


def quant_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, w_bits: int = 8, a_bits: int = 8,
                 backend: Optional[str] = None, packs: Optional[WeightPacks] = None) -> Tensor:
    """F.linear computed in integers, quantised as quant_conv2d (activations per tensor over the
    whole input, weights per output feature). x: [..., in_features]; weight: [out, in]; `packs` as
    in quant_conv2d."""
    op = "quant_linear"
    check_tensor(op, "x", x, min_dim=1)
    check_tensor(op, "weight", weight, dim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"pyeff.ops.{op}: x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"pyeff.ops.{op}: weight has shape {tuple(weight.shape)}; a linear layer needs at least one "
                         "input and one output feature")
    w_bits, a_bits = _check_bits(op, w_bits, a_bits)
    _check_packs(op, packs)
    lead = x.shape[:-1]
    try:
        out = _conv2d(x.reshape(-1, x.shape[-1], 1, 1), weight.reshape(*weight.shape, 1, 1), bias, 1, 0, 1, 1,
                      w_bits, a_bits, None, None, False, backend, packs, weight)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("quant_conv2d", op)) from None
    return out.reshape(*lead, weight.shape[0])
