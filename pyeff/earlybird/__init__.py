"""Early-Bird tickets (You et al., ICLR 2020): find the pruning mask early, slim, train cheaply.

    from pyeff.earlybird import EarlyBird, SlimmingPenalty, apply_mask
    from pyeff.prune import slim
    eb = EarlyBird(model, ratios=(0.3, 0.5, 0.7))          # a pyeff.train.Hook, or eb.step() per epoch
    trainer = Trainer(model, cfg, train, test, hooks=[SlimmingPenalty(model), eb])
    small = slim(model, eb.mask(0.5))                       # the ticket, physically slimmed

See docs/earlybird.md.
"""
from pyeff.earlybird.detect import EarlyBird, SlimmingPenalty, global_mask, mask_distance
from pyeff.earlybird.lowprec import low_precision_
from pyeff.earlybird.masked import FreezeMasked, MaskHandle, apply_mask

__all__ = ["EarlyBird", "SlimmingPenalty", "mask_distance", "global_mask", "apply_mask", "MaskHandle",
           "FreezeMasked", "low_precision_"]
