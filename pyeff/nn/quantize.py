"""`quantize_(model, config, filter_fn)`: swap a whole model's convolutions and linear layers for
pyeff's integer-arithmetic layers in one call (in the spirit of torchao's `quantize_`).

    model = torchvision.models.resnet18().eval()
    pyeff.nn.quantize_(model, QuantConfig(w_bits=8, a_bits=8))                # in place
    small = pyeff.nn.quantize_(model, QuantConfig(4, 4), inplace=False)      # a quantised copy
    pyeff.nn.quantize_(model, filter_fn=lambda m, name: name != "conv1")     # keep the stem float

Each nn.Conv2d becomes a QuantConv2d and each nn.Linear a QuantLinear with the same configuration
and the *same* parameters (state_dict keys and values are unchanged, so checkpoints of the float
model load into the quantised one and back).
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from torch import nn

from pyeff.config import Config
from pyeff.nn.quant import FULL_PRECISION, QuantConv2d, QuantLinear

LAYERS = ("conv", "linear")


def _check_width(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not (lo <= v <= 16 or v == FULL_PRECISION):
        raise ValueError(f"pyeff.nn.QuantConfig: {name} must be an integer in [{lo}, 16] or 32 (full precision), "
                         f"got {v!r}")


@dataclass
class QuantConfig(Config):
    """What `quantize_` swaps in.

    w_bits: weight width, 2-16 (32: float weights).
    a_bits: activation width, 1-16 (32: float activations).
    backend: the ops' backend: None/"auto", "native", "triton" or "reference".
    layers: which layer types to swap: "conv" (nn.Conv2d), "linear" (nn.Linear) or both.
    """
    w_bits: int = 8
    a_bits: int = 8
    backend: Optional[str] = None
    layers: Tuple[str, ...] = LAYERS

    def validate(self) -> "QuantConfig":
        _check_width("w_bits", self.w_bits, 2)
        _check_width("a_bits", self.a_bits, 1)
        if self.backend not in (None, "auto", "native", "triton", "reference"):
            raise ValueError(f"pyeff.nn.QuantConfig: backend must be None, 'auto', 'native', 'triton' or "
                             f"'reference', got {self.backend!r}")
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        if not layers or any(k not in LAYERS for k in layers):
            raise ValueError(f"pyeff.nn.QuantConfig: layers must be a non-empty subset of {LAYERS}, got {self.layers!r}")
        self.layers = layers
        return self


def _swap(module: nn.Module, config: QuantConfig) -> Optional[nn.Module]:
    """The quantised twin of `module`, or None when `config` does not swap its type."""
    kw = dict(w_bits=config.w_bits, a_bits=config.a_bits, backend=config.backend)
    if isinstance(module, (QuantConv2d, QuantLinear)):
        return None  # already quantised
    if "conv" in config.layers and type(module) is nn.Conv2d:
        return QuantConv2d.from_float(module, **kw)
    if "linear" in config.layers and type(module) is nn.Linear:
        return QuantLinear.from_float(module, **kw)
    return None


def quantize_(model: nn.Module, config: QuantConfig | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None, *, inplace: bool = True) -> nn.Module:
    """Swap every nn.Conv2d / nn.Linear of `model` (those `filter_fn(module, name)` accepts, `name`
    the dotted path as in named_modules()) for QuantConv2d / QuantLinear with `config`'s widths,
    sharing the parameters. Subclasses of nn.Conv2d / nn.Linear are left alone (their forward may
    differ). Returns the model (a converted deep copy with inplace=False; a module that is itself
    a conv or linear is returned swapped, since it cannot be replaced in place)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"pyeff.nn.quantize_ expects an nn.Module, got {type(model).__name__}")
    if config is None:
        config = QuantConfig()
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"pyeff.nn.quantize_: config must be a QuantConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("pyeff.nn.quantize_: filter_fn must be callable (module, name) -> bool")
    if not inplace:
        model = copy.deepcopy(model)
    accept = filter_fn or (lambda m, name: True)
    root = _swap(model, config)
    if root is not None:
        return root if accept(model, "") else model
    for name, module in list(model.named_modules()):
        if not name:
            continue
        new = _swap(module, config)
        if new is not None and accept(module, name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new.train(module.training))
    return model
