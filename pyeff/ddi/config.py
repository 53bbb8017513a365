"""DDIConfig: what `pyeff.ddi.convert` builds, stored in DDI checkpoints and generated into the
`pyeff ddi train` options."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Tuple

from pyeff.config import Config
from pyeff.dynamic.net import TRAIN_MODES
from pyeff.energy import EnergyModel  # the shared unit-cost table; still importable from here

UNITS = ("flops", "energy", "latency")
CHANNEL_MODES = ("mask", "width")
DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)


def check_widths(widths) -> tuple:
    """Validate width-mode fractions of the inner channels, each in (0, 1]."""
    try:
        ws = tuple(float(w) for w in widths)
    except (TypeError, ValueError):
        raise TypeError(f"pyeff.ddi: widths must be fractions of the inner channels such as (0.25, 0.5, 1), "
                        f"got {widths!r}") from None
    if not ws or any(not 0 < w <= 1 for w in ws):
        raise ValueError(f"pyeff.ddi: widths must be fractions in (0, 1], got {tuple(widths)}")
    return ws


def _check_choice(name, v, allowed) -> None:
    if v not in allowed:
        raise ValueError(f"pyeff.ddi: {name} must be one of {allowed}, got {v!r}")


@dataclass
class DDIConfig(Config):
    """How `pyeff.ddi.convert` gates a network.

    cost: the unit of the hinge and the budget: "flops", "energy" (`energy`'s unit costs) or
        "latency" (timed on this machine).
    channel_gates / layer_gates / exits: each kind of dynamic inference on or off.
    input_size: (C, H, W) of one input: sizes the exits and the cost table (an input of another
        spatial size is an error at inference, since the costs would not match).
    gate_bias: initial (skip, execute) logit bias of the layer gate (default: execute).
    energy: the unit costs of the "energy" cost (an EnergyModel).
    channel_mode: "mask" (any subset of inner channels per sample, run by masked_conv2d) or
        "width" (a per-sample choice among `widths`, fractions of the inner channels, run as dense
        convs on sliced weights after the channels are sorted by importance).
    widths: the fractions of the inner channels width mode chooses among, each in (0, 1].
    train_mode: "all" (both paths on every sample in training, then the straight-through one-hot)
        or "routed" (only the chosen samples run a block).
    skip_downsampling: also give a layer gate to blocks with a projection shortcut.
    embed_dim, hidden_dim: sizes of the recurrent layer gate.
    """
    cost: str = "flops"
    channel_gates: bool = True
    layer_gates: bool = True
    exits: bool = True
    input_size: Tuple[int, int, int] = (3, 32, 32)
    energy: EnergyModel = field(default_factory=EnergyModel)
    gate_bias: Tuple[float, float] = (0.0, 2.0)
    channel_mode: str = "mask"
    widths: Tuple[float, ...] = DEFAULT_WIDTHS
    train_mode: str = "all"
    skip_downsampling: bool = False
    embed_dim: int = 10
    hidden_dim: int = 10

    def validate(self) -> "DDIConfig":
        _check_choice("cost", self.cost, UNITS)
        _check_choice("channel_mode", self.channel_mode, CHANNEL_MODES)
        _check_choice("train_mode", self.train_mode, TRAIN_MODES)
        for name in ("channel_gates", "layer_gates", "exits", "skip_downsampling"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"pyeff.ddi: {name} must be True or False, got {getattr(self, name)!r}")
        try:
            size = tuple(int(v) for v in self.input_size)
        except (TypeError, ValueError):
            size = ()
        if len(size) != 3 or min(size) < 1 or size != tuple(self.input_size):
            raise ValueError(f"pyeff.ddi: input_size must be (C, H, W) positive integers, got {self.input_size!r}")
        self.input_size = size
        if self.energy is None:
            self.energy = EnergyModel()
        elif isinstance(self.energy, dict):
            self.energy = EnergyModel.from_dict(self.energy)
        elif not isinstance(self.energy, EnergyModel):
            raise TypeError(f"pyeff.ddi: energy must be an EnergyModel, got {type(self.energy).__name__}")
        try:
            gb = tuple(float(v) for v in self.gate_bias)
        except (TypeError, ValueError):
            gb = ()
        if len(gb) != 2:
            raise ValueError(f"pyeff.ddi: gate_bias is the (skip, execute) logit bias, got {self.gate_bias!r}")
        self.gate_bias = gb
        self.widths = check_widths(self.widths)
        for name in ("embed_dim", "hidden_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"pyeff.ddi: {name} must be a positive integer, got {v!r}")
        return self
