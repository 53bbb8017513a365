"""Masked sparse training on the dense modules: the masked channels cost nothing.

`apply_mask(model, keep)` keeps the user's modules and parameters (their optimizer, hooks and
checkpoints still refer to them) and swaps each affected layer's forward for one that runs on the
kept channels only: a batch-shared channel mask is a dense conv on a sub-tensor, so every conv,
BatchNorm and linear layer slices its weights to the kept rows and columns (`index_select`, whose
backward writes zeros to the masked entries) and the activations between them are compact. The
plan of which channels stay is pyeff.prune's, so the masked forward is the slim network's forward
on the dense parameters. Measured against `masked_conv2d`'s shared-row path on ResNet-20's convs,
slicing is faster (bench/earlybird.py), so slicing it is.

    handle = apply_mask(model, eb.mask(0.5))
    hooks = [handle.freeze_hook(optimizer)]      # masked entries and their optimizer state untouched
    ...
    handle.remove()                              # the dense forward again
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from pyeff.prune.plan import channel_plan, default_input, in_size, out_size
from pyeff.train.hooks import Hook


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The view of a parameter whose rows are its (out, in) pairs (a conv's kernels), or its entries."""
    return t.reshape(t.shape[0] * t.shape[1], -1) if t.dim() >= 2 else t.reshape(-1, 1)


def _pair_rows(shape, out_idx, in_idx, depthwise: bool):
    """Row numbers in `_rows` of the kept (out, in) pairs, or None when every pair stays."""
    if out_idx is None and (in_idx is None or depthwise):
        return None
    n_out, n_in = shape[0], shape[1]
    o = out_idx if out_idx is not None else torch.arange(n_out, device=(in_idx if in_idx is not None else out_idx).device)
    i = in_idx if (in_idx is not None and not depthwise) else torch.arange(n_in, device=o.device)
    return (o[:, None] * n_in + i[None, :]).flatten()


def _select(w: torch.Tensor, rows, n_out: int, n_in: int) -> torch.Tensor:
    """The kept kernels of `w` in one gather (its backward writes one zero-filled full-size gradient)."""
    return _rows(w).index_select(0, rows).view(n_out, n_in, *w.shape[2:])


def _conv_forward(conv: nn.Conv2d, out_idx, in_idx, depthwise: bool):
    rows = _pair_rows(conv.weight.shape, out_idx, in_idx, depthwise)
    n_out = len(out_idx) if out_idx is not None else conv.weight.shape[0]
    n_in = conv.weight.shape[1] if (depthwise or in_idx is None) else len(in_idx)

    def forward(self, x):
        w = self.weight if rows is None else _select(self.weight, rows, n_out, n_in)
        b = self.bias
        if b is not None and out_idx is not None:
            b = b.index_select(0, out_idx)
        groups = n_out if depthwise else self.groups
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)
    return types.MethodType(forward, conv)


def _linear_forward(lin: nn.Linear, out_idx, in_idx):
    rows = _pair_rows(lin.weight.shape, out_idx, in_idx, False)
    n_out = len(out_idx) if out_idx is not None else lin.out_features
    n_in = len(in_idx) if in_idx is not None else lin.in_features

    def forward(self, x):
        w = self.weight if rows is None else _select(self.weight, rows, n_out, n_in).view(n_out, n_in)
        b = self.bias
        if b is not None and out_idx is not None:
            b = b.index_select(0, out_idx)
        return F.linear(x, w, b)
    return types.MethodType(forward, lin)


def _bn_forward(bn: nn.BatchNorm2d, idx, scale):
    """BatchNorm on the kept channels; `scale` (0/1 per kept channel) zeroes the masked channels that
    stay because they are tied to kept ones. Running statistics are updated in place, kept channels only."""
    def forward(self, x):
        w, b = self.weight, self.bias
        if idx is not None and w is not None:
            w, b = w.index_select(0, idx), b.index_select(0, idx)
        if scale is not None:
            w, b = w * scale, b * scale
        use_batch = self.training
        if not self.track_running_stats:
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        rm, rv = self.running_mean, self.running_var
        if idx is not None:
            rm, rv = rm.index_select(0, idx), rv.index_select(0, idx)
        momentum = self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        y = F.batch_norm(x, rm, rv, w, b, use_batch, momentum or 0.0, self.eps)
        if self.training and idx is not None:
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, rm)
                self.running_var.index_copy_(0, idx, rv)
        return y
    return types.MethodType(forward, bn)


