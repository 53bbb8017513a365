"""What actually ran, per sample, and the loss that pushes it toward a target.

Costs are relative to full execution (1.0 = the dense model). The DFS/DDI hinge:
    loss = beta * mean(cost) * (+1 if the batch's cost is above target else -1)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def bit_cost(bits: int | None) -> float:
    """Cost of one choice relative to full precision: the bit product (b/32)^2; skip (0 or None)
    costs 0 and full precision (32) costs 1."""
    if not bits:
        return 0.0
    return min(bits, 32) ** 2 / 1024.0


def choice_costs(choices: Sequence[int | None]) -> Tensor:
    return torch.tensor([bit_cost(b) for b in choices])


def module_flops(module: nn.Module, *inputs: Tensor) -> int:
    """FLOPs of one forward call (torch.utils.flop_counter: a multiply-add counts 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


class CostMeter:
    """Accumulates, per sample, the cost of what ran in each gated block. The per-sample costs stay
    differentiable (they are built from the gates' straight-through weights)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.spent: Tensor | None = None
        self.full = 0.0
        self.per_block: list[Tensor] = []

    def add(self, cost: Tensor, full: float = 1.0) -> None:
        """`cost`: [N] cost of this block per sample, in the same unit as `full` (its dense cost)."""
        self.spent = cost if self.spent is None else self.spent + cost
        self.full += float(full)
        self.per_block.append(cost.detach())

    def fraction(self) -> Tensor:
        """[N] cost per sample relative to running every gated block in full."""
        if self.spent is None:
            raise RuntimeError("no gated block reported its cost since the last reset()")
        return self.spent / self.full

    def percentage(self) -> float:
        return 100.0 * float(self.fraction().detach().mean())


def hinge_cost_loss(fraction: Tensor, target: float, beta: float) -> Tensor:
    """beta * mean cost, signed to push the batch's cost toward `target` (a fraction in [0, 1])."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target is a fraction of full cost in [0, 1], got {target}")
    mean = fraction.mean()
    sign = 1.0 if float(mean.detach()) > target else -1.0
    return beta * sign * mean
