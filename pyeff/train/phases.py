"""Pieces that multi-phase method recipes (DFS, DDI, ...) share: phase 1, the float network,
trained here or loaded from a pyeff checkpoint; the history of a finished phase; SGD as the papers
set it; and the data of a recipe (loaded once, shared by its phases)."""
from __future__ import annotations

import os

import torch

from pyeff.train.config import TrainConfig


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
    """A zoo model with the weights of a pyeff training checkpoint (checkpoint.pt or best.pt)."""
    from pyeff.models import create_model

    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} (pyeff train writes <out>/checkpoint.pt and best.pt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    model = create_model(model_name, num_classes=num_classes, in_channels=in_channels)
    model.load_state_dict(state)
    return model


def run_history(cfg: TrainConfig) -> list:
    """The per-epoch metrics a finished run wrote to <out_dir>/metrics.jsonl ([] if none)."""
    from pyeff.train.metrics import read_jsonl

    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


def float_phase(common: dict, data, *, epochs: int, lr: float, out_dir: str, base_model=None,
                base_checkpoint=None, verbose: bool = True):
    """Phase 1 of a recipe: `base_model` as given, else loaded from `base_checkpoint`, else trained
    (`epochs` at `lr`, run folder <out_dir>/phase1-float). Returns (model on the CPU, history or
    None when nothing was trained)."""
    from pyeff.train.build import run_training

    train_set = data[0]
    if base_model is None and base_checkpoint is not None:
        base_model = load_base(common["model"], base_checkpoint, train_set.num_classes, train_set.images.shape[1])
    history = None
    if base_model is None:
        cfg = TrainConfig(epochs=epochs, lr=lr, out_dir=os.path.join(out_dir, "phase1-float"), **common)
        base_model = run_training(cfg, data=data, verbose=verbose).model
        history = run_history(cfg)
    return base_model.cpu(), history
