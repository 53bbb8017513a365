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
from dataclasses import dataclass

import torch.nn.functional as F

from pyeff.ddi.config import DDIConfig
from pyeff.ddi.model import DDINet, convert
from pyeff.dynamic.hook import CostHingeHook
from pyeff.train import distributed as dist_util
from pyeff.train import run_training
from pyeff.train.checkpoint import read_checkpoint
from pyeff.train.phases import (RecipeConfig, check_int, check_number, float_phase, load_base,  # noqa: F401
                                recipe_config, sgd, split_overrides)  # (re-exported)

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


@dataclass
class DDIRecipe(RecipeConfig):
    """The DDI recipe's settings (the conversion's are a DDIConfig); validated on construction, so
    a bad value fails before phase 1.

    target: target cost, percent of the dense network in the config's unit (0-100).
    beta: weight of the cost term.
    exit_weight: weight of each early exit's cross-entropy.
    ddi_epochs: phase 2 epochs (network, exits and gates together).
    ddi_lr: phase 2 learning rate.
    """
    beta: float = DEFAULT_BETA
    out_dir: str = "runs/ddi"
    exit_weight: float = DEFAULT_EXIT_WEIGHT
    ddi_epochs: int = 5
    ddi_lr: float = 0.02

    @classmethod
    def _what(cls) -> str:
        return "DDI recipe"

    def validate(self) -> "DDIRecipe":
        super().validate()
        check_number(self, "exit_weight", lo=0)
        check_int(self, "ddi_epochs", lo=1)
        check_number(self, "ddi_lr", lo=0, lo_open=True)
        return self


def check_convertible(model, config: DDIConfig, model_name: str) -> None:
    """Raise ValueError unless DDI can convert `model`: DDI's own conversion on a copy, with FLOPs
    as the unit (a latency table would be timed here for nothing)."""
    try:
        convert(model, config.replace(cost="flops"))
    except TypeError as exc:
        raise ValueError(f"DDI cannot convert model {model_name!r}: {exc}") from None


def train_ddi(recipe: DDIRecipe | None = None, config: DDIConfig | None = None, *, base_model=None, data=None,
              verbose: bool = True, **overrides) -> dict:
    """Run the recipe; returns {"net", "base", "history": {phase: [...]}, "checkpoint", "data"}.

    Args:
        recipe: the recipe's settings (default DDIRecipe()).
        config: the conversion (default DDIConfig()); its input_size is taken from the data.
        base_model: an nn.Module that skips phase 1 (as does recipe.base_checkpoint).
        data: (train_set, test_set), skips loading.
        overrides: fields of either, e.g. train_ddi(model="resnet20", cost="energy", target=40).

    Everything is checked before phase 1: the settings, the base checkpoint, and that DDI can
    convert the model. Phases write run folders under recipe.out_dir (phase1-float, phase2-ddi);
    the result goes to <out_dir>/ddi.pt with config and recipe.
    """
    recipe, config = split_overrides(recipe, config, overrides, DDIRecipe, DDIConfig, "train_ddi")
    # one process group for all phases under torchrun (see pyeff.train.distributed.process_group)
    with dist_util.process_group(recipe.device):
        return _train_ddi(recipe, config, base_model, data, verbose)


