"""E2Train: any combination of E2-Train's three levels on a model, in one object.

    from pyeff.e2train import E2Train
    e2 = E2Train(smd=True, slu=True, psg=True)        # each level: True / False / its own settings
    model, hooks = e2.apply(model)                     # hooks for the shared Trainer
    cfg = cfg.replace(epochs=e2.epochs(cfg.epochs))    # SMD's 4/3 stretch (unchanged without SMD)
    Trainer(model, cfg, train, test, hooks=hooks).fit()
    print(format_energy_table(e2.energy_hook.table()))

Order of application: PSG first (every nn.Conv2d of the model becomes a PSGConv2d, sharing its
parameters), then SLU (`slu.convert`, which wraps the blocks; its gate's own convs are created after
and stay float). Hooks, in order: SMDHook, SLUHook, PSGSignHook, EnergyHook (last: it times the
phases between the other hooks' calls).
"""
from __future__ import annotations

import numbers

from torch import nn

from pyeff.e2train.energy_hook import EnergyHook
from pyeff.e2train.smd import SMDHook, stretch_epochs
from pyeff.energy import EnergyModel

WHO = "pyeff.e2train.E2Train"
PSG_KEYS = ("x_bits", "g_bits", "threshold", "w_bits", "a_bits", "backend", "filter_fn", "sign", "sign_scale")