class MaskHandle:
    """What `apply_mask` returns: the channel plan, the masked entries of each parameter (`frozen`,
    `frozen_rows`), `freeze_hook()`, and `remove()`."""

    def __init__(self, model, plan, patched, frozen_rows):
        self.model, self.plan, self.patched, self.frozen_rows = model, plan, patched, frozen_rows

    def remove(self) -> None:
        """Give every patched layer its dense forward back."""
        for m in self.patched:
            m.__dict__.pop("forward", None)
        self.patched = []

    def freeze_hook(self, optimizer=None) -> "FreezeMasked":
        """A pyeff.train.Hook that keeps the masked entries of every parameter, and of the optimizer's
        state, as they were (weight decay and momentum would otherwise move them). Outside the shared
        loop: `hook.after_backward(None)` before and `hook.on_batch_end(None, 0, {})` after each
        `optimizer.step()`."""
        return FreezeMasked(self.model, self.frozen_rows, optimizer)

    @property
    def frozen(self) -> dict:
        """{parameter name: bool tensor of the parameter's shape}: its masked entries."""
        params = dict(self.model.named_parameters())
        out = {}
        for n, r in self.frozen_rows.items():
            p = params[n]
            m = torch.zeros(_rows(p).shape[0], dtype=torch.bool)
            m[r] = True
            out[n] = m.view(*p.shape[:2], *([1] * (p.dim() - 2))).expand_as(p) if p.dim() >= 2 else m
        return out


class FreezeMasked(Hook):
    """Puts back the masked entries of the parameters, and of their optimizer state, after each step.

    Masked entries are whole rows of `_rows(param)` (a conv's kernels, an entry of a BatchNorm), so a
    restore is one index_copy_ per tensor. Their values are taken once, when the hook is made
    (parameters) and at the first step that finds optimizer state for them (state created by that
    very step, e.g. SGD's momentum at the first step, is put back to zero)."""

    def __init__(self, model, frozen_rows: dict, optimizer=None):
        params = dict(model.named_parameters())
        self.items = [(params[n], r.to(params[n].device)) for n, r in frozen_rows.items() if len(r)]
        self.values = [_rows(p.detach()).index_select(0, r) for p, r in self.items]
        self.optimizer = optimizer
        self._state = [None] * len(self.items)

    def _opt(self, trainer):
        return self.optimizer if self.optimizer is not None else getattr(trainer, "optimizer", None)

    @torch.no_grad()
    def after_backward(self, trainer) -> None:
        opt = self._opt(trainer)
        if opt is None:
            return
        for i, (p, r) in enumerate(self.items):
            if self._state[i] is None:
                self._state[i] = {k: _rows(v).index_select(0, r) for k, v in opt.state.get(p, {}).items()
                                  if torch.is_tensor(v) and v.shape == p.shape}

    @torch.no_grad()
    def on_batch_end(self, trainer, step: int, metrics: dict) -> None:
        opt = self._opt(trainer)
        for i, ((p, r), v) in enumerate(zip(self.items, self.values)):
            _rows(p.data).index_copy_(0, r, v)
            if opt is None:
                continue
            before = self._state[i] or {}
            for k, t in opt.state.get(p, {}).items():
                if torch.is_tensor(t) and t.shape == p.shape:
                    if k in before:
                        _rows(t).index_copy_(0, r, before[k])
                    else:
                        _rows(t).index_fill_(0, r, 0)


