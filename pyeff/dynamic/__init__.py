"""The dynamic-execution core shared by DFS, DDI and the methods to come: one registry of the
block types they understand, one base for converted networks (controller, forced decisions,
execution modes, calibration, evaluation), gates that decide per sample, a router that runs only
the chosen path, and a cost meter with the hinge loss toward a target. See docs/dynamic.md."""
from pyeff.dynamic.blocks import BlockSpec, Conv, block_spec, register_block, supported_blocks, unregister_block
from pyeff.dynamic.cost import CostMeter, bit_cost, choice_costs, hinge_cost_loss, module_flops
from pyeff.dynamic.gates import ChannelGate, GateOutput, RecurrentGate, WidthGate, straight_through
from pyeff.dynamic.router import group_indices, masked_all_paths, route

__all__ = ["BlockSpec", "Conv", "block_spec", "register_block", "supported_blocks", "unregister_block",
           "CostMeter", "bit_cost", "choice_costs", "hinge_cost_loss", "module_flops", "ChannelGate",
           "GateOutput", "RecurrentGate", "WidthGate", "straight_through", "group_indices", "masked_all_paths",
           "route", "DynamicNet", "DynamicBlock", "StaticBlock", "Controller"]


def __getattr__(name):  # the base imports the gates and modules: load it on first use
    if name in ("DynamicNet", "DynamicBlock", "StaticBlock", "Controller"):
        from pyeff.dynamic import net
        return getattr(net, name)
    raise AttributeError(name)
