"""EnergyHook: fill a pyeff.energy.EnergyAccount from what a training run actually executed.

    from pyeff.e2train.energy_hook import EnergyHook, format_energy_table
    eh = EnergyHook()                                  # put it LAST in the hook list
    Trainer(model, cfg, train, test, hooks=[..., eh]).fit()
    print(format_energy_table(eh.table()))             # one row per phase plus the total

Phases and what goes into them (MACs of nn.Conv2d and nn.Linear layers; BatchNorm, activations, the
optimizer and SLU's LSTM cell are not counted; no memory accesses are counted):
  forward     every conv / linear call of a training forward: rows that reached the layer x its MACs
              per row. float32 layers as "fp32"; PSGConv2d at its forward widths ("int8" at 8 / 8).
  backward    per call: the input gradient (when the layer's input needed one) and, for float layers,
              the weight gradient, each as many MACs as the forward, "fp32". A PSG layer's input
              gradient is counted here (fp32); its weight gradient is not.
  predictor   PSG's weight-gradient predictor: the layer's MACs at x_bits x g_bits (e.g. "int4x16");
              none at threshold=inf (the op then skips it).
  exact       PSG's full-precision weight gradient, as the op computed it: the output channels holding
              an uncertain entry (the layer's MACs x exact_rows / rows) or, when few entries are
              uncertain, those entries alone (exact_entries x N*OH*OW), "fp32".
  skipped     the batches SMD dropped: no MACs and no time (a dropped batch runs nothing); kept so
              that the table shows the phase.
Rows are counted at each layer's forward pre-hook, so SLU's routed blocks are charged for the samples
that executed them only (the executed fraction scales the gated blocks by construction), and dropped
batches, which never reach a layer, cost nothing. MACs per row come from pyeff.dynamic.module_flops
on a meta-device twin of the layer (no second FLOP counter), cached per input shape.

Measured wall-clock seconds: forward = from this hook's should_skip_batch to its loss call (so the
hook must be last), backward = from loss to its after_backward, less the PSG op's own time, which
goes to "predictor" (the op computes the predictor and the exact rows in one call; their split is not
timed). Epoch metrics: energy_j, energy_<phase>_j, energy_seconds (the sum of the timed phases),
energy_kept_batches, energy_dropped_batches; summed over DDP ranks. The whole run's account is
`hook.account` (checkpointed with the hook's state).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from pyeff.dynamic.cost import module_flops
from pyeff.energy import EnergyAccount, EnergyModel
from pyeff.train.hooks import Hook

PHASES = ("forward", "backward", "predictor", "exact", "skipped")


def _twin(m: nn.Module):
    """A meta-device copy of a conv / linear layer's shape (module_flops counts it without running)."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                         bias=False, device="meta")
    return nn.Linear(m.in_features, m.out_features, bias=False, device="meta")


def macs_per_row(m: nn.Module, shape) -> int:
    """MACs of one row (sample) of `m`'s forward for an input of `shape` (without the batch dim)."""
    return module_flops(_twin(m), torch.empty((1, *shape), device="meta")) // 2


