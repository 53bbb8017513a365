"""SLU, selective layer update (E2-Train's model level, arXiv 1910.13349).

    from pyeff.e2train.slu import SLUHook, convert
    net = convert(model, target=0.5)             # beta=1e-5 per executed (sample, block), the paper's
    Trainer(net, cfg, train_set, test_set, hooks=[SLUHook()]).fit()

A SkipNet recurrent gate (per block: pool, 1x1 conv to an embedding of 10, one LSTM cell of 10
shared by all blocks, a head, softmax over skip/execute) decides per input whether each residual
block but the first runs. In training the decision is sampled (execute with probability p, i.e.
mask = p > U(0, 1), as the reference) with a straight-through gradient; at inference it is p > 0.5.

What is skipped costs nothing: this is DDI's layer skipping (`pyeff.ddi.DDINet` with no channel
gates and no exits) trained *routed*: each block's convolutions run forward and backward on the
samples that execute it only (`pyeff.dynamic.route`); a skipped sample takes the block's shortcut
(the identity, or the projection of a downsampling block). Nothing here re-implements the gate,
the router or the hinge: the net is a thin `DDINet` subclass whose cost table charges one unit per
gated block, so the net's `aux["cost"]` is the fraction of gated blocks each sample executed, and
the hook is the shared `CostHingeHook` with the paper's units for beta.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Tuple

from torch import Tensor, nn

from pyeff.config import Config
from pyeff.ddi.config import DEFAULT_WIDTHS
from pyeff.ddi.costs import BlockCost, CostTable
from pyeff.ddi.model import DDINet, _parts
from pyeff.dynamic.blocks import find_supported, supported_blocks
from pyeff.dynamic.hook import CostHingeHook
from pyeff.dynamic.net import TRAIN_MODES, DynamicNet

METHOD = "pyeff.e2train.slu"
DEFAULT_BETA = 1e-5   # the paper's (and its code's default), per executed (sample, block) pair
GATE_MODES = ("sample", "argmax")
UNIT = "blocks"       # the cost unit: one per executed gated block (the reference's energy_parameter = 1)


def check_target(target, who: str = METHOD) -> float:
    """A fraction of the gated blocks to execute, in (0, 1]."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0.0 < target <= 1.0:
        raise ValueError(f"{who}: target is the fraction of gated blocks to execute, in (0, 1] (e.g. 0.5 for 50%; "
                         f"0 would skip every block), got target={target!r}")
    return float(target)


