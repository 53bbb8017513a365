"""pyeff.nn: drop-in layers built on pyeff's ops."""
from pyeff.nn.quant import FULL_PRECISION, QuantConv2d, QuantLinear, quant_conv2d_of
from pyeff.nn.quantize import QuantConfig, quantize_
from pyeff.nn.psg import PSGConv2d, PSGSignHook, psg_

__all__ = ["FULL_PRECISION", "QuantConv2d", "QuantLinear", "quant_conv2d_of", "QuantConfig", "quantize_",
           "PSGConv2d", "PSGSignHook", "psg_"]
