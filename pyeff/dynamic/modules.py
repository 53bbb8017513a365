"""Module plumbing shared by the dynamic methods (DFS, DDI): finding and replacing the blocks they
wrap, telling an identity shortcut from a projection, switching a controller's state for the
length of a `with`, and the in-place ReLU / residual add of inference."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def find_blocks(model: nn.Module, is_block: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """(name, module) of the outermost modules of `model` for which `is_block` holds, in
    registration order (the execution order of pyeff's and torchvision's residual networks)."""
    found = []
    for name, m in model.named_modules():
        if is_block(m) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, m))
    return found


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """root.<name> = new, for a dotted `name` as given by named_modules()."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def identity_shortcut(block: nn.Module) -> bool:
    """Whether a residual block's shortcut is the identity (pyeff's `shortcut`, torchvision's
    `downsample`); False for a block without either (e.g. a DenseNet layer)."""
    for attr in ("shortcut", "downsample"):
        if hasattr(block, attr):
            sc = getattr(block, attr)
            return sc is None or isinstance(sc, nn.Identity)
    return False


@contextlib.contextmanager
def swapped(obj, **values):
    """Within the block, obj.<name> = value for each keyword; the old values come back after."""
    old = {k: getattr(obj, k) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


# Without autograd a block's intermediates are fresh tensors nobody else holds, so ReLU and the
# residual add may overwrite them: no allocation, no first-touch page faults (measured in DDI/DFS).

def relu_(t: Tensor) -> Tensor:
    """relu(t), in place when no gradient is being recorded."""
    return F.relu(t, inplace=not torch.is_grad_enabled())


def add_relu_(r: Tensor, s: Tensor) -> Tensor:
    """relu(r + s), in place on r (a fresh intermediate) when no gradient is being recorded."""
    if not torch.is_grad_enabled():
        return r.add_(s).relu_()
    return F.relu(r + s)
