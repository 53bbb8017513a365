"""Per-layer cost tables for DDI: what a sample pays for each part of the network, in FLOPs,
energy from per-operation unit costs, or latency measured on the running machine.

A gated block costs `fixed` (its shortcut, paid by every sample) plus, when executed,
`c0 + c1 r + c2 r^2` where r is the fraction of its inner channels that are active (conv1's
output channels scale one way, conv2's input channels another; a Bottleneck's middle conv both).
The rest of the network is ungated: per stage (the stem counts in stage 0), the final head and one
early-exit head per stage but the last. `dense` is the whole dense network (no gates, no exits).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from pyeff.ddi.config import UNITS
from pyeff.dynamic.modules import module_inputs
from pyeff.energy import EnergyModel

UNIT_LABELS = {"flops": "FLOPs / sample", "energy": "pJ / sample", "latency": "ms / sample"}


@dataclass
class BlockCost:
    stage: int
    fixed: float
    c0: float
    c1: float
    c2: float

    def exec_cost(self, r):
        return self.c0 + self.c1 * r + self.c2 * r * r

    @property
    def full(self) -> float:
        return self.fixed + self.c0 + self.c1 + self.c2


@dataclass
class CostTable:
    unit: str
    blocks: list[BlockCost]
    ungated: list[float]
    head: float
    exits: list[float] = field(default_factory=list)

    @property
    def dense(self) -> float:
        return sum(self.ungated) + sum(b.full for b in self.blocks) + self.head

    def exit_cost(self, stage: int) -> float:
        return self.head if stage == len(self.ungated) - 1 else self.exits[stage]

    def mandatory(self, stage: int) -> float:
        """What every sample pays when the network halts after `stage` with every gated block skipped."""
        return (sum(self.ungated[:stage + 1]) + sum(b.fixed for b in self.blocks if b.stage <= stage)
                + self.exit_cost(stage))

    def full_to(self, stage: int) -> float:
        """What a sample pays when every block runs in full and the network halts after `stage`."""
        return (sum(self.ungated[:stage + 1]) + sum(b.full for b in self.blocks if b.stage <= stage)
                + self.exit_cost(stage))

    def reserve_after(self, index: int, stage: int) -> float:
        """The mandatory cost not yet charged after gated block `index` when halting after `stage`:
        the later blocks' shortcuts, the later stages' ungated parts (charged when a stage starts)
        and the exit."""
        b = self.blocks[index]
        return (sum(c.fixed for c in self.blocks[index + 1:] if c.stage <= stage)
                + sum(self.ungated[b.stage + 1:stage + 1]) + self.exit_cost(stage))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        return cls(d["unit"], [BlockCost(**b) for b in d["blocks"]], list(d["ungated"]), d["head"], list(d["exits"]))


# --------------------------------------------------------------------------------------------
# analytic costs of one conv / linear, as terms r_in^a r_out^b


def _module_terms(m: nn.Module, x: Tensor, y: Tensor, unit: str, energy: EnergyModel) -> dict:
    """{(a, b): cost per sample} with a/b = 1 where the term scales with the fraction of active
    input/output channels."""
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        macs = (m.in_channels // m.groups) * kh * kw * y[0].numel()
    else:  # Linear
        macs = m.in_features * m.out_features
    if unit == "flops":
        return {(1, 1): 2.0 * macs}
    return {(1, 1): macs * energy.mac_pj + m.weight.numel() * energy.weight_pj,
            (1, 0): x[0].numel() * energy.act_pj, (0, 1): y[0].numel() * energy.act_pj}


def _costed_modules(root: nn.Module):
    return [m for m in root.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def build_table(net, x: Tensor, unit: str = "flops", energy: EnergyModel | None = None, repeats: int = 5) -> CostTable:
    """The cost table of a DDINet for inputs like `x` ([B, C, H, W]; a batch of B is timed for
    'latency', only its shape matters otherwise)."""
    if unit not in UNITS:
        raise ValueError(f"cost unit must be one of {UNITS}, got {unit!r}")
    if unit == "latency":
        return _latency_table(net, x, repeats)
    energy = energy or EnergyModel()
    records: dict[nn.Module, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: records.__setitem__(m, (i[0], o)))
             for m in _costed_modules(net)]
    try:
        with net.all_open(), net.unfused():  # the convs' forward hooks record their shapes
            net.eval_all_exits(x[:1])
    finally:
        for h in hooks:
            h.remove()

    def cost_of(root: nn.Module, skip=()) -> float:
        inner = {id(m) for s in skip for m in s.modules()}
        total = 0.0
        for m in _costed_modules(root):
            if id(m) in inner or m not in records:
                continue
            total += sum(_module_terms(m, *records[m], unit, energy).values())
        return total

    blocks = []
    for blk in net.blocks:
        c = [0.0, 0.0, 0.0]
        spec = blk.spec
        for i in range(len(spec.convs)):
            conv = spec.conv(blk.block, i)
            in_g, out_g = spec.gated(i)
            for (a, b), v in _module_terms(conv, *records[conv], unit, energy).items():
                c[a * in_g + b * out_g] += v
        fixed = sum(cost_of(m) for m in spec.shortcut_modules(blk.block))
        blocks.append(BlockCost(blk.stage, fixed, *c))
    stem, stages, head = net.parts
    gated = net.blocks
    ungated = [cost_of(s, gated) for s in stages]
    ungated[0] += cost_of(stem)
    return CostTable(unit, blocks, ungated, cost_of(head), [cost_of(e) for e in net.exits])


# --------------------------------------------------------------------------------------------
# latency measured on this machine


def _time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


@torch.no_grad()
def _latency_table(net, x: Tensor, repeats: int) -> CostTable:
    """Milliseconds per sample at x's batch size, each part timed on its own input (median of
    `repeats`). An executed block is timed with all inner channels and with half of them (a random
    half per sample); the two points give c0 + c1 r."""
    was = net.training
    net.eval()
    stem, stages, head = net.parts
    watched = [stem, head, *net.exits, *net.blocks] + [m for s in stages for m in s.children()]

    def run():
        with net.all_open():
            net.eval_all_exits(x)
    inputs = module_inputs(watched, run)
    n = x.shape[0]

    def per_sample(fn) -> float:
        return 1e3 * _time(fn, repeats) / n

    gen = torch.Generator().manual_seed(0)
    blocks = []
    for blk in net.blocks:
        xi = inputs[blk]
        t_full = per_sample(lambda: blk.exec_path(xi))
        if blk.channel_mode == "width":  # the width nearest one half, as dense sliced convs
            k = min(blk.counts.tolist(), key=lambda c: (abs(c - blk.width / 2), c))
            k = k if k < blk.width else max(1, blk.width // 2)
            path = blk.width_path(k)
            t_half = per_sample(lambda: path(xi))
            r = k / blk.width
        else:
            half = torch.rand(n, blk.width, generator=gen).argsort(1) < max(1, blk.width // 2)
            t_half = per_sample(lambda: blk.exec_path(xi, half.float(), half.to(xi.device)))
            r = float(half.float().mean())
        c1 = max(t_full - t_half, 0.0) / (1.0 - r)
        c0 = max(t_full - c1, 0.0)
        fixed = per_sample(lambda: blk.skip_path(xi)) if blk.spec.shortcut is not None else 0.0
        blocks.append(BlockCost(blk.stage, fixed, c0, c1, 0.0))
    gated = {id(b) for b in net.blocks}
    ungated = []
    for i, s in enumerate(stages):
        t = sum(per_sample(lambda m=m: m(inputs[m])) for m in s.children() if id(m) not in gated)
        ungated.append(t + (per_sample(lambda: stem(inputs[stem])) if i == 0 else 0.0))
    table = CostTable("latency", blocks, ungated, per_sample(lambda: head(inputs[head])),
                      [per_sample(lambda e=e: e(inputs[e])) for e in net.exits])
    net.train(was)
    return table
