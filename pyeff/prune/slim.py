"""Physical slimming: remove the channels a BatchNorm mask lets go (see pyeff.prune.plan), with
Torch-Pruning doing the surgery, so the result is an ordinary, smaller dense network that computes
exactly what the masked network computes."""
from __future__ import annotations

import copy

import torch
from torch import nn

from pyeff.prune.plan import ChannelPlan, bn_layers, channel_plan, check_keep


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


def slim(model: nn.Module, keep: dict, example_input=None, return_plan: bool = False):
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
    plan: ChannelPlan = channel_plan(out, keep, example_input)
    dg = plan.graph
    for g in plan.groups:
        idx = torch.nonzero(g.remove).flatten().tolist()
        if idx:
            dg.get_pruning_group(g.root, g.root_fn, idx).prune()
    _refresh_attributes(out)
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
