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

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.ddi.config import CHANNEL_MODES, DEFAULT_WIDTHS, check_widths
from pyeff.dynamic import ChannelGate, WidthGate, masked_all_paths, route
from pyeff.dynamic.modules import batch_norm, bn_foldable, fold_bn, relu_
from pyeff.dynamic.net import DynamicBlock
from pyeff.ops.masked_conv import _direct_kernel_applies, masked_conv2d


class _Masks:
    """How a block's convs see the inner-channel mask: masked kernels at inference, dense convs with
    a straight-through mask in training (or when every channel is on: plain convs). At inference
    a conv followed by BN runs as one conv with the BN folded in (one pass less per conv)."""

    def __init__(self, soft: Tensor | None, hard: Tensor | None, training: bool, fold: bool = True):
        self.soft, self.hard, self.training, self.fold = soft, hard, training, fold

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
        if self.training or not (self.fold and bn_foldable(bn)):
            return self.bn(bn, self.conv(conv, x, in_gated, out_gated))
        return self.conv(conv, x, in_gated, out_gated, fold_bn(conv, bn))

    def bn(self, bn: nn.Module, h: Tensor) -> Tensor:
        return batch_norm(bn, h)

    def apply(self, h: Tensor) -> Tensor:
        """After the activation of a gated conv's output: zero the inactive channels (training; at
        inference the next conv does not read them)."""
        if self.training and self.soft is not None:
            return h * self.soft[:, :, None, None].to(h.dtype)
        return h


class _Slice(_Masks):
    """Width mode at inference: the first k inner channels run, as ordinary dense convs on sliced
    weights (oneDNN/cuDNN speed; no per-channel masks)."""

    def __init__(self, k: int, fold: bool = True):
        super().__init__(None, None, False, fold)
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


def chain_runner(spec, block: nn.Module, M: _Masks) -> Callable:
    """The conv runner of a block's residual chain (pyeff.dynamic.BlockSpec.residual) under the
    masks M: each conv with its BN (folded at inference) and ReLU, inactive inner channels zeroed
    in training and never read at inference."""
    def conv(i: int, x: Tensor) -> Tensor:
        g_in, g_out = spec.gated(i)
        m, bn = spec.conv(block, i), spec.bn(block, i)
        y = M.conv(m, x, g_in, g_out) if bn is None else M.conv_bn(m, bn, x, g_in, g_out)
        if spec.convs[i].relu:
            y = relu_(y)
        return M.apply(y) if g_out else y
    return conv


