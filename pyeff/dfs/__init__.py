"""DFS (dynamic fractional skipping, arXiv 2001.00705): per sample and residual block, a shared
recurrent gate chooses to skip the block, run it quantised at one of several bit widths (pyeff's
integer engine), or run it at full precision. Only the chosen path runs at inference.

    net = pyeff.dfs.convert(model, bits=(0, 8, 16, 32))      # or convert(model, DFSConfig(...))
    logits, aux = net(x)          # aux["cost"] [N], aux["decisions"] [N, blocks]

See docs/dfs.md.
"""
from pyeff.dfs.block import DFSBlock
from pyeff.dfs.config import HW_BITS, PAPER_BITS, DFSConfig, check_bits
from pyeff.dfs.model import DFSNet, convert

__all__ = ["DFSBlock", "DFSNet", "DFSConfig", "convert", "check_bits", "PAPER_BITS", "HW_BITS", "DFSHook",
           "train_dfs", "DFSRecipe"]


def __getattr__(name):  # the recipe pulls in the training loop: import it on first use
    if name in ("DFSHook", "train_dfs", "DFSRecipe"):
        from pyeff.dfs import recipe
        return getattr(recipe, name)
    raise AttributeError(name)
