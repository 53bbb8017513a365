"""QuantConv2d / QuantLinear: nn.Conv2d / nn.Linear whose forward runs pyeff.ops.quant_conv2d /
quant_linear (integer arithmetic) at bit widths that may change from call to call.

    layer = QuantConv2d(16, 32, 3, padding=1, w_bits=8, a_bits=8)   # or QuantConv2d.from_float(conv)
    y = layer(x)                       # 8-bit weights and activations
    y = layer(x, w_bits=4, a_bits=6)   # another width for this call only
    y = layer(x, w_bits=32, a_bits=32) # full precision: the float convolution

A width of 32 means "this operand stays float". With one operand at 32 and the other quantised,
the layer runs the float op on the fake-quantised operand (there is no integer kernel for it).
The quantised and packed weights live on the layer (pyeff.ops.packs) and are rebuilt whenever the
weight changes, however it changes (optimizer step, load_state_dict, an edit through .data).
`quant_conv2d_of(conv, x, ...)` runs any nn.Conv2d the same way (DFS's quantised paths).
"""
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.ops import fake_quant
from pyeff.ops.packs import packs_of
from pyeff.ops.quant_conv import quant_conv2d, quant_linear

FULL_PRECISION = 32


def _bits(name: str, value, lo: int):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"pyeff.nn: {name} must be an integer in [{lo}, 16] or 32 (full precision), got {value!r}")
    value = int(value)
    if value != FULL_PRECISION and not lo <= value <= 16:
        raise ValueError(f"pyeff.nn: {name}={value} is out of range; expected an integer in [{lo}, 16] or 32 "
                         "(full precision)")
    return value


def _resolve(layer, w_bits, a_bits):
    w = layer.w_bits if w_bits is None else _bits("w_bits", w_bits, 2)
    a = layer.a_bits if a_bits is None else _bits("a_bits", a_bits, 1)
    return w, a


def _padded(conv: nn.Conv2d, x: Tensor):
    """(input, integer padding) for quant_conv2d, which takes neither padding strings nor padding
    modes: 'valid' / 'same' become numbers, a non-zero padding mode pads x explicitly."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if not isinstance(conv.padding, str):
        return x, conv.padding
    if conv.padding == "valid":
        return x, (0, 0)
    pads = []
    for k, d, s in zip(conv.kernel_size, conv.dilation, conv.stride):
        total = d * (k - 1)
        if total % 2 or s != 1:
            raise NotImplementedError("pyeff.nn: padding='same' needs an even dilation * (kernel - 1) and stride 1")
        pads.append(total // 2)
    return x, tuple(pads)


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d computed by pyeff.ops.quant_conv2d. Extra arguments: w_bits (2-16 or 32) and
    a_bits (1-16 or 32); forward(x, w_bits=None, a_bits=None) overrides them for one call.
    The output is channels_last (as quant_conv2d's) unless both widths are 32."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, w_bits: int = 8, a_bits: int = 8,
                 backend=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.w_bits = _bits("w_bits", w_bits, 2)
        self.a_bits = _bits("a_bits", a_bits, 1)
        self.backend = backend

    @classmethod
    def from_float(cls, module: nn.Conv2d, w_bits: int = 8, a_bits: int = 8, backend=None) -> "QuantConv2d":
        """A QuantConv2d with the configuration and (shared) parameters of an nn.Conv2d."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QuantConv2d.from_float expects an nn.Conv2d, got {type(module).__name__}")
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode,
                device=module.weight.device, dtype=module.weight.dtype, w_bits=w_bits, a_bits=a_bits,
                backend=backend)
        q.weight = module.weight  # shared parameters
        q.bias = module.bias
        return q

    def forward(self, x: Tensor, w_bits=None, a_bits=None) -> Tensor:
        wb, ab = _resolve(self, w_bits, a_bits)
        x, padding = _padded(self, x)
        if wb == FULL_PRECISION or ab == FULL_PRECISION:
            xq = x if ab == FULL_PRECISION else fake_quant(x, ab)
            wq = self.weight if wb == FULL_PRECISION else fake_quant(self.weight, wb, scheme="sym", axis=0)
            return F.conv2d(xq, wq, self.bias, self.stride, padding, self.dilation, self.groups)
        return quant_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                            w_bits=wb, a_bits=ab, backend=self.backend, packs=packs_of(self))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"


class QuantLinear(nn.Linear):
    """nn.Linear computed by pyeff.ops.quant_linear; bits as QuantConv2d."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, w_bits: int = 8,
                 a_bits: int = 8, backend=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.w_bits = _bits("w_bits", w_bits, 2)
        self.a_bits = _bits("a_bits", a_bits, 1)
        self.backend = backend

    @classmethod
    def from_float(cls, module: nn.Linear, w_bits: int = 8, a_bits: int = 8, backend=None) -> "QuantLinear":
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QuantLinear.from_float expects an nn.Linear, got {type(module).__name__}")
        q = cls(module.in_features, module.out_features, module.bias is not None, device=module.weight.device,
                dtype=module.weight.dtype, w_bits=w_bits, a_bits=a_bits, backend=backend)
        q.weight = module.weight
        q.bias = module.bias
        return q

    def forward(self, x: Tensor, w_bits=None, a_bits=None) -> Tensor:
        wb, ab = _resolve(self, w_bits, a_bits)
        if wb == FULL_PRECISION or ab == FULL_PRECISION:
            xq = x if ab == FULL_PRECISION else fake_quant(x, ab)
            wq = self.weight if wb == FULL_PRECISION else fake_quant(self.weight, wb, scheme="sym", axis=0)
            return F.linear(xq, wq, self.bias)
        return quant_linear(x, self.weight, self.bias, w_bits=wb, a_bits=ab, backend=self.backend,
                            packs=packs_of(self))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"



_CONV_BIAS = object()  # bias not given: the conv's own


def quant_conv2d_of(conv: nn.Conv2d, x: Tensor, *, w_bits: int, a_bits: int, a_range=None, bias=_CONV_BIAS,
                    out_scale: Optional[Tensor] = None, relu: bool = False, backend: Optional[str] = None) -> Tensor:
    """pyeff.ops.quant_conv2d of `x` with `conv`'s weight, stride, padding (strings and padding modes
    included), dilation and groups; its packed weights are kept on `conv` (packs_of(conv)), so
    repeated calls pack once per weight state. `bias` defaults to conv.bias (pass None for none);
    the other keywords are quant_conv2d's (w_bits 2-16, a_bits 1-16)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"pyeff.nn.quant_conv2d_of expects an nn.Conv2d, got {type(conv).__name__}")
    x, padding = _padded(conv, x)
    return quant_conv2d(x, conv.weight, conv.bias if bias is _CONV_BIAS else bias, conv.stride, padding,
                        conv.dilation, conv.groups, w_bits=w_bits, a_bits=a_bits, a_range=a_range,
                        out_scale=out_scale, relu=relu, backend=backend, packs=packs_of(conv))
