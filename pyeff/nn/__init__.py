"""pyeff.nn: drop-in layers built on pyeff's ops."""
from pyeff.nn.quant import FULL_PRECISION, QuantConv2d, QuantLinear

__all__ = ["FULL_PRECISION", "QuantConv2d", "QuantLinear"]
