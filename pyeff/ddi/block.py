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

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.dynamic import ChannelGate, WidthGate, masked_all_paths, route
from pyeff.dynamic.modules import add_relu_, bn_foldable, fold_bn, identity_shortcut, relu_
from pyeff.ops.masked_conv import _direct_kernel_applies, masked_conv2d


_FOLD = [True]


@contextlib.contextmanager
def no_bn_folding():
    """Within the block, every conv runs as its module (forward hooks see it), BN unfolded."""
    old, _FOLD[0] = _FOLD[0], False
    try:
        yield
    finally:
        _FOLD[0] = old


def _foldable(bn: nn.Module) -> bool:
    return _FOLD[0] and bn_foldable(bn)


class _Masks:
    """How a block's convs see the inner-channel mask: masked kernels at inference, dense convs with
    a straight-through mask in training (or when every channel is on: plain convs). At inference
    a conv followed by BN runs as one conv with the BN folded in (one pass less per conv)."""

    def __init__(self, soft: Tensor | None, hard: Tensor | None, training: bool):
        self.soft, self.hard, self.training = soft, hard, training

    def conv(self, conv: nn.Conv2d, x: Tensor, in_gated: bool, out_gated: bool, wb=None) -> Tensor:
        w, b = wb if wb is not None else (conv.weight, conv.bias)
        if self.training or self.hard is None or (
                not in_gated and x.device.type == "cpu" and not _direct_kernel_applies(x, conv.stride, conv.groups)):
            # (a strided conv1 of a downsampling block: no kernel here would skip work; its inactive
            # outputs need no zeroing, the next conv does not read them)
            return conv(x) if wb is None else F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        return masked_conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups,
                             in_mask=self.hard if in_gated else None, out_mask=self.hard if out_gated else None)

    def conv_bn(self, conv: nn.Conv2d, bn: nn.Module, x: Tensor, in_gated: bool, out_gated: bool) -> Tensor:
        if self.training or not _foldable(bn):
            return self.bn(bn, self.conv(conv, x, in_gated, out_gated))
        return self.conv(conv, x, in_gated, out_gated, fold_bn(conv, bn))

    def bn(self, bn: nn.Module, h: Tensor) -> Tensor:
        return bn(h)

    def apply(self, h: Tensor) -> Tensor:
        """After the activation of a gated conv's output: zero the inactive channels (training; at
        inference the next conv does not read them)."""
        if self.training and self.soft is not None:
            return h * self.soft[:, :, None, None].to(h.dtype)
        return h


class _Slice(_Masks):
    """Width mode at inference: the first k inner channels run, as ordinary dense convs on sliced
    weights (oneDNN/cuDNN speed; no per-channel masks)."""

    def __init__(self, k: int):
        super().__init__(None, None, False)
        self.k = k

    def conv(self, conv: nn.Conv2d, x: Tensor, in_gated: bool, out_gated: bool, wb=None) -> Tensor:
        w, b = wb if wb is not None else (conv.weight, conv.bias)
        if out_gated:
            w, b = w[:self.k], (None if b is None else b[:self.k])
        if in_gated:
            w = w[:, :self.k]
        return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

    def bn(self, bn: nn.BatchNorm2d, h: Tensor) -> Tensor:
        k = self.k
        return F.batch_norm(h, bn.running_mean[:k], bn.running_var[:k], None if bn.weight is None else bn.weight[:k],
                            None if bn.bias is None else bn.bias[:k], False, 0.0, bn.eps)


# --------------------------------------------------------------------------------------------
# block kinds


def _pyeff_shortcut(b, x):
    return b.shortcut(x)


def _tv_shortcut(b, x):
    return x if b.downsample is None else b.downsample(x)


def _basic(shortcut):
    def run(b, x, M):
        h = M.apply(relu_(M.conv_bn(b.conv1, b.bn1, x, False, True)))
        return add_relu_(M.conv_bn(b.conv2, b.bn2, h, True, False), shortcut(b, x))
    return run


def _preact(b, x, M):
    h = M.apply(relu_(M.conv_bn(b.conv1, b.bn2, F.relu(b.bn1(x)), False, True)))
    return M.conv(b.conv2, h, True, False) + b.shortcut(x)


def _bottleneck(b, x, M):
    h = M.apply(relu_(M.conv_bn(b.conv1, b.bn1, x, False, True)))
    h = M.apply(relu_(M.conv_bn(b.conv2, b.bn2, h, True, True)))
    return add_relu_(M.conv_bn(b.conv3, b.bn3, h, True, False), _tv_shortcut(b, x))


def _dense(b, x, M):
    h = M.apply(relu_(M.conv_bn(b.conv1, b.bn2, F.relu(b.bn1(x)), False, True)))
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


