"""The one registry of block types the dynamic methods (DFS, DDI, the channel pruner) understand.

A supported block is a residual block (or a DenseNet layer) whose residual branch is a chain of
convolutions, each optionally followed by a BatchNorm and a ReLU, with the block's output a
combination of that branch and a shortcut:

    h = pre(block, x)                   optional, e.g. a pre-activation BN-ReLU
    h = relu?(bn?(conv_i(h)))           for each conv of the chain, in order
    out = combine(h, shortcut(x))       "add_relu", "add" or "concat"

The channels *between* the chain's convs are the block's inner channels: every method gates,
quantises or prunes them through this description, so registering a block type once makes it
available to all of them:

    from pyeff.dynamic import Conv, register_block
    register_block(MyBlock, convs=[Conv("conv_a", bn="bn_a", relu=True), Conv("conv_b", bn="bn_b")],
                   shortcut="proj", combine="add_relu")

The built-in registrations (pyeff's BasicBlock, PreActBlock, DenseLayer; torchvision's BasicBlock
and Bottleneck) are at the bottom of this file.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from pyeff.dynamic.modules import add_relu_, relu_

COMBINES = ("add_relu", "add", "concat")


@dataclass(frozen=True)
class Conv:
    """One conv of a block's residual chain: the attribute names of the conv and of the
    BatchNorm after it (None: none), and whether a ReLU follows."""
    conv: str
    bn: Optional[str] = None
    relu: bool = False


def _add(r: Tensor, s: Tensor) -> Tensor:
    return r + s


def _concat(r: Tensor, s: Tensor) -> Tensor:
    return torch.cat([s, r], 1)


_COMBINE_FNS = {"add_relu": add_relu_, "add": _add, "concat": _concat}


@dataclass(frozen=True)
class BlockSpec:
    """How the dynamic methods see one block type (see the module docstring)."""
    cls: type
    convs: tuple
    shortcut: Optional[str]          # attribute of the shortcut module; None: the identity
    combine: str
    pre: Optional[Callable] = None   # (block, x) -> input of the first conv

    # -- the forward pieces -------------------------------------------------------------------
    def residual(self, block: nn.Module, x: Tensor, conv: Callable) -> Tensor:
        """The residual branch, with `conv(i, x)` running conv i of the chain together with its BN
        and ReLU (each method passes its own: quantised, masked, folded ...)."""
        h = self.pre(block, x) if self.pre is not None else x
        for i in range(len(self.convs)):
            h = conv(i, h)
        return h

    def shortcut_out(self, block: nn.Module, x: Tensor) -> Tensor:
        """The shortcut's output (the block's input for an identity or a concatenating block)."""
        if self.shortcut is None:
            return x
        sc = getattr(block, self.shortcut)
        return x if sc is None else sc(x)

    def combine_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        return _COMBINE_FNS[self.combine]

    def skip(self, block: nn.Module, x: Tensor) -> Tensor:
        """The output of a skipped block: its shortcut, or for a concatenating block its input
        with zeros in place of the new channels."""
        if self.combine == "concat":
            n, _, H, W = x.shape
            return torch.cat([x, x.new_zeros(n, self.out_width(block), H, W)], 1)
        return self.shortcut_out(block, x)

    # -- structure ----------------------------------------------------------------------------
    def conv(self, block: nn.Module, i: int) -> nn.Conv2d:
        return getattr(block, self.convs[i].conv)

    def bn(self, block: nn.Module, i: int) -> Optional[nn.Module]:
        name = self.convs[i].bn
        return None if name is None else getattr(block, name)

    def in_channels(self, block: nn.Module) -> int:
        return self.conv(block, 0).in_channels

    def inner_width(self, block: nn.Module) -> int:
        """Number of inner channels (the first conv's outputs; every inner width is the same)."""
        return self.conv(block, 0).out_channels

    def out_width(self, block: nn.Module) -> int:
        return self.conv(block, len(self.convs) - 1).out_channels

    def gated(self, i: int) -> tuple[bool, bool]:
        """(input, output) of conv i are inner channels."""
        return i > 0, i < len(self.convs) - 1

    def identity_shortcut(self, block: nn.Module) -> bool:
        """Whether a skipped block passes its input through unchanged."""
        if self.combine == "concat":
            return False
        if self.shortcut is None:
            return True
        sc = getattr(block, self.shortcut)
        return sc is None or isinstance(sc, nn.Identity)

    def shortcut_modules(self, block: nn.Module) -> tuple[nn.Module, ...]:
        """Modules that run on every sample, skipped or not."""
        if self.shortcut is None:
            return ()
        sc = getattr(block, self.shortcut)
        return () if sc is None else (sc,)

    def inner_params(self) -> tuple[tuple[str, int], ...]:
        """(attribute, dimension) of every conv weight and BatchNorm that holds inner channels:
        what pruning slices and what importance sorting permutes."""
        out = []
        for i, c in enumerate(self.convs):
            g_in, g_out = self.gated(i)
            if g_in:
                out.append((c.conv, 1))
            if g_out:
                out.append((c.conv, 0))
                if c.bn is not None:
                    out.append((c.bn, 0))
        return tuple(out)

    def check(self, block: nn.Module) -> None:
        """Raise TypeError if `block`'s modules do not fit this description."""
        what = type(block).__name__
        widths = set()
        for i, c in enumerate(self.convs):
            m = getattr(block, c.conv, None)
            if not isinstance(m, nn.Conv2d):
                raise TypeError(f"pyeff.dynamic: {what}.{c.conv} is registered as a conv but is "
                                f"{type(m).__name__}")
            if c.bn is not None and not isinstance(getattr(block, c.bn, None), nn.BatchNorm2d):
                raise TypeError(f"pyeff.dynamic: {what}.{c.bn} is registered as a BatchNorm2d but is "
                                f"{type(getattr(block, c.bn, None)).__name__}")
            g_in, g_out = self.gated(i)
            if g_out:
                widths.add(m.out_channels)
            if g_in:
                widths.add(m.in_channels)
        if len(widths) > 1:
            raise TypeError(f"pyeff.dynamic: {what}'s inner channel counts differ ({sorted(widths)}); the chain's "
                            "inner widths must be equal (one gate covers them)")


_REGISTRY: dict[type, BlockSpec] = {}


def register_block(cls: type, *, convs: Sequence[Conv], shortcut: Optional[str] = "shortcut",
                   combine: str = "add_relu", pre: Optional[Callable] = None) -> BlockSpec:
    """Make a block type (and its subclasses) available to DFS, DDI and the pruner.

    Args:
        cls: the nn.Module subclass.
        convs: the residual branch's convs in order (`Conv(attr, bn=attr, relu=bool)`); at least one.
        shortcut: attribute of the shortcut module (None, or an nn.Identity there: the identity);
            None when the block has no shortcut module.
        combine: "add_relu" (relu(residual + shortcut), post-activation ResNets), "add"
            (pre-activation ResNets) or "concat" (DenseNet: cat([input, residual])).
        pre: optional (block, x) -> the first conv's input (e.g. a pre-activation BN-ReLU).
    Returns the BlockSpec; registering a class again replaces its entry.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_block: cls must be an nn.Module subclass, got {cls!r}")
    convs = tuple(convs)
    if not convs or not all(isinstance(c, Conv) for c in convs):
        raise TypeError("register_block: convs must be a non-empty sequence of pyeff.dynamic.Conv")
    if combine not in COMBINES:
        raise ValueError(f"register_block: combine must be one of {COMBINES}, got {combine!r}")
    if combine == "concat" and shortcut is not None:
        raise ValueError("register_block: a concatenating block has no shortcut module (shortcut=None)")
    if pre is not None and not callable(pre):
        raise TypeError("register_block: pre must be callable (block, x) -> tensor")
    spec = BlockSpec(cls, convs, shortcut, combine, pre)
    _REGISTRY[cls] = spec
    return spec


def unregister_block(cls: type) -> None:
    _REGISTRY.pop(cls, None)


def block_spec(module: nn.Module) -> Optional[BlockSpec]:
    """The BlockSpec of `module`'s type (or of its nearest registered base class), or None."""
    _ensure_builtins()
    for cls in type(module).__mro__:
        spec = _REGISTRY.get(cls)
        if spec is not None:
            return spec
    return None


def supported_blocks() -> list[str]:
    _ensure_builtins()
    return [f"{c.__module__}.{c.__qualname__}" for c in _REGISTRY]


def find_supported(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the outermost registered blocks of `model`, in registration order."""
    from pyeff.dynamic.modules import find_blocks
    return find_blocks(model, lambda m: block_spec(m) is not None)


# --------------------------------------------------------------------------------------------
# built-in registrations


def _bn_relu_pre(block: nn.Module, x: Tensor) -> Tensor:
    return relu_(block.bn1(x))


_BUILTINS = {"pyeff": False, "torchvision": False}


def _ensure_builtins() -> None:
    if not _BUILTINS["pyeff"]:
        _BUILTINS["pyeff"] = True
        from pyeff.models.cifar_resnet import BasicBlock, PreActBlock
        from pyeff.models.densenet import DenseLayer

        _setdefault(BasicBlock, convs=[Conv("conv1", "bn1", True), Conv("conv2", "bn2")])
        _setdefault(PreActBlock, convs=[Conv("conv1", "bn2", True), Conv("conv2")], combine="add",
                    pre=_bn_relu_pre)
        _setdefault(DenseLayer, convs=[Conv("conv1", "bn2", True), Conv("conv2")], shortcut=None,
                    combine="concat", pre=_bn_relu_pre)
    # torchvision's blocks, once torchvision's ResNets are imported (no import cost otherwise)
    if not _BUILTINS["torchvision"] and "torchvision.models.resnet" in sys.modules:
        _BUILTINS["torchvision"] = True
        from torchvision.models.resnet import BasicBlock, Bottleneck

        _setdefault(BasicBlock, convs=[Conv("conv1", "bn1", True), Conv("conv2", "bn2")], shortcut="downsample")
        _setdefault(Bottleneck, convs=[Conv("conv1", "bn1", True), Conv("conv2", "bn2", True),
                                       Conv("conv3", "bn3")], shortcut="downsample")


def _setdefault(cls, **kw) -> None:
    if cls not in _REGISTRY:  # a user's own registration of a built-in type wins
        register_block(cls, **kw)
