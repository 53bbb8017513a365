"""`convert(model, bits)`: a residual network with DFS gating.

    net = pyeff.dfs.convert(pyeff.models.create_model("resnet38"), bits=(0, 8, 16, 32))
    logits, aux = net(x)           # aux["cost"]: [N] fraction of full cost (differentiable)
                                   # aux["decisions"]: [N, gated blocks] choice indices
    stats = net.decision_stats(loader)

The model's own forward runs unchanged: its residual blocks (all but the first, which stays full
precision with the stem, as in the paper) are replaced in a copy by DFSBlocks that consult one
shared RecurrentGate. The gate of block i reads block i's input, i.e. block i-1's output.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from pyeff.dfs.block import FULL, DFSBlock, _Controller, block_kind, check_bits, run_full
from pyeff.dynamic import RecurrentGate, choice_costs
from pyeff.dynamic.modules import FusedInference, find_blocks, fused_sequential, replace_submodule, swapped

PAPER_BITS = (0, 8, 10, 12, 14, 16, 32)
HW_BITS = (0, 4, 8, 16, 32)


def _residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return find_blocks(model, lambda m: block_kind(m) is not None)


def _grow_weight_cache(entries: int) -> None:
    """pyeff.ops.quant_conv caches each weight's quantised, packed form per bit width in an LRU of
    64 entries; a gated ResNet-38 at 3 widths has ~200 (conv, width) pairs, 2 entries each, and an
    LRU smaller than that re-packs every weight on every call (measured: prepacking was a third of
    the quantised paths' time). Grow it to hold the whole network."""
    from pyeff.ops import quant_conv as qc
    qc._CACHE_SIZE = max(qc._CACHE_SIZE, 2 * entries + 64)


class DFSNet(nn.Module):
    """A converted residual network. Attributes: `model` (the network, its gated blocks wrapped),
    `gate` (the shared RecurrentGate), `bits`, `blocks` (the DFSBlocks in execution order).

    At inference, a gated block whose shortcut is the identity writes its executed samples into its
    input tensor (an activation of this forward), so skipped rows are never copied; set
    `net.inplace_skip = False` if your model reuses a block's input elsewhere."""

    def __init__(self, model: nn.Module, bits: Sequence[int], train_mode: str = "all", gate_bias=None,
                 embed_dim: int = 10, hidden_dim: int = 10):
        super().__init__()
        self.bits = check_bits(bits)
        found = _residual_blocks(model)
        if len(found) < 2:
            raise TypeError(f"pyeff.dfs.convert: {type(model).__name__} has {len(found)} supported residual "
                            "block(s); DFS needs at least two (the first stays ungated). Supported: pyeff's "
                            "CIFAR ResNets (BasicBlock, PreActBlock) and torchvision ResNets (BasicBlock, "
                            "Bottleneck)")
        self.model = model
        wrapped = []
        for i, (name, blk) in enumerate(found[1:]):
            d = DFSBlock(blk, self.bits, index=i, train_mode=train_mode)
            replace_submodule(model, name, d)
            wrapped.append(d)
        self.block_names = [n for n, _ in found[1:]]
        # the ungated start (the stem, the first block) runs with BN folded and ReLU in place at
        # inference too, as the gated blocks do
        first = found[0][1]
        first.forward = FusedInference(first, functools.partial(run_full, kind=block_kind(first)))
        if isinstance(getattr(model, "stem", None), nn.Sequential):
            model.stem.forward = FusedInference(model.stem, fused_sequential)
        if gate_bias is None:  # start at full execution (the last choice is the widest)
            gate_bias = [0.0] * (len(self.bits) - 1) + [2.0]
        self.gate = RecurrentGate([d.in_channels for d in wrapped], len(self.bits), embed_dim, hidden_dim,
                                  mode="argmax", bias=gate_bias)
        self.register_buffer("costs", choice_costs(self.bits), persistent=False)
        self._ctl = _Controller(self.gate, self.costs)
        for d in wrapped:
            d._ctl = self._ctl
        self.freeze_base = False
        # CPU inference runs channels_last, where oneDNN's convs are faster (2-4x at 16 channels):
        # `stem_channels_last` converts the input, `channels_last` keeps the gated blocks in that
        # layout (False: they turn it back to NCHW)
        self.stem_channels_last = True
        self.channels_last = True
        _grow_weight_cache(sum(b.act_range.shape[0] for b in wrapped) * sum(1 for b in self.bits if 0 < b < FULL))

    @property
    def blocks(self) -> list[DFSBlock]:
        return [m for m in self.model.modules() if isinstance(m, DFSBlock)]

    @property
    def train_mode(self) -> str:
        return self.blocks[0].train_mode

    @train_mode.setter
    def train_mode(self, mode: str) -> None:
        from pyeff.dfs.block import TRAIN_MODES
        if mode not in TRAIN_MODES:
            raise ValueError(f"pyeff.dfs: train_mode must be one of {TRAIN_MODES}, got {mode!r}")
        for b in self.blocks:
            b.train_mode = mode

    def base_parameters(self):
        return self.model.parameters()

    def gate_parameters(self):
        return self.gate.parameters()

    @property
    def inplace_skip(self) -> bool:
        return self._ctl.inplace_skip

    @inplace_skip.setter
    def inplace_skip(self, value: bool) -> None:
        self._ctl.inplace_skip = bool(value)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_base:  # phase 2: BN statistics of the frozen network stay put
            self.model.eval()
        return self

    def forward(self, x: Tensor):
        ctl = self._ctl
        ctl.reset()
        ctl.training = self.training
        ctl.observe = self.training and not self.freeze_base
        ctl.momentum = 0.1
        cpu_eval = not self.training and x.device.type == "cpu" and x.dim() == 4
        if self.stem_channels_last and cpu_eval:
            x = x.contiguous(memory_format=torch.channels_last)  # see __init__
        ctl.channels_last = self.channels_last and cpu_eval
        logits = self.model(x)
        cost = torch.stack(ctl.block_costs, 1).mean(1)
        decisions = torch.stack(ctl.decisions, 1)
        ctl.reset()
        return logits, {"cost": cost, "decisions": decisions}

    # -- decisions --------------------------------------------------------------------------
    @contextlib.contextmanager
    def fixed_decisions(self, decisions):
        """Within the block, every gated block takes the given choice index: a [G] tensor/list
        (one per block, all samples) or [N, G] (per sample). The gate still runs (its cost is
        real); only its answer is replaced."""
        d = torch.as_tensor(decisions, dtype=torch.int64)
        G = len(self.blocks)
        if d.shape[-1] != G or d.dim() not in (1, 2):
            raise ValueError(f"decisions must have shape [{G}] or [N, {G}], got {tuple(d.shape)}")
        if int(d.min()) < 0 or int(d.max()) >= len(self.bits):
            raise ValueError(f"decisions must be choice indices in [0, {len(self.bits)})")
        with swapped(self._ctl, forced=d):
            yield self

    def choice_index(self, bits: int) -> int:
        if bits not in self.bits:
            raise ValueError(f"{bits} is not one of this net's choices {self.bits}")
        return self.bits.index(bits)

    @contextlib.contextmanager
    def execution(self, mode: str):
        """Eval execution: "routed" (default, only the chosen path) or "masked" (every candidate,
        then the one-hot mask: the paper's execution, for comparison)."""
        if mode not in ("routed", "masked"):
            raise ValueError(f"execution must be 'routed' or 'masked', got {mode!r}")
        with swapped(self._ctl, execution=mode):
            yield self

    @torch.no_grad()
    def calibrate(self, batches: Iterable, bits: int | None = None) -> "DFSNet":
        """Set every gated conv's activation range (cumulative mean over `batches` of the batch
        mean of per-sample min/max) by running the blocks at `bits` (default: the widest choice)
        with BN in eval mode. Needed before evaluating a converted net that was not trained."""
        was = self.training
        self.eval()
        for b in self.blocks:
            b.act_range.fill_(float("nan"))
            b.act_count.zero_()
        k = self.choice_index(bits if bits is not None else max(self.bits))
        G = len(self.blocks)
        if self.bits[k] == 0:
            raise ValueError("calibrate with a bit width that runs the convs, not 0 (skip)")
        try:
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                ctl = self._ctl
                with self.fixed_decisions([k] * G):
                    ctl.reset()
                    ctl.training, ctl.observe, ctl.momentum, ctl.channels_last = False, True, None, False
                    self.model(x)
        finally:
            self._ctl.observe, self._ctl.momentum = False, 0.1
            self._ctl.reset()
            self.train(was)
        return self

    @torch.no_grad()
    def decision_stats(self, loader) -> dict:
        """Per block and choice, how many samples took it; the computation percentage (100 x mean
        bit-product cost over samples and gated blocks); accuracy when the loader yields labels."""
        was = self.training
        self.eval()
        G, K = len(self.blocks), len(self.bits)
        counts = torch.zeros(G, K, dtype=torch.int64)
        cost_sum, n, correct = 0.0, 0, 0
        try:
            for batch in loader:
                x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
                logits, aux = self(x)
                d = aux["decisions"].cpu()
                counts += torch.nn.functional.one_hot(d, K).sum(0)
                cost_sum += float(aux["cost"].double().sum())
                n += x.shape[0]
                if y is not None:
                    correct += int((logits.argmax(1) == y).sum())
        finally:
            self.train(was)
        out = {"bits": list(self.bits), "blocks": self.block_names, "counts": counts.tolist(),
               "samples": n, "computation_pct": 100.0 * cost_sum / max(n, 1)}
        if n and correct is not None:
            out["accuracy"] = correct / n
        return out


def convert(model: nn.Module, bits: Sequence[int] = PAPER_BITS, train_mode: str = "all", gate_bias=None,
            copy_model: bool = True, embed_dim: int = 10, hidden_dim: int = 10) -> DFSNet:
    """Wrap every residual block of `model` but the first in a DFSBlock sharing one RecurrentGate.

    Args:
        model: pyeff CIFAR ResNet (BasicBlock / PreActBlock) or torchvision ResNet (BasicBlock /
            Bottleneck) - any module whose residual blocks are of those types.
        bits: the choices: 0 = skip, 2..16 = quantised residual branch, 32 = full precision.
        train_mode: "all" (paper: every candidate, masked) or "routed" (only the chosen path).
        gate_bias: initial logits bias of the gate head (default: favour the widest choice).
        copy_model: convert a deep copy (default) rather than `model` itself.
    """
    bits = check_bits(bits)
    if not isinstance(model, nn.Module):
        raise TypeError(f"pyeff.dfs.convert expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DFSNet):
        raise TypeError("pyeff.dfs.convert: the model is already a DFSNet")
    return DFSNet(copy.deepcopy(model) if copy_model else model, bits, train_mode, gate_bias, embed_dim,
                  hidden_dim)


__all__ = ["convert", "DFSNet", "PAPER_BITS", "HW_BITS", "FULL"]
