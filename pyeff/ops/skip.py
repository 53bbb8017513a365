"""Layer skipping: run a block on the samples that execute it and give the others a shortcut value,
without computing the block for the skipped samples.

    out[i] = fn(x[keep])[j]      for the j-th sample i with keep[i]
    out[i] = shortcut(x)[i]      for the others (identity by default)

A thin layer over the shared router `pyeff.dynamic.route` (two paths: 0 = shortcut, 1 = block), so
the gather/scatter lives in one place. Cost: the block on the executing samples, a gather of their
inputs and a scatter into one batch-sized output. When every sample executes, the block's output is
returned as is; when none does, the shortcut value (x itself for the identity) is returned as is: no
copy of the batch either way. Differentiable: gradients reach the executed samples through `fn` and
the skipped ones through the shortcut.
"""
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from pyeff.dynamic.router import route


def _check_keep(keep, x: Tensor) -> Tensor:
    if not isinstance(keep, Tensor):
        raise TypeError(f"pyeff.ops.run_on_subset: keep must be a bool tensor, got {type(keep).__name__}")
    if keep.dtype != torch.bool:
        raise TypeError(f"pyeff.ops.run_on_subset: keep has dtype {str(keep.dtype).replace('torch.', '')}; "
                        "expected bool (convert with keep.bool() or (keep > 0.5))")
    if keep.dim() != 1 or keep.shape[0] != x.shape[0]:
        raise ValueError(f"pyeff.ops.run_on_subset: keep has shape {tuple(keep.shape)}; expected [{x.shape[0]}], "
                         "one flag per sample of x")
    if keep.device != x.device:
        raise ValueError(f"pyeff.ops.run_on_subset: keep is on {keep.device} but x is on {x.device}")
    return keep


def run_on_subset(fn: Callable[[Tensor], Tensor], x: Tensor, keep: Tensor,
                  shortcut: Union[None, Tensor, Callable[[Tensor], Tensor]] = None,
                  weights: Optional[Tensor] = None) -> Tensor:
    """Run `fn` on the samples of `x` whose `keep` flag is set; the others take the shortcut.

    Args:
        fn: the block, mapping [n, ...] to [n, ...] (any n, including a sub-batch).
        x: [N, ...] input batch.
        keep: bool [N]: True where the sample executes the block.
        shortcut: None (identity: skipped samples take x, which then needs fn's output shape),
            a tensor [N, ...] shaped like fn's output (its rows for the skipped samples are used), or a
            callable applied to the skipped samples only (e.g. a strided 1x1 projection).
        weights: optional [N, 2] hard gate values (column 0 skip, column 1 execute) with a
            straight-through gradient, passed to `pyeff.dynamic.route`: the output of each sample is
            multiplied by its chosen entry (1 forward) so the gate receives a gradient.

    Example:
        >>> block = torch.nn.Linear(4, 4)
        >>> x, keep = torch.randn(3, 4), torch.tensor([True, False, True])
        >>> y = run_on_subset(block, x, keep)
        >>> torch.equal(y[1], x[1])
        True
    """
    keep = _check_keep(keep, x)
    if weights is not None and weights.shape != (x.shape[0], 2):
        raise ValueError(f"pyeff.ops.run_on_subset: weights must be [{x.shape[0]}, 2] (skip, execute), "
                         f"got {tuple(weights.shape)}")
    decisions = keep.to(torch.int64)
    if isinstance(shortcut, Tensor):
        if shortcut.shape[0] != x.shape[0]:
            raise ValueError(f"pyeff.ops.run_on_subset: the shortcut tensor has {shortcut.shape[0]} rows for "
                             f"a batch of {x.shape[0]}")
        value = shortcut
        n_keep = int(keep.sum())
        if n_keep == x.shape[0] and weights is None:
            return fn(x)
        if n_keep == 0 and weights is None:
            return value
        # route sample indices, so the skipped samples can pick their rows of the given tensor
        rows = torch.arange(x.shape[0], device=x.device)
        paths = [lambda i: value.index_select(0, i),
                 lambda i: _checked(fn(x.index_select(0, i)), value)]
        return route(rows, decisions, paths, weights)
    skip_path = (lambda t: t) if shortcut is None else shortcut
    if shortcut is None:
        paths = [skip_path, lambda t: _checked(fn(t), t)]
    else:
        paths = [skip_path, fn]
    return route(x, decisions, paths, weights)


def _checked(y: Tensor, like: Tensor) -> Tensor:
    if y.shape[1:] != like.shape[1:]:
        raise ValueError(f"pyeff.ops.run_on_subset: the block gives {tuple(y.shape[1:])} per sample but the "
                         f"shortcut gives {tuple(like.shape[1:])}; pass a shortcut with the block's output shape")
    return y


class SkipBlock(torch.nn.Module):
    """Wraps a block so that `forward(x, keep)` runs it only on the samples with keep set (keep=None
    runs everyone). `shortcut`: None for identity, or a module applied to the skipped samples."""

    def __init__(self, block: torch.nn.Module, shortcut: Optional[torch.nn.Module] = None):
        super().__init__()
        self.block = block
        self.shortcut = shortcut

    def forward(self, x: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        if keep is None:
            return self.block(x)
        return run_on_subset(self.block, x, keep, self.shortcut)
