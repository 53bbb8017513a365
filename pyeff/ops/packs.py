"""Derived forms of weights (quantised and packed integer weights, BatchNorm folded into a conv),
held by the module that owns the weights, never in a process-wide cache.

A form is rebuilt when any tensor it came from changed: a new tensor, a new in-place version (an
optimizer step, `load_state_dict`, an edit under `no_grad`) or, since an edit through `.data`
bypasses the version counter, different contents (compared against a snapshot taken when the form
was built; the comparison reads each source once, far less than the call that uses the form).
So a stale form is never returned.

    packs = packs_of(conv)                         # created on first use, in conv.__dict__
    w = packs.get(("folded",), (conv.weight, bn.running_var), build)

A `WeightPacks` pickles and deep-copies as empty: checkpoints and copies of a model carry its
parameters, not their derived forms, which the copy rebuilds on first use.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor, nn

_ATTR = "_pyeff_packs"


def _signature(t: Tensor | None):
    if t is None:
        return None
    try:
        version = t._version
    except RuntimeError:  # inference tensors carry no version counter: the contents decide
        version = None
    return (id(t), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, version)


def _same(snapshot: Tensor | None, t: Tensor | None) -> bool:
    if snapshot is None or t is None:
        return snapshot is None and t is None
    return torch.equal(snapshot, t.detach())


class WeightPacks:
    """Forms derived from tensors, each under a key, valid while its source tensors are unchanged
    (same tensor, same version, same contents)."""

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries: dict = {}

    def get(self, key: Hashable, sources: Sequence[Tensor | None], build: Callable[[], object]):
        """build() unless an entry for `key` was built from these very `sources`, unchanged since."""
        sig = tuple(_signature(t) for t in sources)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == sig and all(_same(s, t) for s, t in zip(hit[1], sources)):
            return hit[2]
        with torch.no_grad():
            value = build()
            snapshots = tuple(None if t is None else t.detach().clone() for t in sources)
        self._entries[key] = (sig, snapshots, value)
        return value

    def clear(self) -> None:
        """Drop every form (they are rebuilt on next use)."""
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self):  # pickle / deepcopy: empty
        return (WeightPacks, ())


def packs_of(module: nn.Module) -> WeightPacks:
    """The WeightPacks held by `module` (created on first use; not a parameter, buffer or state)."""
    packs = module.__dict__.get(_ATTR)
    if packs is None:
        packs = module.__dict__[_ATTR] = WeightPacks()
    return packs


def clear_packs(model: nn.Module) -> None:
    """Drop the derived forms held by `model` and its submodules (to free their memory; they are
    rebuilt on next use, so this is never needed for correctness)."""
    for m in model.modules():
        packs = m.__dict__.get(_ATTR)
        if packs is not None:
            packs.clear()
