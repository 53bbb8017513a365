"""Finding and replacing the blocks that dynamic methods wrap (shared by DFS and DDI)."""
from __future__ import annotations

from typing import Callable

from torch import nn


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
