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

from typing import Iterable

import torch
from torch import Tensor, nn

from pyeff.dfs.block import DFSBlock, DFSController
from pyeff.dfs.config import FULL, HW_BITS, PAPER_BITS, DFSConfig
from pyeff.dynamic import choice_costs
from pyeff.dynamic.net import DynamicNet


class DFSNet(DynamicNet):
    """A converted residual network. Attributes: `model` (the network, its gated blocks wrapped),
    `gate` (the shared RecurrentGate), `config` (the DFSConfig it was built from), `bits`,
    `blocks` (the DFSBlocks in execution order).

    At inference, a gated block whose shortcut is the identity writes its executed samples into its
    input tensor (an activation of this forward), so skipped rows are never copied; set
    `net.inplace_skip = False` if your model reuses a block's input elsewhere."""

    method = "pyeff.dfs"
    config_class = DFSConfig

    def __init__(self, model: nn.Module, config: DFSConfig):
        super().__init__(model, config)
        self.bits = config.bits
        found = self._found()
        wrapped = self._install([n for n, _ in found], [b for _, b in found])
        gate_bias = config.gate_bias
        if gate_bias is None:  # start at full execution (the last choice is the widest)
            gate_bias = [0.0] * (len(self.bits) - 1) + [2.0]
        self.gate = self._make_gate(gate_bias, config.embed_dim, config.hidden_dim)
        self.register_buffer("costs", choice_costs(self.bits), persistent=False)
        self._ctl.gate, self._ctl.costs = self.gate, self.costs
        self.freeze_base = False
        # CPU inference runs channels_last, where oneDNN's convs are faster (2-4x at 16 channels):
        # `stem_channels_last` converts the input, `channels_last` keeps the gated blocks in that
        # layout (False: they turn it back to NCHW)
        self.stem_channels_last = True
        self.channels_last = True
        del wrapped

    def _make_controller(self):
        return DFSController()

    def _wrap(self, block: nn.Module, index: int) -> DFSBlock:
        return DFSBlock(block, self.config.bits, index=index, train_mode=self.config.train_mode)

    def _num_choices(self) -> int:
        return len(self.config.bits)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.freeze_base:  # phase 2: BN statistics of the frozen network stay put
            self.model.eval()
        return self

    def forward(self, x: Tensor):
        self._check_input(x)
        ctl = self._ctl
        ctl.reset()
        ctl.training = self.training
        ctl.observe = self.training and not self.freeze_base
        ctl.momentum = 0.1
        cpu_eval = not self.training and x.device.type == "cpu"
        if self.stem_channels_last and cpu_eval:
            x = x.contiguous(memory_format=torch.channels_last)  # see __init__
        ctl.channels_last = self.channels_last and cpu_eval
        try:
            logits = self.model(x)
            cost = torch.stack(ctl.block_costs, 1).mean(1)
            decisions = torch.stack(ctl.decisions, 1)
        finally:
            ctl.reset()
        return logits, {"cost": cost, "decisions": decisions}

    # -- decisions --------------------------------------------------------------------------
    def forced(self, decisions):
        """Within the block, every gated block takes the given choice index: a [G] tensor/list
        (one per block, all samples) or [N, G] (per sample). The gate still runs (its cost is
        real); only its answer is replaced."""
        d = torch.as_tensor(decisions)
        G = len(self.blocks)
        if d.dtype in (torch.bool,) or d.is_floating_point() or d.is_complex():
            raise TypeError(f"decisions must be integer choice indices, got {d.dtype}")
        d = d.to(torch.int64)
        if d.shape[-1:] != (G,) or d.dim() not in (1, 2):
            raise ValueError(f"decisions must have shape [{G}] or [N, {G}], got {tuple(d.shape)}")
        if d.numel() and (int(d.min()) < 0 or int(d.max()) >= len(self.bits)):
            raise ValueError(f"decisions must be choice indices in [0, {len(self.bits)})")
        return self._forcing(forced=d)

    fixed_decisions = forced

    def choice_index(self, bits: int) -> int:
        if bits not in self.bits:
            raise ValueError(f"{bits} is not one of this net's choices {self.bits}")
        return self.bits.index(bits)

    # -- calibration --------------------------------------------------------------------------
    def calibrate(self, batches: Iterable, bits: int | None = None) -> "DFSNet":
        """Set every gated conv's activation range (cumulative mean over `batches` of the batch
        mean of per-sample min/max) by running the blocks at `bits` (default: the widest choice)
        at inference: BatchNorm statistics are not changed. Needed before evaluating a converted
        net that was not trained."""
        return super().calibrate(batches, bits=bits)

    def _calibrate_begin(self, bits=None):
        k = self.choice_index(bits if bits is not None else max(self.bits))
        if self.bits[k] == 0:
            raise ValueError("calibrate with a bit width that runs the convs, not 0 (skip)")
        for b in self.blocks:
            b.act_range.fill_(float("nan"))
            b.act_count.zero_()
        return k

    def _calibrate_batch(self, x: Tensor, k) -> None:
        ctl = self._ctl
        with self.forced([k] * len(self.blocks)):
            ctl.reset()
            ctl.training, ctl.observe, ctl.momentum, ctl.channels_last = False, True, None, False
            try:
                self.model(x)
            finally:
                ctl.observe, ctl.momentum = False, 0.1
                ctl.reset()

    # -- statistics ---------------------------------------------------------------------------
    def _stats_begin(self):
        return torch.zeros(len(self.blocks), len(self.bits), dtype=torch.int64)

    def _stats_batch(self, counts, aux: dict) -> None:
        counts += torch.nn.functional.one_hot(aux["decisions"].cpu(), len(self.bits)).sum(0)

    def _stats_end(self, counts, n: int) -> dict:
        return {"bits": list(self.bits), "blocks": list(self.block_names), "counts": counts.tolist()}

    def decision_stats(self, loader) -> dict:
        """Per block and choice, how many samples took it; the computation percentage (100 x mean
        bit-product cost over samples and gated blocks); accuracy when the loader yields labels."""
        out = self.evaluate(loader)
        out["computation_pct"] = out["cost_pct"]
        return out


def convert(model: nn.Module, config: DFSConfig | None = None, *, copy_model: bool = True, **overrides) -> DFSNet:
    """Wrap every registered block of `model` but the first in a DFSBlock sharing one RecurrentGate.

    Args:
        model: any network whose residual blocks are registered in pyeff.dynamic (pyeff's CIFAR
            ResNets and DenseNets, torchvision ResNets, or a block type you register).
        config: a DFSConfig (default: DFSConfig()); `overrides` replace its fields, e.g.
            convert(model, bits=(0, 8, 32), train_mode="routed").
        copy_model: convert a deep copy (default) rather than `model` itself.

    The converted net is in the model's mode (train or eval); conversion runs no forward, so it
    changes no BatchNorm statistics.
    """
    hint = " (give bits as convert(model, bits=...))" if isinstance(config, (tuple, list)) else ""
    return DFSNet.convert(model, config, copy_model=copy_model, misuse=hint, **overrides)


__all__ = ["convert", "DFSNet", "DFSConfig", "PAPER_BITS", "HW_BITS", "FULL"]
