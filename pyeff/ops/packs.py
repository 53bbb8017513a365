"""Derived forms of weights (quantised and packed integer weights, BatchNorm folded into a conv),
held by the module that owns the weights, never in a process-wide cache.

A form is rebuilt when any tensor it came from changed: another tensor, another shape or dtype, or
other contents, however they were changed (an optimizer step, `load_state_dict`, an edit under
`no_grad`, an edit through `.data`, which bypasses the version counter). The contents are compared
against a snapshot taken when the form was built; the comparison reads each source once per
lookup, far less than the call that uses the form. So a stale form is never returned. Forms built
from the same tensor share one snapshot of it.

    packs = packs_of(conv)                         # created on first use, in conv.__dict__
    w = packs.get(("folded",), (conv.weight, bn.running_var), build)

A `WeightPacks` pickles and deep-copies as empty: checkpoints and copies of a model carry its
parameters, not their derived forms, which the copy rebuilds on first use.
"""
from __future__ import annotations

import itertools
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor, nn

_ATTR = "_pyeff_packs"
_STAMPS = itertools.count()  # process-wide, so a stamp never names two different states


def _layout(t: Tensor):
    return (tuple(t.shape), t.dtype, t.device)


class WeightPacks:
    """Forms derived from tensors, each under a key, valid while its source tensors are unchanged
    (same tensor objects, same shapes, dtypes, devices and contents)."""

    __slots__ = ("_entries", "_seen")

    def __init__(self):
        self._entries: dict = {}  # key -> (source ids, stamps, form)
        self._seen: dict = {}  # id(source) -> (layout, snapshot, stamp)

    def _stamp(self, t: Tensor | None):
        """A number that stays the same exactly while `t` is the same tensor in the same state."""
        if t is None:
            return None
        layout = _layout(t)
        seen = self._seen.get(id(t))
        # the contents decide, not the version counter: an edit through .data leaves it unchanged
        if seen is not None and seen[0] == layout and torch.equal(seen[1], t.detach()):
            return seen[2]
        stamp = next(_STAMPS)
        self._seen[id(t)] = (layout, t.detach().clone(), stamp)
        return stamp

    def get(self, key: Hashable, sources: Sequence[Tensor | None], build: Callable[[], object]):
        """build() unless an entry for `key` was built from these very `sources`, unchanged since."""
        stamps = tuple(self._stamp(t) for t in sources)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == stamps:
            return hit[2]
        with torch.no_grad():
            value = build()
        ids = tuple(id(t) for t in sources if t is not None)
        self._entries[key] = (ids, stamps, value)
        # snapshots of tensors no form uses any more would only hold memory
        live = set(ids).union(*(e[0] for e in self._entries.values()))
        for dead in [i for i in self._seen if i not in live]:
            del self._seen[dead]
        return value

    def clear(self) -> None:
        """Drop every form (they are rebuilt on next use)."""
        self._entries.clear()
        self._seen.clear()

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