def _train_ddi(r: DDIRecipe, config: DDIConfig, base_model, data, verbose: bool) -> dict:
    from pyeff.ddi.costs import CostTable
    from pyeff.models import create_model
    from pyeff.train import load_data

    common = r.common()
    # routed training runs a block (and its channel gate) only on the samples its layer gate executes:
    # in a step where a rank's samples all skip a block, its weights get no gradient on that rank,
    # which DDP must be told
    ddi_cfg = r.train_config(epochs=r.ddi_epochs, lr=r.ddi_lr, out_dir=os.path.join(r.out_dir, "phase2-ddi"),
                             find_unused_parameters=config.train_mode == "routed")
    if data is None:
        data = load_data(r.train_config())
    train_set, test_set = data
    n_cls, in_ch = train_set.num_classes, train_set.images.shape[1]
    config = config.replace(input_size=tuple(train_set.images.shape[1:]))
    if base_model is None and r.base_checkpoint is not None:
        base_model = load_base(r.model, r.base_checkpoint, n_cls, in_ch)
    check_convertible(base_model if base_model is not None else create_model(r.model, num_classes=n_cls,
                                                                              in_channels=in_ch), config, r.model)
    history = {}
    base_model, h1 = float_phase(common, data, epochs=r.base_epochs, lr=r.lr, out_dir=r.out_dir,
                                 base_model=base_model, verbose=verbose)
    if h1 is not None:
        history["phase1"] = h1
    net = convert(base_model, config)
    if config.cost == "latency" and dist_util.is_active():
        # each rank timed its own table: train every rank against rank 0's, the one saved
        net.table = CostTable.from_dict(dist_util.broadcast_object(net.table.to_dict()))
    trainer = run_training(ddi_cfg, hooks=[DDIHook(r.target, r.beta, r.exit_weight)], model=net, data=data,
                           verbose=verbose, optimizer=sgd(net.parameters(), r.ddi_lr))
    history["phase2"] = trainer.history
    net = trainer.model.cpu()
    path = os.path.join(r.out_dir, "ddi.pt")
    if dist_util.env_info().is_main:
        save_ddi(net, path, model=r.model, dataset=r.dataset, num_classes=n_cls, in_channels=in_ch,
                 recipe=r.to_dict())
    dist_util.barrier()  # every rank returns the path of a written file
    return {"net": net, "base": base_model, "history": history, "checkpoint": path, "data": data,
            "recipe": r, "config": net.config}


def save_ddi(net: DDINet, path: str, **meta) -> None:
    """Write `net` (its DDIConfig as a dict, its cost table, tuned budget exits, weights) and `meta`
    (model, dataset, num_classes, in_channels: what load_ddi needs to rebuild the base; recipe)."""
    from pyeff.train import atomic_save

    atomic_save({"format": DDI_FORMAT, "config": net.config.to_dict(), "table": net.table.to_dict(),
                 "budget_exits": net.budget_exits, "state_dict": net.state_dict(), **meta}, path)


# the conversion's fields as checkpoints stored them before DDIConfig
_FLAT_KEYS = ("cost", "channel_gates", "layer_gates", "exits", "input_size", "channel_mode", "widths")


def load_ddi(path: str) -> tuple[DDINet, dict]:
    """(DDINet, metadata) from a file written by train_ddi / save_ddi; a damaged or foreign file
    is a CheckpointError (a ValueError) naming it. A latency table is the one measured where the
    net was trained; call `net.measure_costs("latency")` to re-time it here."""
    from pyeff.ddi.costs import CostTable
    from pyeff.models import create_model

    ckpt = read_checkpoint(path, what="pyeff DDI checkpoint", format=DDI_FORMAT,
                           required=("model", "num_classes", "in_channels", "state_dict", "table"),
                           advice="give a ddi.pt that pyeff ddi train wrote (<out>/ddi.pt)")
    if "config" in ckpt:
        config = DDIConfig.from_dict(ckpt["config"])
    else:
        config = DDIConfig(**{k: ckpt[k] for k in _FLAT_KEYS if k in ckpt})
    base = create_model(ckpt["model"], num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"])
    # a stored latency table replaces the one conversion would time: convert with FLOPs, then restore
    net = convert(base, config.replace(cost="flops") if config.cost == "latency" else config, copy_model=False)
    net.config = config
    net.load_state_dict(ckpt["state_dict"])
    net.table, net.cost_unit = CostTable.from_dict(ckpt["table"]), config.cost
    if ckpt.get("budget_exits"):
        net.budget_exits = {float(k): int(v) for k, v in ckpt["budget_exits"].items()}
    meta = {k: v for k, v in ckpt.items() if k not in ("state_dict", "table")}
    return net.eval(), meta