def check_beta(beta, who: str = METHOD) -> float:
    """The hinge's weight per executed (sample, block) pair: a finite number >= 0."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"{who}: beta is the cost hinge's weight per executed (sample, block) pair, a finite "
                         f"number >= 0 (the paper: {DEFAULT_BETA:g}; 0 turns the hinge off), got beta={beta!r}")
    return float(beta)


@dataclass
class SLUConfig(Config):
    """How `pyeff.e2train.slu.convert` gates a network (stored with it, e.g. in checkpoints).

    target: fraction of the gated blocks each batch should execute, in (0, 1] (the reference's
        --minimum, there in percent).
    beta: weight of the cost hinge per executed (sample, block) pair, >= 0 (the paper: 1e-5). The
        loss gains beta * sign * (executed sample-block pairs of the batch), sign = +1 when the batch
        executed more than `target` of its gated blocks, else -1, as in the reference code.
    gate_mode: "sample" (training executes a block with probability p: mask = p > U(0, 1), the
        paper's) or "argmax" (p > 0.5 in training too, SkipNet's hybrid). Inference: p > 0.5.
    train_mode: "routed" (a block's convs run forward and backward on the samples that execute it
        only) or "all" (every sample through every block, then masks: the reference's execution,
        which saves nothing; for comparison).
    skip_downsampling: gate the blocks with a projection shortcut too (a skipped one outputs its
        projection), as the paper does (all 35 blocks but the first of its ResNet-74).
    gate_bias: initial (skip, execute) logit bias of the gate: (0, 0) starts at p = 0.5, like the
        paper's training from scratch; (0, 2) starts mostly executing (fine-tuning a trained net).
    embed_dim, hidden_dim: the recurrent gate's embedding and LSTM sizes (the paper: 10 and 10).
    """
    target: float = 0.5
    beta: float = DEFAULT_BETA
    gate_mode: str = "sample"
    train_mode: str = "routed"
    skip_downsampling: bool = True
    gate_bias: Tuple[float, float] = (0.0, 0.0)
    embed_dim: int = 10
    hidden_dim: int = 10

    # What DDINet reads from its config beyond the fields above: SLU is its layer skipping alone.
    # Plain class attributes, not fields: not options, not stored, not changeable.
    layer_gates = True
    channel_gates = False
    exits = False
    channel_mode = "mask"
    widths = DEFAULT_WIDTHS
    cost = UNIT
    energy = None
    input_size = ()   # SLU's costs do not depend on the input size

    @classmethod
    def _what(cls) -> str:
        return "SLUConfig"

    def validate(self) -> "SLUConfig":
        self.target = check_target(self.target)
        self.beta = check_beta(self.beta)
        for name, allowed in (("gate_mode", GATE_MODES), ("train_mode", TRAIN_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{METHOD}: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.skip_downsampling, bool):
            raise ValueError(f"{METHOD}: skip_downsampling must be True or False, got {self.skip_downsampling!r}")
        try:
            gb = tuple(float(v) for v in self.gate_bias)
        except (TypeError, ValueError):
            gb = ()
        if len(gb) != 2 or not all(math.isfinite(v) for v in gb):
            raise ValueError(f"{METHOD}: gate_bias is the (skip, execute) logit bias, two finite numbers, "
                             f"got {self.gate_bias!r}")
        self.gate_bias = gb
        for name in ("embed_dim", "hidden_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{METHOD}: {name} must be a positive integer, got {v!r}")
        return self


class SLUNet(DDINet):
    """A network with SLU's layer gates: a `DDINet` with layer gates only, routed training, and a
    cost table of one unit per gated block.

    `net(x)` returns `(logits, aux)`: aux["cost"] [N] is the fraction of the gated blocks each
    sample executed (differentiable in training through the gate's straight-through weights; exact
    float64 at inference), aux["execute"] [N, G] the decisions. Everything of DynamicNet/DDINet
    applies: `forced(execute=...)`, `execution("masked")`, `unfused()`, `evaluate(loader)`
    (cost_pct = executed %, execute_rate per block), `to_dense()`, `train_mode`; `gate_mode` sets
    the config's and the gate's together.
    """

    method = METHOD
    config_class = SLUConfig

    def __init__(self, model: nn.Module, config: SLUConfig):
        super().__init__(model, config)
        if self.gate is not None:
            self.gate.mode = config.gate_mode
        else:  # (every gated block has a projection and skip_downsampling=False)
            raise ValueError(f"{METHOD}: no block of {type(model).__name__} is gated: all of them but the first "
                             "have a projection shortcut; convert with skip_downsampling=True")

    def measure_costs(self, unit: str | None = None, batch: int = 64, energy=None,
                      x: Tensor | None = None) -> CostTable:
        """SLU's cost table: one unit per gated block executed, nothing elsewhere (the reference's
        energy_parameter is all ones), so the cost is the fraction of gated blocks executed.
        Independent of the input, which is neither needed nor run."""
        if unit not in (None, UNIT):
            raise ValueError(f"{METHOD}: the cost unit is {UNIT!r} (executed gated blocks), got {unit!r}")
        self.table = CostTable(UNIT, [BlockCost(d.stage, 0.0, float(d.layer_gated), 0.0, 0.0) for d in self.blocks],
                               [0.0] * len(self.parts[1]), 0.0, [])
        self.cost_unit = UNIT
        return self.table

    def _check_input_size(self, x: Tensor) -> None:
        pass  # the table counts blocks: any input size is costed right

    @property
    def num_gated(self) -> int:
        """The blocks the gate decides (the denominator of the executed fraction)."""
        return len(self._gate_step)

    @property
    def gate_mode(self) -> str:
        return self.config.gate_mode

    @gate_mode.setter
    def gate_mode(self, mode: str) -> None:
        """Changes net.config and the gate (as `train_mode` does)."""
        self.config = self.config.replace(gate_mode=mode)
        self.gate.mode = mode


def _check_model(model) -> None:
    """SLU's demands on the model, checked before any copy is made (a ValueError naming what is
    missing; a TypeError for what is not a model at all)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{METHOD}.convert: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, DynamicNet):
        raise TypeError(f"{METHOD}.convert: the model is already a {type(model).__name__} (converted)")
    found = find_supported(model)
    if not found:
        raise ValueError(f"{METHOD}.convert: model ({type(model).__name__}) has no registered residual block, so "
                         f"there is no layer to skip. Registered block types: {', '.join(supported_blocks())}; add "
                         "yours with pyeff.dynamic.register_block")
    try:
        _, stages, _ = _parts(model)
    except TypeError:
        raise ValueError(f"{METHOD}.convert: model ({type(model).__name__}) must be laid out as stem, stages() and "
                         "head (pyeff's CIFAR ResNets) or be a torchvision ResNet") from None
    in_stages = {id(m) for s in stages for m in s.modules()}
    n = sum(id(b) in in_stages for _, b in found)
    if n < 2:
        raise ValueError(f"{METHOD}.convert: model ({type(model).__name__}) has {n} registered residual block(s) in "
                         "its stages; SLU needs at least two (the first always runs, as in the paper)")


