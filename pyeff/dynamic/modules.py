"""Module plumbing shared by the dynamic methods (DFS, DDI): finding and replacing the blocks they
wrap, switching a controller's state for the length of a `with`, the in-place ReLU / residual add
of inference and BatchNorm folding."""
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


def module_inputs(modules, run: Callable[[], object], clone: bool = False) -> dict:
    """{module: the (first) input it received} during one call of `run()`, through forward
    pre-hooks removed afterwards; `clone`: copies, for inputs a later in-place op overwrites."""
    inputs = {}

    def keep(m, args):
        inputs[m] = args[0].clone() if clone else args[0]
    hooks = [m.register_forward_pre_hook(keep) for m in modules]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return inputs


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


def batch_norm(bn: nn.Module, y: Tensor) -> Tensor:
    """bn(y), except that a training-mode BatchNorm2d given one value per channel (a group of one
    sample on 1x1 planes, normal in routed execution) normalises with its running statistics and
    leaves them unchanged: batch statistics of a single value do not exist."""
    if (bn.training and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and y.dim() == 4 and y.shape[0] * y.shape[2] * y.shape[3] == 1):
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(y)


# Inference BatchNorm folded into the conv before it: one pass over the activation less per conv.

def bn_foldable(bn: nn.Module) -> bool:
    """An eval-mode BatchNorm2d with running statistics, at inference without autograd (folded
    weights carry no gradient)."""
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
            and bn.running_var is not None and not torch.is_grad_enabled())


# Folding is computed on every call, not cached: the BN's (scale, shift) are four ops on
# per-channel vectors and the folded weight one multiply over the conv's weight, less than
# checking a cached copy against its sources costs (measured), and a form computed from the
# current tensors can never be stale. Callers run them without autograd (bn_foldable).

def bn_affine(bn: nn.BatchNorm2d, conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(scale, shift) with bn(y + conv_bias) == y * scale + shift per channel, for an eval-mode BN."""
    scale = bn.running_var.add(bn.eps).rsqrt_()
    if bn.weight is not None:
        scale.mul_(bn.weight)
    mean = bn.running_mean if conv_bias is None else bn.running_mean - conv_bias
    shift = torch.addcmul(bn.bias, mean, scale, value=-1) if bn.bias is not None else mean * scale.neg()
    return scale, shift


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the one conv equal to conv followed by the eval-mode `bn`."""
    scale, shift = bn_affine(bn, conv.bias)
    return conv.weight * scale.view(-1, 1, 1, 1), shift


def fused_sequential(seq: nn.Sequential, x: Tensor) -> Tensor:
    """An nn.Sequential at inference with each Conv2d -> eval BatchNorm2d pair run as one conv and
    each ReLU in place on the fresh activation before it."""
    mods = list(seq)
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d) and nxt is not None and bn_foldable(nxt) and m.padding_mode == "zeros":
            w, b = fold_bn(m, nxt)
            x = F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
            i += 2
        elif isinstance(m, nn.ReLU) and i > 0:
            x = x.relu_()
            i += 1
        else:
            x = m(x)
            i += 1
    return x