class DDIBlock(DynamicBlock):
    """Wraps a registered block (kept as `self.block`, parameters shared) with a channel gate; the
    layer gate is the DDINet's shared recurrent gate, consulted through the controller `_ctl`.

    Args:
        block: a block type registered in pyeff.dynamic (see `pyeff.dynamic.register_block`).
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
        super().__init__(block, index, "pyeff.ddi")
        spec = self.spec
        self.stage = stage
        width, in_channels = self.width, self.in_channels
        # skipped samples keep their input: at inference the executed ones are written into it in place
        self.identity_skip = spec.identity_shortcut(block)
        self.projection_shortcut = spec.shortcut is not None and not self.identity_skip  # a resolution/width change
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"pyeff.ddi: channel_mode must be one of {CHANNEL_MODES}, got {channel_mode!r}")
        self.channel_mode = channel_mode if channel_gate else None
        if channel_gate and channel_mode == "width":
            for i, c in enumerate(spec.convs):
                if spec.conv(block, i).groups != 1 and any(spec.gated(i)):
                    raise ValueError(f"pyeff.ddi: width mode slices the inner channels, which a grouped conv "
                                     f"({type(block).__name__}.{c.conv}) does not allow; use channel_mode='mask'")
            counts = sorted({min(width, max(1, int(round(float(f) * width)))) for f in check_widths(widths)})
            self.register_buffer("counts", torch.tensor(counts), persistent=False)
            self.register_buffer("prefix", (torch.arange(width)[None, :] < self.counts[:, None]).float(),
                                 persistent=False)
            self.channel_gate = WidthGate(in_channels, len(counts), reduction)
        else:
            self.channel_gate = ChannelGate(in_channels, width, reduction, threshold, init_open) \
                if channel_gate else None
        self.layer_gated = True  # the DDINet decides (projection-shortcut blocks: not by default)

    def _execute(self, x: Tensor, M: _Masks, shortcut: Tensor | None = None) -> Tensor:
        spec, blk = self.spec, self.block
        s = spec.shortcut_out(blk, x) if shortcut is None else shortcut
        return spec.combine_fn()(spec.residual(blk, x, chain_runner(spec, blk, M)), s)

    # per-sample routing is data-dependent control flow (group sizes, which paths run): under
    # torch.compile the gated block runs eagerly (its convs are oneDNN / pyeff kernels already)
    # and the static parts around it compile, with no recompilation per group size
    @torch.compiler.disable
    def forward(self, x: Tensor) -> Tensor:
        ctl = self._ctl
        if ctl is None:  # outside a DDINet: the plain block
            return self.block(x)
        return ctl.run_block(self, x)

    # the two paths, on a group of samples
    def skip_path(self, x: Tensor, soft=None, hard=None) -> Tensor:
        return self.spec.skip(self.block, x)

    def exec_path(self, x: Tensor, soft: Tensor | None = None, hard: Tensor | None = None,
                  training: bool = False, shortcut: Tensor | None = None) -> Tensor:
        if hard is not None and not training and bool(hard.all()):
            hard = None  # every inner channel on: the plain convs
        if hard is not None and not training and not x.is_contiguous():
            # NCHW, the masked kernels' layout: only the executed samples turn (not the whole batch)
            x = x.contiguous()
            shortcut = None if shortcut is None else shortcut.contiguous()
        return self._execute(x, _Masks(soft, hard, training, self._folding()), shortcut)

    def run(self, x: Tensor, execute: Tensor, layer_weights: Tensor | None, soft: Tensor | None,
            hard: Tensor | None, training: bool, execution: str = "routed", inplace: bool = False) -> Tensor:
        """Skip or execute each sample (execute: bool [N]); layer_weights [N, 2] straight-through.
        execution: "routed" (only what was chosen) or "masked" (everything, then masks).
        inplace: x is an activation the caller owns and may be overwritten (the net's forward)."""
        # routed training: a projection shortcut runs on the whole batch (its BatchNorm sees the
        # batch's statistics, as in the plain network) and each group takes its rows
        sc = self.spec.shortcut_out(self.block, x) if training and self.projection_shortcut else None

        def ex(xs, s=None, h=None, c=None):
            return self.exec_path(xs, s, h, training, c)

        def skip(xs, s=None, h=None, c=None):
            return self.skip_path(xs) if c is None else c
        if execution == "masked":  # the papers' execution: every sample through both paths, then masked
            full = lambda xs: self.exec_path(xs, soft, hard, training=True)  # noqa: E731 (dense convs, masks multiply)
            return masked_all_paths(x, execute.to(torch.int64), [self.skip_path, full], layer_weights)
        return route(x, execute.to(torch.int64), [skip, ex], layer_weights, extras=(soft, hard, sc),
                     identity_inplace=self._inplace(training, inplace))

    def _inplace(self, training: bool, allowed: bool):
        return 0 if (allowed and not training and self.identity_skip) else None

    def width_path(self, k: int):
        """Inference in width mode: the block with its first k inner channels."""
        fold = self._folding()
        M = _Slice(k, fold) if k < self.width else _Masks(None, None, False, fold)
        return lambda xs: self._execute(xs, M)

    def run_width(self, x: Tensor, choice: Tensor, inplace: bool = False) -> Tensor:
        """Inference in width mode: choice [N] is 0 (skip) or 1 + the index of the sample's width;
        samples are grouped by choice and each group runs one dense block of its width."""
        paths = [self.skip_path] + [self.width_path(int(k)) for k in self.counts.tolist()]
        return route(x, choice, paths, identity_inplace=self._inplace(False, inplace))
