"""A DFS block: one residual block that runs, per sample, either its shortcut alone (skip, 0 bits),
its residual branch quantised to b bits (weights and activations, pyeff's integer engine), or its
float residual branch (32 bits).

    out = shortcut(x)                          choice 0 (skip)
    out = post(residual_b(x), shortcut(x))     choice b: the block's convs at b bits, BN/ReLU float
    out = post(residual(x), shortcut(x))       choice 32: the float block

`post` is the block's own combination: ReLU(r + s) for post-activation blocks (pyeff's BasicBlock,
torchvision's BasicBlock and Bottleneck), r + s for pre-activation blocks. The shortcut (identity,
or its 1x1 projection) stays float in every path.

Execution
---------
* eval: only the chosen path per sample (`pyeff.dynamic.route`: grouped by decision, an empty
  group costs nothing). For a block whose shortcut is the identity, the executed groups are
  written into the block's input in place (an activation the forward owns): skipped rows are
  never copied. Quantised paths run `pyeff.ops.quant_conv2d` (int8 GEMMs, 9-16 bits as
  int8 slices).
* training, `train_mode="all"` (the paper's): every path on every sample, masked by the gate's
  straight-through one-hot (`pyeff.dynamic.masked_all_paths`); every choice's logit gets the
  gradient of its own path's output. Quantised paths are fake-quantised (STE) float convs here.
* training, `train_mode="routed"`: only the chosen path per sample; the gate's gradient reaches
  the chosen choice's logit through its path's output (and every logit through the cost term).
  Cheaper (about the cost of the chosen paths instead of all of them), but a choice that is never
  taken only learns from the cost term.

Activation ranges
-----------------
As in the paper, activations are quantised over a range that is, in training, the batch mean of
the per-sample min/max of the conv's input (inputs clipped to it), tracked as a running average
(`act_range`, one per conv) for evaluation. An eval call passes the running range to the engine
(`quant_conv2d(..., a_range=(lo, hi))`): values outside saturate, exactly as if clipped first, and
a sample's output does not depend on which other samples share its path (grouped == masked
execution). A conv that has never observed data (`act_range` NaN) falls back to the
per-call min-max of the engine; `DFSNet.calibrate` fills the ranges without training.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.dfs.config import FULL, TRAIN_MODES, check_bits
from pyeff.dynamic import masked_all_paths, route, straight_through
from pyeff.dynamic.modules import batch_norm, bn_affine, bn_foldable, relu_
from pyeff.dynamic.net import Controller, DynamicBlock
from pyeff.nn import quant_conv2d_of
from pyeff.ops import fake_quant


def _bn_relu(y: Tensor, bn, relu: bool) -> Tensor:
    if bn is not None:
        y = batch_norm(bn, y)
    return relu_(y) if relu else y


class DFSController(Controller):
    """What the blocks of one DFSNet share during a forward: the gate, the choice costs, the
    decisions made so far and optional forced decisions."""

    def __init__(self, gate=None, costs: Tensor | None = None):
        super().__init__()
        self.gate, self.costs = gate, costs
        self.observe = False        # record activation ranges (training, calibration)
        self.momentum: float | None = 0.1  # None: cumulative average (calibration)
        self.forced: Tensor | None = None  # [N, G] or [G] choice indices
        self.block_costs: list[Tensor] = []
        self.decisions: list[Tensor] = []

    def reset(self):
        if self.gate is not None:
            self.gate.reset()
        self.block_costs = []
        self.decisions = []


class DFSBlock(DynamicBlock):
    """Wraps a registered block (kept as `self.block`, parameters shared) with a choice per bit width.

    Args:
        block: a block type registered in pyeff.dynamic (pyeff BasicBlock / PreActBlock /
            DenseLayer, torchvision BasicBlock / Bottleneck, or your own).
        bits: the choices (validated by `check_bits`), e.g. (0, 8, 10, 12, 14, 16, 32).
        index: this block's position among the gated blocks (the gate's step).
        train_mode: "all" (paper-exact) or "routed" (see the module docstring).
    """

    def __init__(self, block: nn.Module, bits: Sequence[int], index: int = 0, train_mode: str = "all"):
        super().__init__(block, index, "pyeff.dfs")
        if train_mode not in TRAIN_MODES:
            raise ValueError(f"pyeff.dfs: train_mode must be one of {TRAIN_MODES}, got {train_mode!r}")
        self.bits = check_bits(bits)
        self.train_mode = train_mode
        nconv = len(self.spec.convs)
        self.register_buffer("act_range", torch.full((nconv, 2), float("nan")))
        self.register_buffer("act_count", torch.zeros(nconv, dtype=torch.int64))
        self._ctl: DFSController | None = None
        # skip = identity: at inference the other groups are written into the block's input in place
        self._skip_inplace = 0 if self.bits[0] == 0 and self.spec.identity_shortcut(block) else None

    def extra_repr(self) -> str:
        return f"index={self.index}, bits={self.bits}, train_mode={self.train_mode!r}"

    # -- activation ranges --------------------------------------------------------------------
    def _observe(self, i: int, x: Tensor, momentum) -> tuple[float, float]:
        """Batch mean of per-sample min / max of x; folds it into the running range of conv i."""
        with torch.no_grad():
            flat = x.detach().reshape(x.shape[0], -1)
            lo, hi = (float(v) for v in torch.stack([flat.amin(1).mean(), flat.amax(1).mean()]).tolist())
            r, c = self.act_range[i], self.act_count[i]
            if int(c) == 0:
                r.copy_(torch.tensor([lo, hi]))
            else:
                m = 1.0 / (int(c) + 1) if momentum is None else momentum
                r.mul_(1 - m).add_(torch.tensor([lo, hi], dtype=r.dtype), alpha=m)
            c.add_(1)
        return lo, hi

    def _quant_eval(self, i: int, conv: nn.Conv2d, x: Tensor, b: int, bn, relu: bool) -> Tensor:
        lo, hi = self.act_range[i].tolist()
        kw = dict(w_bits=b, a_bits=b)
        if bn is not None and self._folding() and bn_foldable(bn):  # BN (and ReLU) in the engine's epilogue
            kw["out_scale"], kw["bias"] = bn_affine(bn, conv.bias)
            kw["relu"], bn, relu = relu, None, False
        if lo == lo:
            # the running range as the quantiser's range: values outside saturate, exactly as if x
            # were clipped to it first (what the paper does), with no clip copy and no min-max
            # pass. The quantiser's range always holds 0; a running range that does not is
            # clipped explicitly.
            if lo > 0 or hi < 0:
                x = x.clamp(lo, hi)
            kw["a_range"] = (lo, hi)
        # (never observed: the engine's per-call min-max)
        return _bn_relu(quant_conv2d_of(conv, x, **kw), bn, relu)

    # -- the paths ----------------------------------------------------------------------------
    def _conv_runner(self, bits: int, impl: str) -> Callable:
        ctl = self._ctl
        observe = ctl is not None and ctl.observe
        momentum = ctl.momentum if ctl is not None else 0.1
        spec, blk = self.spec, self.block

        def conv(i, x):
            if bits == FULL:
                if observe:
                    self._observe(i, x, momentum)
                return self.folded_conv(i, x)
            m, bn, relu = spec.conv(blk, i), spec.bn(blk, i), spec.convs[i].relu
            if impl == "engine":
                if observe:
                    self._observe(i, x, momentum)
                    return _bn_relu(quant_conv2d_of(m, x, w_bits=bits, a_bits=bits), bn, relu)
                return self._quant_eval(i, m, x, bits, bn, relu)
            # "fake": fake-quantised float conv with straight-through gradients (training)
            if observe:
                lo, hi = self._observe(i, x, momentum)
            else:
                lo, hi = self.act_range[i].tolist()
            if lo == lo:
                x = x.clamp(lo, hi)
            xq = fake_quant(x, bits)
            wq = fake_quant(m.weight, bits, scheme="sym", axis=0)
            return _bn_relu(F.conv2d(xq, wq, m.bias, m.stride, m.padding, m.dilation, m.groups), bn, relu)
        return conv

    def residual(self, x: Tensor, bits: int, impl: str = "engine") -> Tensor:
        """The residual branch at `bits` (32: float). impl: "engine" (integer arithmetic) or
        "fake" (fake-quantised float, straight-through; what training uses)."""
        return self.spec.residual(self.block, x, self._conv_runner(bits, impl))

    def shortcut(self, x: Tensor) -> Tensor:
        """The shortcut's output (what the residual branch is combined with)."""
        return self.spec.shortcut_out(self.block, x)

    def paths(self, impl: str = "engine", shortcut: Tensor | None = None) -> list[Callable]:
        """One callable per choice mapping a (sub-)batch to this block's output. With `shortcut`
        given (the shortcut of the whole batch), the paths reuse it: for masked execution only."""
        spec, blk = self.spec, self.block
        combine = spec.combine_fn()
        concat = spec.combine == "concat"

        def make(b):
            def path(x, s=None):  # s: this group's rows of the whole batch's shortcut (routed training)
                if b == 0 and ((shortcut is None and s is None) or concat):
                    return spec.skip(blk, x)
                if s is None:
                    s = shortcut if shortcut is not None else self.shortcut(x)
                return s if b == 0 else combine(self.residual(x, b, impl), s)
            return path
        return [make(b) for b in self.bits]

    def execute(self, x: Tensor, decisions: Tensor, weights: Tensor | None = None, training: bool = False,
                execution: str = "routed", inplace: bool = False) -> Tensor:
        """Run the block for per-sample `decisions` ([N] choice indices). `inplace`: x is an
        activation the caller owns and may be overwritten (the net's own forward)."""
        if training:
            if self.train_mode == "all":
                return masked_all_paths(x, decisions, self.paths("fake", self.shortcut(x)), weights)
            # the shortcut runs on the whole batch (a projection's BatchNorm sees the batch's
            # statistics, as in the plain network), each group takes its rows
            return route(x, decisions, self.paths("fake"), weights, extras=(self.shortcut(x),))
        if execution == "masked":
            return masked_all_paths(x, decisions, self.paths("engine", self.shortcut(x)), weights)
        return route(x, decisions, self.paths("engine"), weights,
                     identity_inplace=self._skip_inplace if inplace else None)

    # per-sample routing is data-dependent control flow (group sizes, which paths run): under
    # torch.compile the gated block runs eagerly (its convs are oneDNN / pyeff kernels already)
    # and the static parts around it compile, with no recompilation per group size
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        ctl = self._ctl
        if ctl is None:
            raise RuntimeError("a DFSBlock runs inside its DFSNet (pyeff.dfs.convert); call the DFSNet")
        if not ctl.training:
            # see DFSNet.channels_last
            x = x.contiguous(memory_format=torch.channels_last if ctl.channels_last else torch.contiguous_format)
        g = ctl.gate(x, self.index)
        decisions = g.decisions
        if ctl.forced is not None:
            f = ctl.forced
            decisions = (f[:, self.index] if f.dim() == 2 else f[self.index].expand(x.shape[0])).to(x.device)
        ctl.decisions.append(decisions)
        if not (ctl.training or torch.is_grad_enabled()):  # inference: the cost is a table lookup
            ctl.block_costs.append(ctl.costs[decisions])
            return self.execute(x, decisions, None, False, ctl.execution, inplace=ctl.inplace_skip)
        # the cost carries the gate's gradient
        weights = g.weights if ctl.forced is None else straight_through(
            F.one_hot(decisions, len(self.bits)).to(g.probs.dtype), g.probs)
        ctl.block_costs.append(weights @ ctl.costs.to(weights.dtype))
        use_w = weights if (ctl.training and torch.is_grad_enabled()) else None
        return self.execute(x, decisions, use_w, ctl.training, ctl.execution, inplace=ctl.inplace_skip)