def apply_mask(model: nn.Module, keep: dict, example_input=None, check: bool = True) -> MaskHandle:
    """Make the channels `keep` masks cost nothing in forward and backward, in place, keeping the
    dense modules and parameters. The output equals `pyeff.prune.masked(model, keep)`'s (and the
    slim network's); parameters of masked channels get zero gradients.

    Args:
        model: a network whose masks sit on BatchNorm2d layers (see pyeff.prune).
        keep: {BatchNorm2d name: bool tensor of the channels to keep}.
        example_input: an input to trace the model with (default 1 x C x 32 x 32).
        check: compare the masked forward with the masked network on a random input shaped like
            `example_input` (eval mode, two forwards) and raise, undoing the patch, if they differ.
    """
    if any("forward" in m.__dict__ for m in model.modules()):
        raise ValueError("apply_mask: the model already has a mask applied (or a patched forward); call "
                         "handle.remove() first")
    x = example_input if example_input is not None else default_input(model)
    plan = channel_plan(model, keep, x)
    zeroed = plan.zeroed()
    patched, frozen = [], {}
    for name, m in model.named_modules():
        out_idx, in_idx = plan.out_keep.get(name), plan.in_keep.get(name)
        z = zeroed.get(name)
        if out_idx is not None and len(out_idx) == out_size(m):
            out_idx = None
        if in_idx is not None and len(in_idx) == in_size(m):
            in_idx = None
        if out_idx is None and in_idx is None and z is None:
            continue
        dev = next(iter([*m.parameters(), *m.buffers()])).device
        out_idx = out_idx.to(dev) if out_idx is not None else None
        in_idx = in_idx.to(dev) if in_idx is not None else None
        if isinstance(m, nn.BatchNorm2d):
            scale = None
            if z is not None:
                kept = out_idx.cpu() if out_idx is not None else torch.arange(m.num_features)
                scale = (~z[kept]).to(m.weight.dtype).to(dev)
            m.forward = _bn_forward(m, out_idx, scale)
            mask = torch.ones(m.num_features, dtype=torch.bool)
            mask[out_idx.cpu() if out_idx is not None else slice(None)] = False
            if z is not None:
                mask |= z
            for pn in (("weight", "bias") if m.affine else ()):
                frozen[f"{name}.{pn}"] = torch.nonzero(mask).flatten()
        elif isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if m.groups > 1 and not depthwise:
                raise NotImplementedError(f"apply_mask: {name} is a grouped conv ({m.groups} groups, not depthwise); "
                                          "use pyeff.prune.slim for such networks")
            if m.padding_mode != "zeros":
                raise NotImplementedError(f"apply_mask: {name} pads with {m.padding_mode!r}; only zero padding is supported")
            m.forward = _conv_forward(m, out_idx, in_idx, depthwise)
            frozen.update(_frozen_matrix(name, m, out_idx, in_idx, depthwise))
        elif isinstance(m, nn.Linear):
            m.forward = _linear_forward(m, out_idx, in_idx)
            frozen.update(_frozen_matrix(name, m, out_idx, in_idx, False))
        else:
            raise NotImplementedError(f"apply_mask: {name} ({type(m).__name__}) carries masked channels; only Conv2d, "
                                      "BatchNorm2d and Linear layers can run compact (pyeff.prune.slim handles more)")
        patched.append(m)
    handle = MaskHandle(model, plan, patched, frozen)
    if check:
        from pyeff.prune.slim import check_same, zero_masked

        try:
            check_same(model, zero_masked(_unpatched_copy(model), keep), torch.randn_like(x), "pyeff.earlybird.apply_mask")
        except RuntimeError:
            handle.remove()
            raise
    return handle


def _unpatched_copy(model: nn.Module) -> nn.Module:
    import copy

    twin = copy.deepcopy(model)
    for m in twin.modules():
        m.__dict__.pop("forward", None)
    return twin


def _frozen_matrix(name, m, out_idx, in_idx, depthwise) -> dict:
    """Rows of `_rows(weight)` (and entries of the bias) that the compact forward never reads."""
    w = m.weight
    out = {}
    kept = _pair_rows(w.shape, out_idx, in_idx, depthwise)
    if kept is not None:
        frozen = torch.ones(w.shape[0] * w.shape[1], dtype=torch.bool)
        frozen[kept.cpu()] = False
        out[f"{name}.weight"] = torch.nonzero(frozen).flatten()
    if m.bias is not None and out_idx is not None:
        b = torch.ones(w.shape[0], dtype=torch.bool)
        b[out_idx.cpu()] = False
        out[f"{name}.bias"] = torch.nonzero(b).flatten()
    return out
