"""The dynamic-execution core shared by DFS, DDI and E2-Train: gates that decide per sample,
a router that runs only the chosen path, and a cost meter with the hinge loss toward a target."""
from pyeff.dynamic.cost import CostMeter, bit_cost, choice_costs, hinge_cost_loss, module_flops
from pyeff.dynamic.gates import ChannelGate, GateOutput, RecurrentGate, WidthGate, straight_through
from pyeff.dynamic.router import group_indices, masked_all_paths, route

__all__ = ["CostMeter", "bit_cost", "choice_costs", "hinge_cost_loss", "module_flops", "ChannelGate",
           "GateOutput", "RecurrentGate", "WidthGate", "straight_through", "group_indices", "masked_all_paths", "route"]