class EnergyHook(Hook):
    """Per-phase energy account of a training run (see the module docstring for the rules).

    energy: the EnergyModel pricing the MACs (default EnergyModel(), 45 nm).
    """

    def __init__(self, energy: EnergyModel | None = None):
        if energy is None:
            energy = EnergyModel()
        if not isinstance(energy, EnergyModel):
            raise TypeError(f"EnergyHook: energy must be a pyeff.energy.EnergyModel, got {type(energy).__name__}")
        self.energy = energy.validate()
        self.account = EnergyAccount(self.energy)   # the whole run
        self.epoch = EnergyAccount(self.energy)     # the current epoch
        self._handles, self._attached = [], []
        self._calls = []                            # (module, rows, shape, input_needs_grad) this batch
        self._mpr = {}
        self._t = None
        self._t_loss = None
        self.kept = self.dropped = 0

    # -- instrumentation ------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.detach()
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self._attached.append(m)
                self._handles.append(m.register_forward_pre_hook(self._pre))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._attached = [], []

    def _pre(self, module, args):
        if not (module.training and torch.is_grad_enabled()) or not args:
            return
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        self._calls.append((module, int(x.shape[0]), tuple(x.shape[1:]), bool(x.requires_grad)))

    def _macs(self, m, shape) -> int:
        key = (id(m), shape)
        v = self._mpr.get(key)
        if v is None:
            v = self._mpr[key] = macs_per_row(m, shape)
        return v

    # -- the Trainer's calls ------------------------------------------------------------------
    def on_fit_begin(self, trainer) -> None:
        self.attach(getattr(trainer.model, "module", trainer.model))

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        self.epoch = EnergyAccount(self.energy)
        for p in PHASES:
            self.epoch.add_seconds(p, 0.0)
        self.kept = self.dropped = 0
        self._calls = []
        for m in self._psg_layers():
            m.psg_log.clear()

    def _psg_layers(self):
        from pyeff.nn.psg import PSGConv2d
        return [m for m in self._attached if isinstance(m, PSGConv2d)]

    def should_skip_batch(self, trainer, step: int, batch) -> bool:
        self._sync(trainer)
        self._t = time.perf_counter()
        self._t_loss = None
        self._calls = []
        return False

    def loss(self, trainer, outputs, targets, loss):
        self._sync(trainer)
        self._t_loss = time.perf_counter()
        if self._t is not None:
            self.epoch.add_seconds("forward", self._t_loss - self._t)
        return loss

    def after_backward(self, trainer) -> None:
        self._sync(trainer)
        now = time.perf_counter()
        psg_seconds = self._charge()
        if self._t_loss is not None:
            self.epoch.add_seconds("backward", max(0.0, now - self._t_loss - psg_seconds))
        self.epoch.add_seconds("predictor", psg_seconds)

    def on_batch_end(self, trainer, step: int, metrics: dict) -> None:
        self.kept += 1

    @staticmethod
    def _sync(trainer) -> None:
        dev = getattr(trainer, "device", None)
        if dev is not None and getattr(dev, "type", "cpu") == "cuda":
            torch.cuda.synchronize(dev)

    def _charge(self) -> float:
        """Charge this batch's recorded layer calls and PSG backward logs; returns the PSG op seconds."""
        from pyeff.nn.psg import PSGConv2d
        acct, psg_seconds, logged = self.epoch, 0.0, set()
        for m, rows, shape, x_grad in self._calls:
            n = rows * self._macs(m, shape)
            if isinstance(m, PSGConv2d):
                acct.add_macs("forward", n, (m.a_bits, m.w_bits))
                if x_grad:
                    acct.add_macs("backward", n, "fp32")
                if id(m) not in logged:  # the layer's backward calls of this batch, each once
                    logged.add(id(m))
                    for e in m.psg_log:
                        k = e["samples"] * self._macs(m, shape)
                        if e["predictor"]:
                            acct.add_macs("predictor", k, (m.x_bits, m.g_bits))
                        acct.add_macs("exact", k * e["exact_rows"] // e["rows"] + e["exact_entries"] * e["positions"],
                                      "fp32")
                        psg_seconds += e["seconds"]
                    m.psg_log.clear()
            else:
                acct.add_macs("forward", n, "fp32")
                if m.weight.requires_grad:
                    acct.add_macs("backward", n, "fp32")
                if x_grad:
                    acct.add_macs("backward", n, "fp32")
        self._calls = []
        return psg_seconds

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        steps = trainer.steps_per_epoch if hasattr(trainer, "steps_per_epoch") else None
        skipped = metrics.get("skipped_batches")
        self.dropped = int(skipped) if skipped is not None else (steps - self.kept if steps else 0)
        names = list(PHASES) + [p for p in self.epoch.phases if p not in PHASES]
        vals = [self.epoch.energy_j(p) for p in names] + [self.epoch.seconds()]
        vals = trainer.all_reduce_sum(vals) if hasattr(trainer, "all_reduce_sum") else vals
        for p, v in zip(names, vals):
            metrics[f"energy_{p}_j"] = float(v)
        metrics["energy_j"] = float(sum(vals[:-1]))
        metrics["energy_seconds"] = float(vals[-1])
        metrics["energy_kept_batches"] = self.kept
        metrics["energy_dropped_batches"] = self.dropped
        self.account.merge(self.epoch)

    def on_fit_end(self, trainer, history: list) -> None:
        self.detach()

    # -- reading ------------------------------------------------------------------------------
    def table(self) -> list:
        """The whole run's account: EnergyAccount.table() rows (phases plus 'total')."""
        return self.account.table()

    def state_dict(self) -> dict:
        return {"account": self.account.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.account.load_state_dict(state["account"])


def format_energy_table(rows: list) -> str:
    """A markdown table of EnergyAccount.table() rows: phase, MACs by arithmetic, joules, seconds."""
    labels = [k[5:] for k in (rows[0] if rows else {}) if k.startswith("macs_")]
    head = ["phase"] + [f"MACs {lb}" for lb in labels] + ["energy (J)", "seconds"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["phase"]] + [f"{r['macs_' + lb]:.4g}" for lb in labels] + [f"{r['energy_j']:.4g}",
                                                                              f"{r['seconds']:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