class E2Train:
    """E2-Train's levels, each optional.

    smd: True (SMDHook(p=0.5, seed=0)), False, a probability p in [0, 1), or an SMDHook.
    slu: True (SLUConfig(): target 0.5, beta 1e-5), False, or an SLUConfig.
    psg: True (x_bits 4, g_bits 16, threshold 5e-5, 8-bit forward, sign update), False, or a dict of
        those: x_bits, g_bits, threshold, w_bits, a_bits, backend, filter_fn (as pyeff.nn.psg_),
        sign (True: add PSGSignHook), sign_scale (its scale).
    energy: the EnergyModel of the energy account (None: no EnergyHook).
    Bad settings raise ValueError naming the argument when the object is made; a model SLU cannot
    gate raises in apply().
    """

    def __init__(self, smd=True, slu=True, psg=True, energy: EnergyModel | None = EnergyModel()):
        self.smd = self._smd(smd)
        self.slu = self._slu(slu)
        self.psg = self._psg(psg)
        if energy is not None and not isinstance(energy, EnergyModel):
            raise ValueError(f"{WHO}: energy must be a pyeff.energy.EnergyModel or None, got {type(energy).__name__}")
        self.energy = energy.validate() if energy is not None else None
        self.energy_hook: EnergyHook | None = None

    # -- validation ---------------------------------------------------------------------------
    @staticmethod
    def _smd(smd):
        if smd is False or smd is None:
            return None
        if smd is True:
            return SMDHook(p=0.5, seed=0)
        if isinstance(smd, SMDHook):
            return smd
        if isinstance(smd, numbers.Real) and not isinstance(smd, bool):
            try:
                return SMDHook(p=smd)
            except ValueError as e:
                raise ValueError(f"{WHO}: smd={smd!r}: {e}") from None
        raise ValueError(f"{WHO}: smd must be True, False, a drop probability p in [0, 1) or an SMDHook, got {smd!r}")

    @staticmethod
    def _slu(slu):
        from pyeff.e2train.slu import SLUConfig
        if slu is False or slu is None:
            return None
        if slu is True:
            return SLUConfig().validate()
        if isinstance(slu, SLUConfig):
            try:
                return slu.validate()
            except ValueError as e:
                raise ValueError(f"{WHO}: slu: {e}") from None
        raise ValueError(f"{WHO}: slu must be True, False or an SLUConfig, got {slu!r}")

    @staticmethod
    def _psg(psg):
        from pyeff.nn.psg import check_psg_bits, check_threshold
        if psg is False or psg is None:
            return None
        if psg is True:
            psg = {}
        if not isinstance(psg, dict):
            raise ValueError(f"{WHO}: psg must be True, False or a dict of {', '.join(PSG_KEYS)}, got {psg!r}")
        unknown = sorted(set(psg) - set(PSG_KEYS))
        if unknown:
            raise ValueError(f"{WHO}: psg has unknown keys {unknown}; known: {', '.join(PSG_KEYS)}")
        cfg = {"x_bits": 4, "g_bits": 16, "threshold": 5e-5, "w_bits": 8, "a_bits": 8, "backend": None,
               "filter_fn": None, "sign": True, "sign_scale": 1.0, **psg}
        who = f"{WHO}: psg"
        for k in ("x_bits", "g_bits", "w_bits", "a_bits"):
            cfg[k] = check_psg_bits(k, cfg[k], who)
        cfg["threshold"] = check_threshold(cfg["threshold"], who)
        if not isinstance(cfg["sign"], bool):
            raise ValueError(f"{who}: sign must be True or False, got {cfg['sign']!r}")
        if cfg["filter_fn"] is not None and not callable(cfg["filter_fn"]):
            raise ValueError(f"{who}: filter_fn must be callable (module, name) -> bool")
        from pyeff.nn.psg import PSGSignHook
        try:
            PSGSignHook(cfg["sign_scale"])
        except ValueError as e:
            raise ValueError(f"{who}: sign_scale: {e}") from None
        return cfg

    # -- use ----------------------------------------------------------------------------------------
    def epochs(self, epochs: int) -> int:
        """The epoch count to train: SMD's stretch (stretch_epochs(epochs, p)) with SMD, else `epochs`."""
        return stretch_epochs(epochs, self.smd.p) if self.smd is not None else epochs

    def apply(self, model: nn.Module, copy_model: bool = True):
        """(model, hooks): the model with PSG layers and/or SLU gates (a converted copy unless
        copy_model=False; PSG converts in place when SLU is off and copy_model=False) and the hooks
        for the shared Trainer. Fresh hooks on every call (the SMDHook given, if any, is reused)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"{WHO}.apply expects an nn.Module, got {type(model).__name__}")
        hooks = []
        if self.slu is not None:
            from pyeff.e2train.slu import _check_model
            try:
                _check_model(model)  # before any conversion: a clear error naming the model
            except ValueError as e:
                raise ValueError(f"{WHO}: slu: {e}") from None
        if self.psg is not None:
            from pyeff.nn.psg import PSGSignHook, psg_
            c = self.psg
            model = psg_(model, c["x_bits"], c["g_bits"], c["threshold"], c["filter_fn"], inplace=not copy_model,
                         w_bits=c["w_bits"], a_bits=c["a_bits"], backend=c["backend"])
            copy_model = False  # already a copy (or in place, as asked)
        if self.slu is not None:
            from pyeff.e2train.slu import SLUHook, convert
            model = convert(model, self.slu, copy_model=copy_model)
        if self.smd is not None:
            hooks.append(self.smd)
        if self.slu is not None:
            hooks.append(SLUHook())
        if self.psg is not None and self.psg["sign"]:
            hooks.append(PSGSignHook(self.psg["sign_scale"]))
        self.energy_hook = EnergyHook(self.energy) if self.energy is not None else None
        if self.energy_hook is not None:
            hooks.append(self.energy_hook)
        return model, hooks

    def describe(self) -> dict:
        """The levels' settings as plain values (for a checkpoint's metadata)."""
        return {"smd": None if self.smd is None else {"p": self.smd.p, "seed": self.smd.seed,
                                                       "step_dropped": self.smd.step_dropped},
                "slu": None if self.slu is None else self.slu.to_dict(),
                "psg": None if self.psg is None else {k: v for k, v in self.psg.items() if k != "filter_fn"}}

    def __repr__(self) -> str:
        return (f"E2Train(smd={self.smd!r}, slu={'on' if self.slu else 'off'}, "
                f"psg={'off' if self.psg is None else {k: v for k, v in self.psg.items() if k != 'filter_fn'}})")