CHANNEL_MODES = ("mask", "width")
DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)


def _check_widths(widths) -> list:
    try:
        ws = [float(w) for w in widths]
    except (TypeError, ValueError):
        raise TypeError(f"pyeff.ddi: widths must be fractions of the inner channels such as (0.25, 0.5, 1), "
                        f"got {widths!r}") from None
    if not ws or any(not 0 < w <= 1 for w in ws):
        raise ValueError(f"pyeff.ddi: widths must be fractions in (0, 1], got {tuple(widths)}")
    return ws


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
        channel_mode: "mask" (DDI's channel gate: any subset of inner channels per sample, run by
            pyeff.ops.masked_conv2d) or "width" (a per-sample choice among `widths`, fractions of the
            inner channels: the first k channels run as dense convs on sliced weights, samples
            grouped by width; `convert` orders the channels by importance first).
    """

    def __init__(self, block: nn.Module, index: int, stage: int, channel_gate: bool = True,
                 reduction: int = 4, threshold: float = 0.5, init_open: float = 1.5, channel_mode: str = "mask",
                 widths: Sequence[float] = DEFAULT_WIDTHS):
        super().__init__()
        kind = block_kind(block)
        if kind is None:
            raise TypeError(f"pyeff.ddi: {type(block).__name__} is not a supported block ({SUPPORTED})")
        self.block, self.kind, self.index, self.stage = block, kind, index, stage
        self.width = kind.width(block)
        self.in_channels = kind.in_channels(block)
        # skipped samples keep their input: at inference the executed ones are written into it in place
        self.identity_skip = identity_shortcut(block)
        self.projection_shortcut = bool(kind.shortcut) and not self.identity_skip  # a resolution/width change
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"pyeff.ddi: channel_mode must be one of {CHANNEL_MODES}, got {channel_mode!r}")
        self.channel_mode = channel_mode if channel_gate else None
        if channel_gate and channel_mode == "width":
            for attr, in_g, out_g in kind.convs:
                if getattr(block, attr).groups != 1 and (in_g or out_g):
                    raise ValueError(f"pyeff.ddi: width mode slices the inner channels, which a grouped conv "
                                     f"({type(block).__name__}.{attr}) does not allow; use channel_mode='mask'")
            counts = sorted({min(self.width, max(1, int(round(float(f) * self.width)))) for f in _check_widths(widths)})
            self.register_buffer("counts", torch.tensor(counts), persistent=False)
            self.register_buffer("prefix", (torch.arange(self.width)[None, :] < self.counts[:, None]).float(),
                                 persistent=False)
            self.channel_gate = WidthGate(self.in_channels, len(counts), reduction)
        else:
            self.channel_gate = ChannelGate(self.in_channels, self.width, reduction, threshold, init_open) \
                if channel_gate else None
        self.layer_gated = True  # the DDINet decides (projection-shortcut blocks: not by default)
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
            hard: Tensor | None, training: bool, execution: str = "routed", inplace: bool = False) -> Tensor:
        """Skip or execute each sample (execute: bool [N]); layer_weights [N, 2] straight-through.
        execution: "routed" (only what was chosen) or "masked" (everything, then masks).
        inplace: x is an activation the caller owns and may be overwritten (the net's forward)."""
        def ex(xs, s=None, h=None):
            return self.exec_path(xs, s, h, training)
        if execution == "masked":  # the papers' execution: every sample through both paths, then masked
            full = lambda xs: self.exec_path(xs, soft, hard, training=True)  # noqa: E731 (dense convs, masks multiply)
            return masked_all_paths(x, execute.to(torch.int64), [self.skip_path, full], layer_weights)
        return route(x, execute.to(torch.int64), [self.skip_path, ex], layer_weights, extras=(soft, hard),
                     identity_inplace=self._inplace(training, inplace))

    def _inplace(self, training: bool, allowed: bool):
        return 0 if (allowed and not training and self.identity_skip) else None

    def width_path(self, k: int):
        """Inference in width mode: the block with its first k inner channels."""
        M = _Slice(k) if k < self.width else _Masks(None, None, False)
        return lambda xs: self.kind.execute(self.block, xs, M)

    def run_width(self, x: Tensor, choice: Tensor, inplace: bool = False) -> Tensor:
        """Inference in width mode: choice [N] is 0 (skip) or 1 + the index of the sample's width;
        samples are grouped by choice and each group runs one dense block of its width."""
        paths = [self.skip_path] + [self.width_path(int(k)) for k in self.counts.tolist()]
        return route(x, choice, paths, identity_inplace=self._inplace(False, inplace))
