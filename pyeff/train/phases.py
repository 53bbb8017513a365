"""Pieces that multi-phase method recipes (DFS, DDI, ...) share: `RecipeConfig`, the settings
every recipe has (validated before any work); phase 1, the float network, trained here or loaded
from a pyeff checkpoint; the history of a finished phase; SGD as the papers set it; and the data of
a recipe (loaded once, shared by its phases)."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch

from pyeff.config import Config
from pyeff.train.checkpoint import CheckpointError, read_checkpoint
from pyeff.train.config import TrainConfig


@dataclass
class RecipeConfig(Config):
    """The settings every method recipe shares; a method subclasses it with its phases' own.

    model: zoo model to start from (phase 1 trains it, unless base_checkpoint is given).
    dataset: dataset name (shapes is embedded, no download).
    data_dir: directory of on-disk datasets (cifar10, cifar100).
    target: the cost to reach, percent of the dense network (0-100).
    beta: weight of the cost hinge in the loss.
    base_checkpoint: a pyeff checkpoint of the model (checkpoint.pt or best.pt of pyeff train):
        skips phase 1.
    base_epochs: phase 1 epochs (the float network).
    lr: phase 1 learning rate.
    batch_size: batch size of every phase.
    train_subset: train on this many images (class-balanced, seeded).
    test_subset: evaluate on this many images.
    seed: random seed.
    device: auto, cpu, cuda or cuda:N.
    threads: torch CPU threads.
    out_dir: output folder (a run folder per phase, and the result).
    """
    model: str = "resnet38"
    dataset: str = "shapes"
    data_dir: Optional[str] = None
    target: float = 25.0
    beta: float = 1.0
    base_checkpoint: Optional[str] = None
    base_epochs: int = 10
    lr: float = 0.1
    batch_size: int = 128
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    out_dir: str = "runs/recipe"

    cli_default_text = {"data_dir": "the dataset's own", "train_subset": "all", "test_subset": "all",
                        "threads": "torch's choice"}

    @classmethod
    def _what(cls) -> str:
        return cls.__name__

    def validate(self) -> "RecipeConfig":
        # the fields a TrainConfig shares are checked by it (model and dataset names included)
        try:
            self.train_config(epochs=max(1, self.base_epochs) if _is_int(self.base_epochs) else self.base_epochs,
                              lr=self.lr)
        except ValueError as exc:
            raise ValueError(str(exc).replace("invalid training config", f"invalid {self._what()}", 1)) from None
        check_number(self, "target", lo=0, hi=100)
        check_number(self, "beta", lo=0)
        check_int(self, "base_epochs", lo=0 if self.base_checkpoint else 1,
                  hint="" if self.base_checkpoint else " (or give base_checkpoint)")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"invalid {self._what()}: out_dir must be a folder name, got {self.out_dir!r}")
        if self.base_checkpoint is not None and not isinstance(self.base_checkpoint, str):
            raise ValueError(f"invalid {self._what()}: base_checkpoint must be a path, got {self.base_checkpoint!r}")
        return self

    def common(self) -> dict:
        """The TrainConfig fields every phase shares (see `recipe_config`)."""
        return recipe_config(model=self.model, dataset=self.dataset, data_dir=self.data_dir,
                             batch_size=self.batch_size, seed=self.seed, train_subset=self.train_subset,
                             test_subset=self.test_subset, device=self.device, threads=self.threads)

    def train_config(self, **values) -> TrainConfig:
        """A phase's TrainConfig: `common()` plus `values` (epochs, lr, out_dir, ...)."""
        return TrainConfig(**self.common(), **values)


def split_overrides(recipe, config, overrides: dict, recipe_cls, config_cls, fn: str):
    """(recipe, config), defaults where None, with `overrides` applied to whichever of the two has the
    field (a recipe dataclass and a conversion config share no field names)."""
    recipe = recipe if recipe is not None else recipe_cls()
    config = config if config is not None else config_cls()
    if not isinstance(recipe, recipe_cls):
        raise TypeError(f"{fn}: recipe must be a {recipe_cls.__name__}, got {type(recipe).__name__}")
    if not isinstance(config, config_cls):
        raise TypeError(f"{fn}: config must be a {config_cls.__name__}, got {type(config).__name__}")
    r_names = {f.name for f in fields(recipe_cls)}
    c_names = {f.name for f in fields(config_cls)}
    unknown = sorted(set(overrides) - r_names - c_names)
    if unknown:
        raise TypeError(f"{fn}: no setting {', '.join(unknown)} in {recipe_cls.__name__} or {config_cls.__name__}")
    r = {k: v for k, v in overrides.items() if k in r_names}
    c = {k: v for k, v in overrides.items() if k in c_names}
    return (recipe.replace(**r) if r else recipe), (config.replace(**c) if c else config)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(cfg: Config, name: str, lo: int, hint: str = "") -> None:
    """Raise ValueError unless cfg.<name> is an integer >= lo."""
    v = getattr(cfg, name)
    if not _is_int(v) or v < lo:
        raise ValueError(f"invalid {cfg._what()}: {name} must be an integer >= {lo}{hint}, got {v!r}")


