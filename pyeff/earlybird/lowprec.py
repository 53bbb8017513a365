"""The low-precision search of Early-Bird (the paper's EB variant): while the ticket is searched,
every conv and linear layer computes with `bits`-bit weights and activations and passes `bits`-bit
gradients back, all with stochastic rounding (pyeff.ops.fake_quant, one scale per tensor: block
floating point with one block per tensor).

    handle = low_precision_(model, bits=8)     # in place; the model trains as usual
    ...                                        # search with EarlyBird + SlimmingPenalty
    handle.remove()                            # full precision again (e.g. for the slim retrain)

Each call draws its rounding seeds from a torch.Generator seeded by `seed`, so a run is repeatable.
On CPUs this simulates the arithmetic (fake quantisation costs time, it does not save it): its
measured time against the float search is in bench/results/earlybird-*.md.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from pyeff.ops import fake_quant


class _QuantGrad(torch.autograd.Function):
    """Identity forward; the gradient stochastically rounded to `bits` bits on the way back."""

    @staticmethod
    def forward(ctx, x, bits, seed):
        ctx.bits, ctx.seed = bits, seed
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if not torch.isfinite(g).all() or g.abs().max() == 0:
            return g, None, None
        # one scale per channel (axis 1): a block of the block floating point per output channel
        return fake_quant(g.contiguous(), ctx.bits, scheme="sym", axis=1, stochastic=True, seed=ctx.seed), None, None


class LowPrecisionHandle:
    def __init__(self, modules):
        self.modules = modules

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("forward", None)
        self.modules = []


def low_precision_(model: nn.Module, bits: int = 8, seed: int = 0) -> LowPrecisionHandle:
    """Make every nn.Conv2d and nn.Linear of `model` compute at `bits` bits (weights, activations and
    output gradients, stochastic rounding), in place."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"low_precision_: bits must be an integer in 2..16, got {bits!r}")
    if any("forward" in m.__dict__ for m in model.modules()):
        raise ValueError("low_precision_: the model already has a patched forward (a mask or low precision); "
                         "remove it first")
    gen = torch.Generator().manual_seed(int(seed))

    def draw() -> int:
        return int(torch.randint(0, 2**31 - 1, (1,), generator=gen))

    def q(t):
        return fake_quant(t, bits, scheme="sym", stochastic=True, seed=draw())

    def conv_forward(self, x):
        y = F.conv2d(q(x), q(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)
        return _QuantGrad.apply(y, bits, draw()) if y.requires_grad else y

    def linear_forward(self, x):
        y = F.linear(q(x), q(self.weight), self.bias)
        return _QuantGrad.apply(y, bits, draw()) if y.requires_grad else y

    patched = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise NotImplementedError(f"low_precision_: padding_mode {m.padding_mode!r} is not supported")
            m.forward = types.MethodType(conv_forward, m)
        elif isinstance(m, nn.Linear):
            m.forward = types.MethodType(linear_forward, m)
        else:
            continue
        patched.append(m)
    if not patched:
        raise ValueError(f"low_precision_: {type(model).__name__} has no Conv2d or Linear layer")
    return LowPrecisionHandle(patched)
