"""The DDI training recipe on pyeff's shared training loop.

    (1) train the float network (or load it);
    (2) convert; train network, exit classifiers, layer gates and channel gates together:
        loss = CE(final) + exit_weight * sum_e CE(exit_e) + beta * cost * sign(cost% - target)
        (the shared `CostHingeHook` on the cost the DDINet reports: FLOPs, energy or latency).

The gates start open (layer gate biased to execute, channel gates to keep), so the hinge walks the
cost down from 100% to the target while the network adapts.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from pyeff.ddi.block import DEFAULT_WIDTHS
from pyeff.ddi.model import DDINet, convert
from pyeff.dynamic.hook import CostHingeHook
from pyeff.train import TrainConfig, run_training
from pyeff.train.phases import float_phase, recipe_config, sgd

DEFAULT_BETA = 2.0
DEFAULT_EXIT_WEIGHT = 0.5
DDI_FORMAT = "pyeff-ddi"


class DDIHook(CostHingeHook):
    """The cost hinge plus the early exits' cross-entropy (`exit_weight` each); logs each exit's
    test accuracy (`exit{i}_acc`) beside the computation percentage."""

    def __init__(self, target: float, beta: float = DEFAULT_BETA, exit_weight: float = DEFAULT_EXIT_WEIGHT):
        super().__init__(target, beta)
        if exit_weight < 0:
            raise ValueError(f"exit_weight must be >= 0, got {exit_weight}")
        self.exit_weight = float(exit_weight)
        self._exit_correct: list = []

    def loss(self, trainer, outputs, targets, loss):
        loss = super().loss(trainer, outputs, targets, loss)
        for logits in outputs.aux.get("exits", []):
            loss = loss + self.exit_weight * F.cross_entropy(logits, targets)
        return loss

    @staticmethod
    def _net(trainer):
        m = trainer.model
        return getattr(m, "module", m)

    def on_eval_begin(self, trainer):
        super().on_eval_begin(trainer)
        self._exit_correct = []
        net = self._net(trainer)
        if isinstance(net, DDINet):
            net.collect_exits = True

    def on_eval_batch(self, trainer, outputs, targets):
        super().on_eval_batch(trainer, outputs, targets)
        exits = outputs.aux.get("exits", [])
        if not self._exit_correct:
            self._exit_correct = [0] * len(exits) + [0]
        for i, logits in enumerate(exits):
            self._exit_correct[i] += int((logits.argmax(1) == targets).sum())
        self._exit_correct[-1] += targets.shape[0]

    def eval_metrics(self, trainer) -> dict:
        out = super().eval_metrics(trainer)
        net = self._net(trainer)
        if isinstance(net, DDINet):
            net.collect_exits = False
        if self._exit_correct:
            counts = trainer.all_reduce_sum(self._exit_correct)
            for i, c in enumerate(counts[:-1]):
                out[f"exit{i}_acc"] = c / max(counts[-1], 1)
        return out


def train_ddi(model: str = "resnet38", dataset: str = "shapes", *, cost: str = "flops", target: float = 25.0,
              beta: float = DEFAULT_BETA, exit_weight: float = DEFAULT_EXIT_WEIGHT, channel_gates: bool = True,
              layer_gates: bool = True, channel_mode: str = "mask", base_epochs: int = 10, ddi_epochs: int = 5,
              lr: float = 0.1,
              ddi_lr: float = 0.02, batch_size: int = 128, train_subset=None, test_subset=None, data_dir=None,
              seed: int = 0, device: str = "auto", out_dir: str = "runs/ddi", base_model=None,
              base_checkpoint=None, data=None, verbose: bool = True, threads=None) -> dict:
    """Run the recipe; returns {"net", "base", "history": {phase: [...]}, "checkpoint", "data"}.

    `base_model` (an nn.Module) or `base_checkpoint` (a pyeff checkpoint of `model`) skips phase 1;
    `data` = (train_set, test_set) skips loading. Phases write run folders under `out_dir`
    (phase1-float, phase2-ddi); the result is saved to out_dir/ddi.pt.
    """
    from pyeff.train import load_data

    common = recipe_config(model=model, dataset=dataset, data_dir=data_dir, batch_size=batch_size, seed=seed,
                           train_subset=train_subset, test_subset=test_subset, device=device, threads=threads)
    if data is None:
        data = load_data(TrainConfig(**common))
    train_set, test_set = data
    history = {}
    base_model, h1 = float_phase(common, data, epochs=base_epochs, lr=lr, out_dir=out_dir, base_model=base_model,
                                 base_checkpoint=base_checkpoint, verbose=verbose)
    if h1 is not None:
        history["phase1"] = h1
    net = convert(base_model, cost=cost, channel_gates=channel_gates, layer_gates=layer_gates,
                  input_size=tuple(train_set.images.shape[1:]), channel_mode=channel_mode)
    cfg = TrainConfig(epochs=ddi_epochs, lr=ddi_lr, out_dir=os.path.join(out_dir, "phase2-ddi"), **common)
    trainer = run_training(cfg, hooks=[DDIHook(target, beta, exit_weight)], model=net, data=data, verbose=verbose,
                           optimizer=sgd(net.parameters(), ddi_lr))
    history["phase2"] = trainer.history
    net = trainer.model.cpu()
    path = os.path.join(out_dir, "ddi.pt")
    save_ddi(net, path, model=model, dataset=dataset, num_classes=train_set.num_classes,
             in_channels=train_set.images.shape[1], target=target, beta=beta)
    return {"net": net, "base": base_model, "history": history, "checkpoint": path, "data": data}


def save_ddi(net: DDINet, path: str, **meta) -> None:
    from pyeff.train import atomic_save

    atomic_save({"format": DDI_FORMAT, "cost": net.cost_unit, "channel_gates": net.channel_gates,
                 "layer_gates": net.layer_gates, "exits": len(net.exits) > 0, "input_size": list(net.input_size),
                 "channel_mode": net.channel_mode, "widths": list(net.widths),
                 "table": net.table.to_dict(), "budget_exits": net.budget_exits,
                 "state_dict": net.state_dict(), **meta}, path)


def load_ddi(path: str) -> tuple[DDINet, dict]:
    """(DDINet, metadata) from a file written by train_ddi / save_ddi. A latency table is the one
    measured where the net was trained; call `net.measure_costs("latency")` to re-time it here."""
    from pyeff.ddi.costs import CostTable
    from pyeff.models import create_model

    if not os.path.exists(path):
        raise FileNotFoundError(f"no DDI checkpoint at {path} (pyeff ddi train writes <out>/ddi.pt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != DDI_FORMAT:
        raise ValueError(f"{path} is not a pyeff DDI checkpoint (pyeff ddi train writes <out>/ddi.pt)")
    base = create_model(ckpt["model"], num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"])
    unit = ckpt["cost"] if ckpt["cost"] != "latency" else "flops"  # the stored table replaces it below
    net = convert(base, cost=unit, channel_gates=ckpt["channel_gates"], layer_gates=ckpt["layer_gates"],
                  exits=ckpt["exits"], input_size=tuple(ckpt["input_size"]), copy_model=False,
                  channel_mode=ckpt.get("channel_mode", "mask"), widths=tuple(ckpt.get("widths", DEFAULT_WIDTHS)))
    net.load_state_dict(ckpt["state_dict"])
    net.table, net.cost_unit = CostTable.from_dict(ckpt["table"]), ckpt["cost"]
    if ckpt.get("budget_exits"):
        net.budget_exits = {float(k): int(v) for k, v in ckpt["budget_exits"].items()}
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "table")}
    return net.eval(), meta
