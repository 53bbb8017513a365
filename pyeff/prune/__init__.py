"""One channel pruner for the whole package, on Torch-Pruning's dependency graph.

    from pyeff.prune import slim
    small = slim(model, keep, example_input)     # keep: {BatchNorm2d name: bool tensor}

`slim` removes masked channels and everything that consumed them (residual additions,
concatenations, grouped/depthwise convs, linear heads) where that is exact, and zeroes the rest, so
the slim network computes what the masked network (`masked`) computes. `channel_plan` says which
channels go without touching the model. Early-Bird's tickets and DDI's static-pruning baseline
both prune through it. See docs/earlybird.md.
"""
from pyeff.prune.plan import ChannelPlan, bn_layers, channel_plan, check_keep, default_input
from pyeff.prune.slim import masked, slim, zero_masked

__all__ = ["slim", "masked", "zero_masked", "channel_plan", "ChannelPlan", "bn_layers", "check_keep",
           "default_input"]
