"""Physical slimming: remove the channels a BatchNorm mask lets go (see pyeff.prune.plan), with
Torch-Pruning doing the surgery, so the result is an ordinary, smaller dense network that computes
exactly what the masked network computes."""
from __future__ import annotations

import copy

import torch
from torch import nn

from pyeff.prune.plan import ChannelPlan, bn_layers, channel_plan, check_keep, default_input


@torch.no_grad()
def zero_masked(model: nn.Module, keep: dict) -> nn.Module:
    """In place: the scale and shift of every channel `keep` masks set to 0 (the masked network)."""
    keep = check_keep(model, keep, "pyeff.prune.zero_masked")
    for name, bn in bn_layers(model).items():
        off = ~keep[name].to(bn.weight.device)
        bn.weight[off] = 0
        bn.bias[off] = 0
    return model


def masked(model: nn.Module, keep: dict) -> nn.Module:
    """A copy of `model` with the channels `keep` masks zeroed after their BatchNorm: the network
    `slim` and `pyeff.earlybird.apply_mask` must reproduce."""
    return zero_masked(copy.deepcopy(model), keep)


def check_same(got: nn.Module, ref: nn.Module, x: torch.Tensor, what: str) -> None:
    """Raise unless `got(x)` equals `ref(x)` (both in eval mode, no grad): the guard that a rule of
    pyeff.prune.plan was exact on this network (an activation with f(0) != 0 after a masked
    BatchNorm, e.g. a sigmoid, would break it)."""
    was_g, was_r = got.training, ref.training
    got.eval(), ref.eval()
    try:
        with torch.no_grad():
            a, b = got(x), ref(x)
    finally:
        got.train(was_g), ref.train(was_r)
    a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
    tol = 1e-4 * (1.0 + float(b.abs().max()))
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=tol):
        raise RuntimeError(f"{what}: the result does not compute what the masked network computes on a test input "
                           f"(largest difference {float((a - b).abs().max()) if a.shape == b.shape else 'shape'}); "
                           "the network has an op the pruning rule does not cover, e.g. an activation with f(0) != 0 "
                           "after a masked BatchNorm. Use pyeff.prune.masked(model, keep) for this network.")


def slim(model: nn.Module, keep: dict, example_input=None, return_plan: bool = False, check: bool = True):
    """A slimmed copy of `model`: every channel `keep` masks is removed where that is exact, with
    everything that produced or consumed it (residual additions, concatenations, grouped and
    depthwise convs, linear heads); masked channels tied to channels that stay are zeroed. The
    original model is untouched.

    Args:
        model: any CNN whose masked channels sit after a BatchNorm2d (pyeff's ResNets, PreResNets,
            VGG, DenseNet-BC; torchvision's ResNets and MobileNetV2, ...).
        keep: {BatchNorm2d name: bool tensor of the channels to keep}, e.g. `EarlyBird.mask(0.5)`.
        example_input: an input to trace the model with (default 1 x C x 32 x 32).
        return_plan: also return the `ChannelPlan` (which channels went, which were zeroed).
        check: compare the result with the masked network on a random input shaped like
            `example_input` (two forwards) and raise if they differ.

    Example:
        >>> from pyeff.models import create_model
        >>> net = create_model("vgg11")
        >>> keep = {n: torch.arange(bn.num_features) % 2 == 0 for n, bn in bn_layers(net).items()}
        >>> small = slim(net, keep)
        >>> sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())
        True
    """
    keep = check_keep(model, keep, "pyeff.prune.slim")
    out = masked(model, keep)
    ref = copy.deepcopy(out) if check else None
    example_input = example_input if example_input is not None else default_input(model)
    plan: ChannelPlan = channel_plan(out, keep, example_input)
    dg = plan.graph
    for g in plan.groups:
        idx = torch.nonzero(g.remove).flatten().tolist()
        if idx:
            dg.get_pruning_group(g.root, g.root_fn, idx).prune()
    _refresh_attributes(out)
    if check:
        check_same(out, ref, torch.randn_like(example_input), "pyeff.prune.slim")
    return (out, plan) if return_plan else out


def _refresh_attributes(model: nn.Module) -> None:
    """Modules that record their widths (pyeff's DenseLayer, VGG's cfg) are told the new ones."""
    from pyeff.models.densenet import DenseLayer
    from pyeff.models.vgg import CifarVGG

    for m in model.modules():
        if isinstance(m, DenseLayer):
            m.in_channels, m.width = m.conv1.in_channels, m.conv1.out_channels
        elif isinstance(m, CifarVGG):
            convs = iter([c.out_channels for c in m.features if isinstance(c, nn.Conv2d)])
            m.cfg = [v if v == "M" else next(convs) for v in m.cfg]
