"""Static channel pruning, the baseline DDI is compared against at equal FLOPs: every block keeps
the same fraction of its inner channels (those between its convs), chosen by the L1 norm of the
first conv's filters (Li et al., "Pruning Filters for Efficient ConvNets"), and the network is
physically slimmed: the result is an ordinary, smaller dense network.

    slim = prune_inner_channels(model, keep=0.5)
    slim = prune_to_flops(model, 0.25, input_size=(3, 32, 32))   # keep chosen to hit 25% of the FLOPs
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from pyeff.dynamic import block_spec, module_flops
from pyeff.dynamic.blocks import find_supported, supported_blocks


def _slice_conv(conv: nn.Conv2d, idx: torch.Tensor, dim: int) -> nn.Conv2d:
    w = conv.weight.detach().index_select(dim, idx)
    new = nn.Conv2d(w.shape[1] * conv.groups, w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    new.weight.data.copy_(w)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.detach().index_select(0, idx) if dim == 0 else conv.bias.detach())
    return new


def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight.data.copy_(bn.weight.detach()[idx])
        new.bias.data.copy_(bn.bias.detach()[idx])
    if bn.track_running_stats:
        new.running_mean.copy_(bn.running_mean[idx])
        new.running_var.copy_(bn.running_var[idx])
        new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def prune_inner_channels(model: nn.Module, keep: float) -> nn.Module:
    """A copy of `model` whose every supported block keeps round(keep x width) inner channels
    (at least one), the ones whose first-conv filters have the largest L1 norm."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep is the fraction of inner channels to keep, in (0, 1], got {keep}")
    model = copy.deepcopy(model)
    blocks = find_supported(model)
    if not blocks:
        raise TypeError(f"prune_inner_channels: {type(model).__name__} has no registered block (registered: "
                        f"{', '.join(supported_blocks())}; add yours with pyeff.dynamic.register_block)")
    for _, blk in blocks:
        spec = block_spec(blk)
        width = spec.inner_width(blk)
        k = max(1, int(round(keep * width)))
        idx = _importance(blk).argsort(descending=True)[:k].sort().values
        for attr, dim in spec.inner_params():
            m = getattr(blk, attr)
            new = _slice_bn(m, idx) if isinstance(m, nn.BatchNorm2d) else _slice_conv(m, idx, dim)
            setattr(blk, attr, new.train(m.training).to(m.weight.device))
        if hasattr(blk, "width"):  # DenseLayer records its inner width
            blk.width = k
    return model


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
        slim = prune_inner_channels(model, max(mid, 1e-6))
        f = module_flops(slim.eval(), x) / dense
        if f <= fraction:
            lo, best = mid, (slim, mid, f)
        else:
            hi = mid
        if best is not None and fraction - best[2] < tol:
            break
    model.train(was)
    if best is None:
        raise ValueError(f"prune_to_flops: even one inner channel per block costs more than {100 * fraction:.1f}% of "
                         "the FLOPs (the stem, shortcuts and head stay)")
    return best[0], best[1]
