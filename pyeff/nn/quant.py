"""QuantConv2d / QuantLinear: nn.Conv2d / nn.Linear whose forward runs pyeff.ops.quant_conv2d /
quant_linear (integer arithmetic) at bit widths that may change from call to call.

    layer = QuantConv2d(16, 32, 3, padding=1, w_bits=8, a_bits=8)   # or QuantConv2d.from_float(conv)
    y = layer(x)                       # 8-bit weights and activations
    y = layer(x, w_bits=4, a_bits=6)   # another width for this call only
    y = layer(x, w_bits=32, a_bits=32) # full precision: the float convolution

A width of 32 means "this operand stays float". With one operand at 32 and the other quantised,
the layer runs the float op on the fake-quantised operand (there is no integer kernel for it).
The quantised weights are prepared once per weight version and reused while the weight does not
change (see pyeff.ops.quant_conv).
"""
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.ops import fake_quant
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

    def _int_padding(self):
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return (0, 0)
            pads = []
            for k, d, s in zip(self.kernel_size, self.dilation, self.stride):
                total = d * (k - 1)
                if total % 2 or s != 1:
                    raise NotImplementedError("pyeff.nn.QuantConv2d: padding='same' needs an even d*(k-1) and stride 1")
                pads.append(total // 2)
            return tuple(pads)
        return self.padding

    def forward(self, x: Tensor, w_bits=None, a_bits=None) -> Tensor:
        wb, ab = _resolve(self, w_bits, a_bits)
        padding = self._int_padding()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        if wb == FULL_PRECISION or ab == FULL_PRECISION:
            xq = x if ab == FULL_PRECISION else fake_quant(x, ab)
            wq = self.weight if wb == FULL_PRECISION else fake_quant(self.weight, wb, scheme="sym", axis=0)
            return F.conv2d(xq, wq, self.bias, self.stride, padding, self.dilation, self.groups)
        return quant_conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                            w_bits=wb, a_bits=ab, backend=self.backend)

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
        return quant_linear(x, self.weight, self.bias, w_bits=wb, a_bits=ab, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w_bits={self.w_bits}, a_bits={self.a_bits}"
