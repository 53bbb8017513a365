"""DFSConfig: what `pyeff.dfs.convert` builds, stored in DFS checkpoints and generated into the
`pyeff dfs train` options."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

from pyeff.config import Config
from pyeff.dynamic.net import TRAIN_MODES

FULL = 32
PAPER_BITS = (0, 8, 10, 12, 14, 16, 32)
HW_BITS = (0, 4, 8, 16, 32)


def check_bits(bits) -> tuple[int, ...]:
    """Validate a DFS bit set: integers, 0 = skip, 2..16 = quantised, 32 = full precision; at least
    two distinct choices, not skip alone. Returns them sorted ascending."""
    if isinstance(bits, (str, bytes)):
        raise TypeError(f"pyeff.dfs: bits must be a sequence of integers such as (0, 8, 16, 32), got {bits!r}")
    try:
        items = list(bits)
    except TypeError:
        raise TypeError(f"pyeff.dfs: bits must be a sequence of integers such as (0, 8, 16, 32), got {bits!r}") from None
    for b in items:
        if isinstance(b, bool) or not isinstance(b, numbers.Integral):
            raise TypeError(f"pyeff.dfs: every bit width must be an integer (0 = skip, 2-16, 32 = full "
                            f"precision), got {b!r} in {tuple(items)}")
    items = [int(b) for b in items]
    bad = [b for b in items if not (b == 0 or b == FULL or 2 <= b <= 16)]
    if bad:
        raise ValueError(f"pyeff.dfs: bit widths {bad} are not supported; use 0 (skip), 2-16 (the integer "
                         "engine, 9-16 as int8 slices) or 32 (full precision)")
    dup = sorted({b for b in items if items.count(b) > 1})
    if dup:
        raise ValueError(f"pyeff.dfs: duplicate bit widths {dup} in {tuple(items)}")
    if len(items) < 2:
        raise ValueError(f"pyeff.dfs: a gate needs at least two choices, got {tuple(items)} "
                         "(e.g. (0, 32) for skip-or-full, or (0, 8, 16, 32))")
    if items != sorted(items):
        raise ValueError(f"pyeff.dfs: bits must be given in ascending order (choice i of the gate is bits[i]), "
                         f"got {tuple(items)}; e.g. {tuple(sorted(items))}")
    return tuple(items)


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"pyeff.dfs: {name} must be an integer >= {lo}, got {v!r}")


@dataclass
class DFSConfig(Config):
    """How `pyeff.dfs.convert` gates a residual network.

    bits: the choices of every gated block, ascending: 0 = skip, 2-16 = the residual branch
        quantised (weights and activations), 32 = full precision.
    train_mode: "all" (the paper's: every candidate on every sample, then the gate's one-hot) or
        "routed" (only the chosen path per sample: cheaper, gate gradients from the taken path).
    gate_bias: initial logit bias per choice of the gate's head (None: favour the widest choice).
    embed_dim, hidden_dim: sizes of the recurrent gate's input embedding and LSTM state.
    """
    bits: Tuple[int, ...] = PAPER_BITS
    train_mode: str = "all"
    gate_bias: Optional[Tuple[float, ...]] = None
    embed_dim: int = 10
    hidden_dim: int = 10

    def validate(self) -> "DFSConfig":
        self.bits = check_bits(self.bits)
        if self.train_mode not in TRAIN_MODES:
            raise ValueError(f"pyeff.dfs: train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
        if self.gate_bias is not None:
            try:
                gb = tuple(float(v) for v in self.gate_bias)
            except (TypeError, ValueError):
                raise TypeError(f"pyeff.dfs: gate_bias must be None or one float per choice, got "
                                f"{self.gate_bias!r}") from None
            if len(gb) != len(self.bits):
                raise ValueError(f"pyeff.dfs: gate_bias has {len(gb)} values for {len(self.bits)} choices {self.bits}")
            self.gate_bias = gb
        _check_int("embed_dim", self.embed_dim, 1)
        _check_int("hidden_dim", self.hidden_dim, 1)
        return self
