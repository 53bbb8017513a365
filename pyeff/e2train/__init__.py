"""E2-Train (Wang et al., NeurIPS 2019, arXiv 1910.13349): energy-efficient training at three
levels. Here so far: SMD, stochastic mini-batch dropping (the data level), and SLU, selective layer
update (the model level), as hooks on the shared training loop; the run's energy is counted with
pyeff.energy.EnergyAccount.

    from pyeff.e2train import SMDHook, stretch_epochs
    Trainer(model, config.replace(epochs=stretch_epochs(config.epochs, 0.5)), train_set, test_set,
            hooks=[SMDHook(p=0.5, seed=0)]).fit()

    from pyeff.e2train import slu
    net = slu.convert(model, target=0.5)          # per-input block skipping, routed
    Trainer(net, config, train_set, test_set, hooks=[slu.SLUHook()]).fit()

All three levels (PSG: pyeff.nn.psg_ / PSGConv2d) and the energy account in one object:

    from pyeff.e2train import E2Train
    model, hooks = E2Train(smd=True, slu=True, psg=True).apply(model)

See docs/e2train.md.
"""
from pyeff.e2train.smd import SMDHook, drop_draw, stretch_epochs

__all__ = ["SMDHook", "drop_draw", "stretch_epochs", "slu", "SLUConfig", "SLUHook", "SLUNet", "E2Train",
           "EnergyHook", "format_energy_table"]
_LAZY = {"E2Train": "pyeff.e2train.recipe", "EnergyHook": "pyeff.e2train.energy_hook",
         "format_energy_table": "pyeff.e2train.energy_hook"}


def __getattr__(name):  # SLU pulls in the dynamic core and DDI: import it on first use
    if name in ("slu", "SLUConfig", "SLUHook", "SLUNet"):
        import importlib
        mod = importlib.import_module("pyeff.e2train.slu")
        return mod if name == "slu" else getattr(mod, name)
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
