"""Static channel pruning, the baseline DDI is compared against at equal FLOPs: every block keeps
the same fraction of its inner channels (those between its convs), chosen by the L1 norm of the
first conv's filters (Li et al., "Pruning Filters for Efficient ConvNets"), and the network is
physically slimmed by pyeff.prune.slim (the package's one pruner): the result is an ordinary,
smaller dense network.

    slim = prune_inner_channels(model, keep=0.5)
    slim = prune_to_flops(model, 0.25, input_size=(3, 32, 32))   # keep chosen to hit 25% of the FLOPs
"""
from __future__ import annotations

import torch
from torch import nn

from pyeff.dynamic import block_spec, module_flops
from pyeff.dynamic.blocks import find_supported, supported_blocks
from pyeff.prune import slim


def prune_inner_channels(model: nn.Module, keep: float, example_input=None) -> nn.Module:
    """A copy of `model` whose every supported block keeps round(keep x width) inner channels
    (at least one), the ones whose first-conv filters have the largest L1 norm. The surgery is
    pyeff.prune.slim's (one pruner for the package): the mask marks the dropped inner channels
    on the BatchNorm after each inner conv."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep is the fraction of inner channels to keep, in (0, 1], got {keep}")
    blocks = find_supported(model)
    if not blocks:
        raise TypeError(f"prune_inner_channels: {type(model).__name__} has no registered block (registered: "
                        f"{', '.join(supported_blocks())}; add yours with pyeff.dynamic.register_block)")
    names = {m: n for n, m in model.named_modules()}
    mask = {}
    for _, blk in blocks:
        spec = block_spec(blk)
        width = spec.inner_width(blk)
        k = max(1, int(round(keep * width)))
        stay = torch.zeros(width, dtype=torch.bool)
        stay[_importance(blk).argsort(descending=True)[:k].cpu()] = True
        for i in range(len(spec.convs) - 1):  # every conv whose outputs are inner channels
            bn = spec.bn(blk, i)
            if not isinstance(bn, nn.BatchNorm2d):
                raise TypeError(f"prune_inner_channels: {type(blk).__name__}.{spec.convs[i].conv} has no BatchNorm2d "
                                "after it; the pruner marks dropped channels on that BatchNorm")
            mask[names[bn]] = stay
    return slim(model, mask, example_input)


def _importance(blk: nn.Module) -> torch.Tensor:
    """L1 norm of each inner channel's filter in the block's first conv."""
    return block_spec(blk).conv(blk, 0).weight.detach().abs().flatten(1).sum(1)


@torch.no_grad()
def sort_inner_channels(model: nn.Module) -> nn.Module:
    """In place, reorder every supported block's inner channels by importance (L1 norm of the first
    conv's filters, largest first). The function is unchanged; afterwards a prefix of the inner
    channels is the most important subset of its size (what DDI's width mode runs)."""
    for _, blk in find_supported(model):
        perm = _importance(blk).argsort(descending=True)
        for attr, dim in block_spec(blk).inner_params():
            m = getattr(blk, attr)
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean, m.running_var):
                    if t is not None:
                        t.copy_(t[perm])
            else:
                m.weight.copy_(m.weight.index_select(dim, perm))
                if m.bias is not None and dim == 0:
                    m.bias.copy_(m.bias[perm])
    return model


def prune_to_flops(model: nn.Module, fraction: float, input_size=(3, 32, 32), tol: float = 0.005) -> tuple:
    """(slimmed model, keep) with `keep` found by bisection so that the slimmed network's FLOPs are
    `fraction` of `model`'s (as close as whole channels allow); raises if even one channel per block
    costs more."""
    x = torch.zeros(1, *input_size)
    was = model.training
    model.eval()
    dense = module_flops(model, x)
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(30):
        mid = (lo + hi) / 2
        small = prune_inner_channels(model, max(mid, 1e-6), x)
        f = module_flops(small.eval(), x) / dense
        if f <= fraction:
            lo, best = mid, (small, mid, f)
        else:
            hi = mid
        if best is not None and fraction - best[2] < tol:
            break
    model.train(was)
    if best is None:
        raise ValueError(f"prune_to_flops: even one inner channel per block costs more than {100 * fraction:.1f}% of "
                         "the FLOPs (the stem, shortcuts and head stay)")
    return best[0], best[1]
