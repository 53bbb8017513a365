"""The DFS training recipe (paper section 3.3) on pyeff's shared training loop, via a hook.

    (1) train the float ResNet (or load it);
    (2) convert, freeze the network (BN statistics included), train only the gate toward full
        execution (target 100%, SGD lr 0.01);
    (3) train network and gate together toward the chosen target.
Loss: CE + beta * cost * r with r = +1 when the batch's computation percentage is above the target
and -1 at or under it (`pyeff.dynamic.hinge_cost_loss`). SGD, momentum 0.9, weight decay 1e-4.

beta: the paper's 1e-5 belongs to its 64k-iteration CIFAR schedule (and its cost units); in runs of
a few hundred steps it barely moves the gate. With pyeff's cost (a fraction in [0, 1], mean over
gated blocks) a beta of about 0.5-2 reaches the target within a few hundred steps on `shapes`
(see docs/dfs.md for what was measured); `DEFAULT_BETA` below is the small-scale default, and
`PAPER_BETA` is exposed.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from pyeff.dfs.model import PAPER_BITS, DFSNet, convert
from pyeff.dynamic.hook import CostHingeHook
from pyeff.train import TrainConfig, run_training
from pyeff.train.phases import float_phase, load_base, recipe_config, run_history, sgd  # noqa: F401 (re-exported)

PAPER_BETA = 1e-5
DEFAULT_BETA = 5.0
# phase 2 pushes toward 100%, which every batch is at or under: with a small-scale beta the hinge
# keeps pushing and saturates the softmax (p_full -> 1, so p(1-p) leaves phase 3 no gradient:
# measured, the gate then stayed at 100% through phase 3). Phase 2 keeps the paper's beta.
GATE_PHASE_BETA = PAPER_BETA
DFS_FORMAT = "pyeff-dfs"


class DFSHook(CostHingeHook):
    """Adds beta * cost * sign(cost% - target) to the loss and logs the computation percentage of
    training (`train_computation_pct`) and evaluation (`computation_pct`) batches: the shared
    `pyeff.dynamic.hook.CostHingeHook` with DFS's default beta.

    Args:
        target: computation percentage to reach (0-100).
        beta: weight of the cost term.
    """

    def __init__(self, target: float, beta: float = DEFAULT_BETA):
        super().__init__(target, beta)


def train_dfs(model: str = "resnet38", dataset: str = "shapes", *, bits: Sequence[int] = PAPER_BITS,
              target: float = 25.0, beta: float = DEFAULT_BETA, train_mode: str = "all",
              base_epochs: int = 10, gate_epochs: int = 1, dfs_epochs: int = 5, lr: float = 0.1,
              gate_lr: float = 0.01, dfs_lr: float = 0.02, batch_size: int = 128,
              train_subset=None, test_subset=None, data_dir=None, seed: int = 0, device: str = "auto",
              out_dir: str = "runs/dfs", base_model=None, base_checkpoint=None, data=None,
              calibrate_batches: int = 4, verbose: bool = True, threads=None) -> dict:
    """Run the 3-phase recipe; returns {"net", "base", "history": {phase: [...]}, "checkpoint"}.

    `base_model` (an nn.Module) or `base_checkpoint` (a pyeff checkpoint of `model`) skips phase 1.
    `data` = (train_set, test_set) skips loading. Each phase writes its own run folder under
    `out_dir` (phase1-float, phase2-gate, phase3-dfs); the result is saved to out_dir/dfs.pt.
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

    net = convert(base_model, bits=bits, train_mode=train_mode)
    # phase 2: the frozen float network; only the gate learns, toward full execution
    net.calibrate(calibration_batches(train_set, batch_size, calibrate_batches, seed))
    if gate_epochs:
        net.freeze_base = True
        for p in net.base_parameters():
            p.requires_grad_(False)
        cfg = TrainConfig(epochs=gate_epochs, lr=gate_lr, schedule="constant",
                          out_dir=os.path.join(out_dir, "phase2-gate"), **common)
        run_training(cfg, hooks=[DFSHook(100.0, GATE_PHASE_BETA)], model=net, data=data, verbose=verbose,
                     optimizer=sgd(net.gate_parameters(), gate_lr))
        history["phase2"] = run_history(cfg)
        net.freeze_base = False
        for p in net.base_parameters():
            p.requires_grad_(True)
    # phase 3: network and gate toward the target
    cfg = TrainConfig(epochs=dfs_epochs, lr=dfs_lr, out_dir=os.path.join(out_dir, "phase3-dfs"), **common)
    trainer = run_training(cfg, hooks=[DFSHook(target, beta)], model=net, data=data, verbose=verbose,
                           optimizer=sgd(net.parameters(), dfs_lr))
    history["phase3"] = trainer.history
    net = trainer.model
    path = os.path.join(out_dir, "dfs.pt")
    save_dfs(net, path, model=model, dataset=dataset, num_classes=train_set.num_classes,
             in_channels=train_set.images.shape[1], target=target, beta=beta)
    return {"net": net, "base": base_model, "history": history, "checkpoint": path, "data": data}


def calibration_batches(dataset, batch_size: int, batches: int, seed: int = 0):
    """A few normalised, unaugmented training batches (what `DFSNet.calibrate` reads)."""
    from pyeff.data import BatchLoader

    sub = dataset.subset(min(len(dataset), batch_size * batches), seed=seed)
    return BatchLoader(sub, batch_size, shuffle=False, augment=False)


def save_dfs(net: DFSNet, path: str, **meta) -> None:
    from pyeff.train import atomic_save

    atomic_save({"format": DFS_FORMAT, "bits": list(net.bits), "train_mode": net.train_mode,
                 "state_dict": net.state_dict(), **meta}, path)


def load_dfs(path: str) -> tuple[DFSNet, dict]:
    """(DFSNet, metadata) from a file written by train_dfs / save_dfs."""
    from pyeff.models import create_model

    if not os.path.exists(path):
        raise FileNotFoundError(f"no DFS checkpoint at {path} (pyeff dfs train writes <out>/dfs.pt)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != DFS_FORMAT:
        raise ValueError(f"{path} is not a pyeff DFS checkpoint (pyeff dfs train writes <out>/dfs.pt)")
    base = create_model(ckpt["model"], num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"])
    net = convert(base, bits=ckpt["bits"], train_mode=ckpt.get("train_mode", "all"), copy_model=False)
    net.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return net.eval(), meta
