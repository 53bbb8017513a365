"""DDI (dual dynamic inference, arXiv 1907.04523): input-dependent layer and channel skipping
(multi-grained learning to skip) plus resource-dependent halting at early exits under a budget in
FLOPs, energy or measured latency. Only what is chosen runs at inference.

    net = pyeff.ddi.convert(model, cost="flops")        # or convert(model, DDIConfig(...))
    logits, aux = net(x)           # aux["cost"] [N], aux["execute"] [N, G], aux["channels"] [N, G]
    net.eval().set_budget(0.25)    # no sample above 25% of the dense cost

See docs/ddi.md.
"""
from pyeff.ddi.block import DDIBlock
from pyeff.ddi.config import DDIConfig
from pyeff.energy import EnergyModel
from pyeff.ddi.costs import BlockCost, CostTable, build_table
from pyeff.ddi.model import DDINet, ExitHead, convert

__all__ = ["DDIBlock", "DDINet", "DDIConfig", "ExitHead", "convert", "BlockCost", "CostTable", "EnergyModel",
           "build_table", "DDIHook", "train_ddi", "DDIRecipe"]


def __getattr__(name):  # the recipe pulls in the training loop: import it on first use
    if name in ("DDIHook", "train_ddi", "DDIRecipe"):
        from pyeff.ddi import recipe
        return getattr(recipe, name)
    raise AttributeError(name)
