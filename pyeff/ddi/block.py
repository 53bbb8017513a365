"""A DDI block: one residual block (or DenseNet layer) with a layer gate and a channel gate.

Per sample, the layer gate (the shared `RecurrentGate`, 2 choices) decides skip or execute:

    skip:     out = shortcut(x)                 (a DenseNet layer: x with k zero channels appended)
    execute:  the block, with only the active *inner* channels of that sample computed

The inner channels are those between the block's convs (conv1's outputs = conv2's inputs; a
Bottleneck's two inner widths share one mask). A `ChannelGate` on the block's input picks them per
sample. At inference only the executed samples run the block (`pyeff.dynamic.route`), conv1
computes only the active output channels of each sample and the next conv reads only those
(`pyeff.ops.masked_conv2d`): the skipped work is never done. In training the same decisions are
applied as straight-through masks on dense tensors, so both gates receive gradients; the forward
values are the same as at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.dynamic import ChannelGate, masked_all_paths, route
from pyeff.ops.masked_conv import masked_conv2d


class _Masks:
    """How a block's convs see the inner-channel mask: masked kernels at inference, dense convs with
    a straight-through mask in training (or when every channel is on: plain convs)."""

    def __init__(self, soft: Tensor | None, hard: Tensor | None, training: bool):
        self.soft, self.hard, self.training = soft, hard, training

    def conv(self, conv: nn.Conv2d, x: Tensor, in_gated: bool, out_gated: bool) -> Tensor:
        if self.training or self.hard is None:
            return conv(x)
        return masked_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                             in_mask=self.hard if in_gated else None, out_mask=self.hard if out_gated else None)

    def apply(self, h: Tensor) -> Tensor:
        """After the activation of a gated conv's output: zero the inactive channels (training; at
        inference the next conv does not read them)."""
        if self.training and self.soft is not None:
            return h * self.soft[:, :, None, None].to(h.dtype)
        return h


# --------------------------------------------------------------------------------------------
# block kinds


def _pyeff_shortcut(b, x):
    return b.shortcut(x)


def _tv_shortcut(b, x):
    return x if b.downsample is None else b.downsample(x)


def _basic(shortcut):
    def run(b, x, M):
        h = M.apply(F.relu(b.bn1(M.conv(b.conv1, x, False, True))))
        return F.relu(b.bn2(M.conv(b.conv2, h, True, False)) + shortcut(b, x))
    return run


def _preact(b, x, M):
    h = M.apply(F.relu(b.bn2(M.conv(b.conv1, F.relu(b.bn1(x)), False, True))))
    return M.conv(b.conv2, h, True, False) + b.shortcut(x)


def _bottleneck(b, x, M):
    h = M.apply(F.relu(b.bn1(M.conv(b.conv1, x, False, True))))
    h = M.apply(F.relu(b.bn2(M.conv(b.conv2, h, True, True))))
    return F.relu(b.bn3(M.conv(b.conv3, h, True, False)) + _tv_shortcut(b, x))


def _dense(b, x, M):
    h = M.apply(F.relu(b.bn2(M.conv(b.conv1, F.relu(b.bn1(x)), False, True))))
    return torch.cat([x, M.conv(b.conv2, h, True, False)], 1)


def _dense_skip(b, x):
    n, _, H, W = x.shape
    return torch.cat([x, x.new_zeros(n, b.growth, H, W)], 1)


def _inner(b) -> int:  # the inner width: conv1's output channels (also after static pruning)
    return b.conv1.out_channels


@dataclass(frozen=True)
class BlockKind:
    """How DDI drives one type of block."""
    execute: Callable          # (block, x, masks) -> output
    skip: Callable             # (block, x) -> output of a skipped sample
    width: Callable            # block -> number of inner (gated) channels
    convs: tuple               # (attribute, input gated, output gated) of the executed convs
    shortcut: tuple            # attributes of modules that run on every sample (skip or not)
    in_channels: Callable      # block -> channels of its input


def block_kind(block: nn.Module) -> BlockKind | None:
    from pyeff.models.cifar_resnet import BasicBlock, PreActBlock
    from pyeff.models.densenet import DenseLayer

    two = (("conv1", False, True), ("conv2", True, False))
    if isinstance(block, BasicBlock):
        return BlockKind(_basic(_pyeff_shortcut), _pyeff_shortcut, _inner, two, ("shortcut",), lambda b: b.in_planes)
    if isinstance(block, PreActBlock):
        return BlockKind(_preact, _pyeff_shortcut, _inner, two, ("shortcut",), lambda b: b.in_planes)
    if isinstance(block, DenseLayer):
        return BlockKind(_dense, _dense_skip, _inner, two, (), lambda b: b.in_channels)
    try:
        from torchvision.models.resnet import BasicBlock as TVBasic, Bottleneck as TVBottleneck
    except ImportError:  # torchvision is optional
        return None
    if isinstance(block, TVBasic):
        return BlockKind(_basic(_tv_shortcut), _tv_shortcut, _inner, two, ("downsample",),
                         lambda b: b.conv1.in_channels)
    if isinstance(block, TVBottleneck):
        return BlockKind(_bottleneck, _tv_shortcut, _inner,
                         (("conv1", False, True), ("conv2", True, True), ("conv3", True, False)), ("downsample",),
                         lambda b: b.conv1.in_channels)
    return None


SUPPORTED = ("pyeff BasicBlock, PreActBlock and DenseLayer; torchvision BasicBlock and Bottleneck")


class DDIBlock(nn.Module):
    """Wraps a block (kept as `self.block`, parameters shared) with a channel gate; the layer gate
    is the DDINet's shared recurrent gate, consulted through the controller `_ctl`.

    Args:
        block: a supported block (see `SUPPORTED`).
        index: position among the gated blocks (the recurrent gate's step, the cost table's row).
        stage: the stage (0-based) the block belongs to (for halting at exits).
        channel_gate: give the block a channel gate (False: layer skipping only).
        init_open: the channel gate's initial logit bias (sigmoid(1.5) = 0.82: every channel kept,
            with enough slope left for the cost term to move them; at 3.0 they barely moved).
    """

    def __init__(self, block: nn.Module, index: int, stage: int, channel_gate: bool = True,
                 reduction: int = 4, threshold: float = 0.5, init_open: float = 1.5):
        super().__init__()
        kind = block_kind(block)
        if kind is None:
            raise TypeError(f"pyeff.ddi: {type(block).__name__} is not a supported block ({SUPPORTED})")
        self.block, self.kind, self.index, self.stage = block, kind, index, stage
        self.width = kind.width(block)
        self.in_channels = kind.in_channels(block)
        # skipped samples keep their input: at inference the executed ones are written into it in place
        self.identity_skip = all(isinstance(getattr(block, a, None), (nn.Identity, type(None))) for a in kind.shortcut) \
            and kind.skip is not _dense_skip
        self.channel_gate = ChannelGate(self.in_channels, self.width, reduction, threshold, init_open) \
            if channel_gate else None
        self._ctl = None

    def forward(self, x: Tensor) -> Tensor:
        ctl = self._ctl
        if ctl is None:  # outside a DDINet: the plain block
            return self.block(x)
        return ctl.run_block(self, x)

    # the two paths, on a group of samples
    def skip_path(self, x: Tensor, soft=None, hard=None) -> Tensor:
        return self.kind.skip(self.block, x)

    def exec_path(self, x: Tensor, soft: Tensor | None = None, hard: Tensor | None = None,
                  training: bool = False) -> Tensor:
        if hard is not None and not training and bool(hard.all()):
            hard = None  # every inner channel on: the plain convs
        return self.kind.execute(self.block, x, _Masks(soft, hard, training))

    def run(self, x: Tensor, execute: Tensor, layer_weights: Tensor | None, soft: Tensor | None,
            hard: Tensor | None, training: bool, execution: str = "routed") -> Tensor:
        """Skip or execute each sample (execute: bool [N]); layer_weights [N, 2] straight-through.
        execution: "routed" (only what was chosen) or "masked" (everything, then masks)."""
        def ex(xs, s=None, h=None):
            return self.exec_path(xs, s, h, training)
        if execution == "masked":  # the papers' execution: every sample through both paths, then masked
            def ex_all(xs, s=None, h=None):
                return self.exec_path(xs, s, h, training=True)  # dense convs, masks as multiplies
            return masked_all_paths(x, execute.to(torch.int64), [self.skip_path, lambda xs: ex_all(xs, soft, hard)],
                                    layer_weights)
        inplace = 0 if (not training and not torch.is_grad_enabled() and self.identity_skip) else None
        return route(x, execute.to(torch.int64), [self.skip_path, ex], layer_weights, extras=(soft, hard),
                     identity_inplace=inplace)
