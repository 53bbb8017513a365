"""The integer forms of a weight (levels, byte digits, GEMM operands, oneDNN's prepacked weights):
built per call, or kept in the WeightPacks of the module that owns the weight."""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyeff.ops.packs import WeightPacks
from pyeff.ops.quant_conv.reference import weight_levels
from pyeff.ops.quant_conv.slicing import weight_digits


class WeightForms:
    """The forms of one weight for one call. `source` is the tensor the caller owns (quant_linear
    passes its 2-D weight, whose 4-D view is a new object every call): the packs check it."""

    __slots__ = ("packs", "source")

    def __init__(self, packs: Optional[WeightPacks], source: Tensor):
        self.packs, self.source = packs, source

    def get(self, key: tuple, build):
        if self.packs is None:
            return build()
        return self.packs.get(key, (self.source,), build)


class Digits(NamedTuple):
    stack: Tensor  # int8 [G * cols, Cg, kh, kw] (slicing.weight_digits)
    scale: Tensor  # [K] per-output-channel weight scale
    slices: int  # byte digits per weight level
    offset: bool  # the 16-bit offset of 128 (slicing.weight_digits)
    l1max: int  # largest L1 norm of a stacked filter: |slice accumulator| <= digit range * l1max


def digits(forms: WeightForms, weight: Tensor, w_bits: int, groups: int) -> Digits:
    def build():
        wq, wscale = weight_levels(weight, w_bits)
        stack, slices, offset = weight_digits(wq, w_bits, groups)
        l1 = stack.to(torch.int64).abs().flatten(1).sum(1)
        return Digits(stack, wscale, slices, offset, int(l1.max()) if l1.numel() else 0)
    return forms.get(("quant_conv-digits", w_bits, groups), build)


class FloatLevels(NamedTuple):
    levels: Tensor  # the integer weight levels [K, Cg, kh, kw] as float32 or float64 (exact)
    scale: Tensor  # [K] per-output-channel weight scale
    l1max: int  # largest L1 norm of a filter's levels: |accumulator| <= activation range * l1max


def float_levels(forms: WeightForms, weight: Tensor, w_bits: int, dtype: torch.dtype) -> FloatLevels:
    """The weight levels as floats, for the float route's exact integer-valued convolution."""
    def build():
        wq, wscale = weight_levels(weight, w_bits)
        l1 = wq.abs().flatten(1).sum(1)
        return FloatLevels(wq.to(dtype).contiguous(memory_format=torch.channels_last), wscale,
                           int(l1.max()) if l1.numel() else 0)
    return forms.get(("quant_conv-float", w_bits, dtype), build)


def gemm_operands(forms: WeightForms, d: Digits, w_bits: int, groups: int, k_pad: int, col_pad: int):
    """Per-group int8 GEMM operands [k_pad, col_pad] with rows in the im2col order (kh, kw, c),
    and the exact column sums [G * cols] (int64) for the 128-offset of the im2col columns."""
    def build():
        G = groups
        cols = d.stack.shape[0] // G
        mats = d.stack.reshape(G, cols, *d.stack.shape[1:]).permute(0, 3, 4, 2, 1).reshape(G, -1, cols)
        colsum = mats.to(torch.int64).sum(1).reshape(-1)
        mats = F.pad(mats, (0, col_pad - cols, 0, k_pad - mats.shape[1]))
        return [m.contiguous() for m in mats], colsum
    return forms.get(("quant_conv-gemm", w_bits, groups, k_pad, col_pad), build)


class OneDNNDirect(NamedTuple):
    packed: object  # oneDNN's prepacked int8 weight
    scale: Tensor  # [K] weight scale in its dtype (float64 for float64 weights)
    scale32: Tensor  # the same as float32, as oneDNN takes it
    zeros: Tensor  # [K] int64 weight zero points
    conv: tuple  # (stride, padding, dilation) as lists


def onednn_direct(forms: WeightForms, weight: Tensor, w_bits: int, stride, padding, dilation,
                  groups: int) -> OneDNNDirect:
    """The prepacked weight of one oneDNN int8 convolution with the weight scales fused."""
    def build():
        d = digits(forms, weight, w_bits, groups)
        w32 = d.scale.float().contiguous()
        packed = torch.ops.onednn.qconv_prepack(d.stack, w32, 1.0, 0, list(stride), list(padding),
                                                list(dilation), groups, None)
        return OneDNNDirect(packed, d.scale, w32, torch.zeros(weight.shape[0], dtype=torch.int64),
                            (list(stride), list(padding), list(dilation)))
    return forms.get(("quant_conv-onednn", w_bits, groups, tuple(stride), tuple(padding), tuple(dilation)), build)


class OneDNNSliced(NamedTuple):
    packed: object  # the digit stack prepacked with unit scales
    unit: Tensor  # [G * cols] ones
    zeros: Tensor  # [G * cols] int64 zeros


def onednn_sliced(forms: WeightForms, d: Digits, w_bits: int, stride, padding, dilation,
                  groups: int) -> OneDNNSliced:
    """The digit stack prepacked for oneDNN with unit scales: each slice convolution then returns
    its integer accumulator (exact in float32 below 2^24)."""
    def build():
        n = d.stack.shape[0]
        unit = torch.ones(n)
        packed = torch.ops.onednn.qconv_prepack(d.stack, unit, 1.0, 0, list(stride), list(padding),
                                                list(dilation), groups, None)
        return OneDNNSliced(packed, unit, torch.zeros(n, dtype=torch.int64))
    key = ("quant_conv-onednn-sliced", w_bits, groups, tuple(stride), tuple(padding), tuple(dilation))
    return forms.get(key, build)