def convert(model: nn.Module, config: SLUConfig | None = None, *, copy_model: bool = True, **overrides) -> SLUNet:
    """Give `model` SLU's layer gates.

    Args:
        model: pyeff's CIFAR ResNets (`pyeff.models.create_model("resnet20")`, pre-activation too),
            a torchvision ResNet, or a network of stem, stages() and head whose blocks are
            registered with pyeff.dynamic.register_block.
        config: an SLUConfig (default SLUConfig()); `overrides` replace its fields, e.g.
            convert(model, target=0.4, beta=1e-5). See SLUConfig.
        copy_model: convert a deep copy (default) rather than `model` itself.

    The net is in the model's mode; conversion runs nothing (no forward, no BatchNorm update).
    """
    _check_model(model)
    hint = " (give the target as convert(model, target=...))" if isinstance(config, numbers.Real) else ""
    return SLUNet.convert(model, config, copy_model=copy_model, misuse=hint, **overrides)


def _unwrap(model):
    return getattr(model, "module", model)  # DDP


class SLUHook(CostHingeHook):
    """SLU's cost hinge on the shared Trainer, and its report.

    loss += beta * sign * (executed sample-block pairs of the batch), sign = +1 when the batch
    executed more than `target` of its gated blocks, else -1: the reference's rule and units, so
    the paper's beta = 1e-5 means the same here (the straight-through weights make it reach the
    gate). That is the shared `hinge_cost_loss` on the executed fraction with a weight of
    beta x batch size x gated blocks, so it scales with both as in the paper (the batch is this
    process's: under DDP the per-rank batch, whose gradients DDP averages).

    target, beta: None (default) takes the net's (`net.config`); otherwise as in SLUConfig.

    Metrics per epoch: train_executed_pct (training batches, sampled decisions) and executed_pct
    (evaluation, p > 0.5), also under the shared names train_computation_pct / computation_pct.
    """

    def __init__(self, target: float | None = None, beta: float | None = None):
        self._target = None if target is None else check_target(target, "SLUHook")
        self._beta = None if beta is None else check_beta(beta, "SLUHook")
        super().__init__(100.0 * (self._target or 1.0), self._beta or 0.0)
        self.pair_beta: float | None = None
        self.gated = 0

    def _settle(self, trainer) -> None:
        net = _unwrap(trainer.model)
        if not isinstance(net, SLUNet):
            raise TypeError(f"SLUHook needs a net made by {METHOD}.convert, got {type(net).__name__}")
        self.target = 100.0 * (self._target if self._target is not None else net.config.target)
        self.pair_beta = self._beta if self._beta is not None else net.config.beta
        self.gated = net.num_gated

    def on_fit_begin(self, trainer):
        self._settle(trainer)

    def loss(self, trainer, outputs, targets, loss):
        if self.pair_beta is None:
            self._settle(trainer)
        cost = self._cost(outputs)
        self.beta = self.pair_beta * cost.shape[0] * self.gated  # hinge_cost_loss weighs the mean fraction
        return super().loss(trainer, outputs, targets, loss)

    def eval_metrics(self, trainer) -> dict:
        out = super().eval_metrics(trainer)
        out["executed_pct"] = out["computation_pct"]
        return out

    def on_epoch_end(self, trainer, epoch, metrics):
        super().on_epoch_end(trainer, epoch, metrics)
        metrics["train_executed_pct"] = metrics["train_computation_pct"]
