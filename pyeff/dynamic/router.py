"""Run each sample of a batch down only the path its gate chose.

`route` groups the batch by decision, runs each non-empty group's path once on the gathered
samples and scatters the results back. An empty group costs nothing; when one group holds the
whole batch its path runs on the batch itself, with no gather and no scatter.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor


def group_indices(decisions: Tensor, num_choices: int) -> list[Tensor | None]:
    """Per choice, the indices of the samples that took it (None when none did), with one pass
    over the decisions and one device-to-host transfer of the counts."""
    if decisions.dim() != 1:
        raise ValueError(f"decisions must be a 1-D tensor of choice indices, got shape {tuple(decisions.shape)}")
    order = torch.argsort(decisions, stable=True)
    counts = torch.bincount(decisions, minlength=num_choices)
    if counts.numel() > num_choices:
        raise ValueError(f"a decision is >= num_choices={num_choices}")
    groups, start = [], 0
    for k, c in enumerate(counts.tolist()):
        groups.append(order[start:start + c] if c else None)
        start += c
    return groups


def route(x: Tensor, decisions: Tensor, paths: Sequence[Callable[[Tensor], Tensor]] | Mapping[int, Callable],
          weights: Tensor | None = None, extras: Sequence[Tensor | None] = (),
          identity_inplace: int | None = None) -> Tensor:
    """out[i] = paths[decisions[i]](x[i:i+1]) computed group by group.

    Args:
        x: the batch, [N, ...].
        decisions: [N] integer choice per sample.
        paths: one callable per choice mapping a sub-batch [n, ...] to [n, ...] outputs (all
            paths must produce the same trailing shape and dtype).
        weights: optional [N, K] gate values (hard one-hot with a straight-through gradient): each
            sample's output is multiplied by its chosen entry, which is 1 in the forward pass and
            carries the gate's gradient back through the path that ran.
        extras: per-sample tensors [N, ...] (or None) that travel with the samples: a path is
            called as `path(x_group, *extras_group)`, e.g. each sample's channel mask.
        identity_inplace: the index of a path that is the identity, when `x` may be overwritten
            (inference on an activation the caller owns): that path's samples keep their rows of
            `x` and the other groups are written into `x` itself, so no batch-sized output is
            allocated and the skipped rows are never copied. Ignored when gradients are recorded.
    """
    n = x.shape[0]
    if decisions.shape != (n,):
        raise ValueError(f"decisions must have shape ({n},) for a batch of {n}, got {tuple(decisions.shape)}")
    num_choices = len(paths)
    if n == 1:  # one sample (a single request): its path, with no grouping
        k = int(decisions[0])
        if not 0 <= k < num_choices:
            raise ValueError(f"a decision is outside [0, num_choices={num_choices})")
        active = [k]
    else:
        groups = group_indices(decisions.to(torch.int64), num_choices)
        active = [k for k, g in enumerate(groups) if g is not None]
    if len(active) == 1:  # the whole batch took one path
        k = active[0]
        out = paths[k](x, *extras)
        return out if weights is None else out * _expand(weights[:, k], out)
    out = None
    if identity_inplace is not None and weights is None and not (torch.is_grad_enabled() and x.requires_grad):
        out = x
        active = [k for k in active if k != identity_inplace]
    for k in active:
        idx = groups[k]
        part = paths[k](gather_rows(x, idx), *(None if e is None else e.index_select(0, idx) for e in extras))
        if weights is not None:
            part = part * _expand(weights.index_select(0, idx)[:, k], part)
        if out is None:  # in the layout the paths produce (channels_last for the integer engine)
            layout = torch.channels_last if _is_channels_last(part) else torch.contiguous_format
            out = torch.empty((n,) + part.shape[1:], dtype=part.dtype, device=part.device, memory_format=layout)
        scatter_rows_(out, idx, part)  # autograd records the in-place copy; no batch-sized temporaries
    return out


def _is_channels_last(t: Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x.index_select(0, idx) in x's memory format. A channels_last batch is gathered as its
    contiguous NHWC view, one block copy per sample (index_select would return NCHW, a
    transposing copy, and x[idx] is several times slower)."""
    if _is_channels_last(x):
        return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)
    return x.index_select(0, idx)


def scatter_rows_(out: Tensor, idx: Tensor, part: Tensor) -> None:
    """out.index_copy_(0, idx, part), as block copies when both are channels_last."""
    if _is_channels_last(out) and _is_channels_last(part):
        out.permute(0, 2, 3, 1).index_copy_(0, idx, part.permute(0, 2, 3, 1))
    else:
        out.index_copy_(0, idx, part)


def _expand(w: Tensor, like: Tensor) -> Tensor:
    return w.reshape((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


def masked_all_paths(x: Tensor, decisions: Tensor, paths: Sequence[Callable], weights: Tensor | None = None) -> Tensor:
    """The papers' execution: every path on every sample, then a one-hot mask. The reference that
    `route` must equal for the same decisions (and the baseline that benchmarks beat)."""
    one_hot = torch.nn.functional.one_hot(decisions.to(torch.int64), len(paths)).to(x.dtype)
    if weights is not None:
        one_hot = weights.to(x.dtype)
    outs = [p(x) for p in paths]
    return sum(_expand(one_hot[:, k], o) * o for k, o in enumerate(outs))