def check_number(cfg: Config, name: str, lo=None, hi=None, lo_open: bool = False) -> None:
    """Raise ValueError unless cfg.<name> is a finite number in [lo, hi] ((lo, hi] with lo_open)."""
    v = getattr(cfg, name)
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v <= hi
    if not ok:
        where = {(True, True): f"in {'(' if lo_open else '['}{lo}, {hi}]",
                 (True, False): f"{'>' if lo_open else '>='} {lo}", (False, True): f"<= {hi}",
                 (False, False): "finite"}[(lo is not None, hi is not None)]
        raise ValueError(f"invalid {cfg._what()}: {name} must be a number {where}, got {v!r}")


def recipe_config(**kw) -> dict:
    """The TrainConfig fields every phase of a recipe shares (SGD momentum 0.9, weight decay 1e-4,
    run folders overwritten)."""
    return dict(overwrite=True, momentum=0.9, weight_decay=1e-4, **kw)


def load_subsets(common: dict):
    """(train_set, test_set) of a recipe config, cut to its train_subset / test_subset (seeded, the
    same subsets the Trainer uses), so a recipe's own evaluations see the data its phases train on."""
    from pyeff.train.build import load_data

    train_set, test_set = load_data(TrainConfig(**common))
    seed = common.get("seed", 0)
    if common.get("train_subset") and common["train_subset"] < len(train_set):
        train_set = train_set.subset(common["train_subset"], seed=seed)
    if common.get("test_subset") and common["test_subset"] < len(test_set):
        test_set = test_set.subset(common["test_subset"], seed=seed)
    return train_set, test_set


def sgd(params, lr: float) -> torch.optim.SGD:
    """SGD (momentum 0.9, weight decay 1e-4) over the parameters that require a gradient."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-4)


def load_base(model_name: str, path: str, num_classes: int, in_channels: int):
    """A zoo model with the weights of a pyeff training checkpoint (checkpoint.pt or best.pt, or a
    bare state_dict); a file that is damaged or holds another network is a CheckpointError."""
    from pyeff.models import create_model

    advice = f"give --base-checkpoint a checkpoint.pt or best.pt that pyeff train wrote for {model_name}"
    ckpt = read_checkpoint(path, what="base checkpoint", advice=advice)
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no model weights; {advice}")
    model = create_model(model_name, num_classes=num_classes, in_channels=in_channels)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {path} do not fit {model_name} with {num_classes} classes and "
                              f"{in_channels} input channels ({str(exc).splitlines()[0]}); {advice}") from None
    return model


def run_history(cfg: TrainConfig) -> list:
    """The per-epoch metrics a finished run wrote to <out_dir>/metrics.jsonl ([] if none)."""
    from pyeff.train.metrics import read_jsonl

    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def float_phase(common: dict, data, *, epochs: int, lr: float, out_dir: str, base_model=None,
                base_checkpoint=None, verbose: bool = True, cache: bool = True):
    """Phase 1 of a recipe: `base_model` as given, else loaded from `base_checkpoint`, else taken from
    the float-baseline cache (pyeff.train.baseline_cache, when `cache`), else trained (`epochs` at
    `lr`, run folder <out_dir>/phase1-float) and cached. Returns (model on the CPU, history or None
    when nothing was trained or cached)."""
    from pyeff.models import create_model
    from pyeff.train import baseline_cache
    from pyeff.train import distributed as dist_util
    from pyeff.train.build import run_training

    train_set = data[0]
    n_cls, in_ch = train_set.num_classes, train_set.images.shape[1]
    if base_model is None and base_checkpoint is not None:
        base_model = load_base(common["model"], base_checkpoint, n_cls, in_ch)
    history = None
    if base_model is None:
        cfg = TrainConfig(epochs=epochs, lr=lr, out_dir=os.path.join(out_dir, "phase1-float"), **common)
        hit = baseline_cache.load(cfg, data, lambda: create_model(cfg.model, num_classes=n_cls, in_channels=in_ch)) \
            if cache else None
        if hit is not None:
            base_model, history = hit
            if verbose:
                print(f"phase 1: the float {cfg.model} from the baseline cache "
                      f"({baseline_cache.entry_path(cfg, data)})", flush=True)
        else:
            trainer = run_training(cfg, data=data, verbose=verbose)
            # the trainer's own history: under DDP, metrics.jsonl is rank 0's file, not yet written
            # when another rank gets here
            base_model, history = trainer.model, trainer.history
            if cache and dist_util.env_info().is_main:
                baseline_cache.store(cfg, data, _unwrapped(base_model), history)
    return base_model.cpu(), history


def _unwrapped(model):
    return getattr(model, "module", model)
