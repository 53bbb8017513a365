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
from dataclasses import dataclass

from pyeff.dfs.config import DFSConfig
from pyeff.dfs.model import DFSNet, convert
from pyeff.dynamic.hook import CostHingeHook
from pyeff.train import distributed as dist_util
from pyeff.train import run_training
from pyeff.train.checkpoint import read_checkpoint
from pyeff.train.phases import (RecipeConfig, check_int, check_number, float_phase, load_base,  # noqa: F401
                                recipe_config, run_history, sgd, split_overrides)  # (re-exported)

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


@dataclass
class DFSRecipe(RecipeConfig):
    """The DFS recipe's settings (the conversion's are a DFSConfig); validated on construction, so
    a bad value fails before phase 1.

    target: target computation percentage (bit-product cost, 0-100).
    beta: weight of the cost term (the paper's 1e-5 belongs to its 64k-iteration schedule).
    gate_epochs: phase 2 epochs (gate only, network frozen, toward 100%; 0 skips the phase).
    dfs_epochs: phase 3 epochs (network and gate toward the target).
    gate_lr: phase 2 learning rate.
    dfs_lr: phase 3 learning rate.
    calibrate_batches: training batches that calibrate the activation ranges after conversion.
    """
    beta: float = DEFAULT_BETA
    out_dir: str = "runs/dfs"
    gate_epochs: int = 1
    dfs_epochs: int = 5
    gate_lr: float = 0.01
    dfs_lr: float = 0.02
    calibrate_batches: int = 4

    @classmethod
    def _what(cls) -> str:
        return "DFS recipe"

    def validate(self) -> "DFSRecipe":
        super().validate()
        check_int(self, "gate_epochs", lo=0)
        check_int(self, "dfs_epochs", lo=1)
        check_number(self, "gate_lr", lo=0, lo_open=True)
        check_number(self, "dfs_lr", lo=0, lo_open=True)
        check_int(self, "calibrate_batches", lo=1)
        return self


def check_convertible(model, config: DFSConfig, model_name: str) -> None:
    """Raise ValueError unless DFS can convert `model` (DFS's own conversion on a copy: no forward)."""
    try:
        convert(model, config)
    except TypeError as exc:
        raise ValueError(f"DFS cannot convert model {model_name!r}: {exc}") from None


def train_dfs(recipe: DFSRecipe | None = None, config: DFSConfig | None = None, *, base_model=None, data=None,
              verbose: bool = True, **overrides) -> dict:
    """Run the 3-phase recipe; returns {"net", "base", "history": {phase: [...]}, "checkpoint", "data"}.

    Args:
        recipe: the recipe's settings (default DFSRecipe()).
        config: the conversion (default DFSConfig()).
        base_model: an nn.Module that skips phase 1 (as does recipe.base_checkpoint).
        data: (train_set, test_set), skips loading.
        overrides: fields of either, e.g. train_dfs(model="resnet20", bits=(0, 8, 32), target=40).

    Everything is checked before phase 1: the settings, the base checkpoint, and that DFS can
    convert the model. Each phase writes its own run folder under recipe.out_dir (phase1-float,
    phase2-gate, phase3-dfs); the result goes to <out_dir>/dfs.pt with config and recipe.
    """
    recipe, config = split_overrides(recipe, config, overrides, DFSRecipe, DFSConfig, "train_dfs")
    # one process group for all phases under torchrun (see pyeff.train.distributed.process_group)
    with dist_util.process_group(recipe.device):
        return _train_dfs(recipe, config, base_model, data, verbose)


def _train_dfs(r: DFSRecipe, config: DFSConfig, base_model, data, verbose: bool) -> dict:
    from pyeff.models import create_model
    from pyeff.train import load_data

    common = r.common()
    gate_cfg = r.train_config(epochs=max(r.gate_epochs, 1), lr=r.gate_lr, schedule="constant",
                              out_dir=os.path.join(r.out_dir, "phase2-gate"))
    # routed training runs a block only on the samples its gate sends there: in a step where a rank's
    # samples all skip a block, that block's weights get no gradient on that rank, which DDP must be
    # told (phase 2 needs no such care: the frozen network holds no trainable weights, and the gate
    # runs on every sample)
    dfs_cfg = r.train_config(epochs=r.dfs_epochs, lr=r.dfs_lr, out_dir=os.path.join(r.out_dir, "phase3-dfs"),
                             find_unused_parameters=config.train_mode == "routed")
    if data is None:
        data = load_data(r.train_config())
    train_set, test_set = data
    n_cls, in_ch = train_set.num_classes, train_set.images.shape[1]
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
    # phase 2: the frozen float network; only the gate learns, toward full execution
    net.calibrate(calibration_batches(train_set, r.batch_size, r.calibrate_batches, r.seed))
    if r.gate_epochs:
        net.freeze_base = True
        for p in net.base_parameters():
            p.requires_grad_(False)
        history["phase2"] = run_training(gate_cfg, hooks=[DFSHook(100.0, GATE_PHASE_BETA)], model=net,
                                         data=data, verbose=verbose,
                                         optimizer=sgd(net.gate_parameters(), r.gate_lr)).history
        net.freeze_base = False
        for p in net.base_parameters():
            p.requires_grad_(True)
    # phase 3: network and gate toward the target
    trainer = run_training(dfs_cfg, hooks=[DFSHook(r.target, r.beta)], model=net, data=data, verbose=verbose,
                           optimizer=sgd(net.parameters(), r.dfs_lr))
    history["phase3"] = trainer.history
    net = trainer.model
    path = os.path.join(r.out_dir, "dfs.pt")
    if dist_util.env_info().is_main:
        save_dfs(net, path, model=r.model, dataset=r.dataset, num_classes=n_cls, in_channels=in_ch,
                 recipe=r.to_dict())
    dist_util.barrier()  # every rank returns the path of a written file
    return {"net": net, "base": base_model, "history": history, "checkpoint": path, "data": data,
            "recipe": r, "config": net.config}


def calibration_batches(dataset, batch_size: int, batches: int, seed: int = 0):
    """A few normalised, unaugmented training batches (what `DFSNet.calibrate` reads)."""
    from pyeff.data import BatchLoader

    sub = dataset.subset(min(len(dataset), batch_size * batches), seed=seed)
    return BatchLoader(sub, batch_size, shuffle=False, augment=False)


def save_dfs(net: DFSNet, path: str, **meta) -> None:
    """Write `net` (its DFSConfig as a dict, its weights) and `meta` (model, dataset, num_classes,
    in_channels: what load_dfs needs to rebuild the base; recipe: the recipe's fields)."""
    from pyeff.train import atomic_save

    atomic_save({"format": DFS_FORMAT, "config": net.config.to_dict(), "state_dict": net.state_dict(), **meta},
                path)


def load_dfs(path: str) -> tuple[DFSNet, dict]:
    """(DFSNet, metadata) from a file written by train_dfs / save_dfs; a damaged or foreign file
    is a CheckpointError (a ValueError) naming it."""
    from pyeff.models import create_model

    ckpt = read_checkpoint(path, what="pyeff DFS checkpoint", format=DFS_FORMAT,
                           required=("model", "num_classes", "in_channels", "state_dict"),
                           advice="give a dfs.pt that pyeff dfs train wrote (<out>/dfs.pt)")
    if "config" in ckpt:
        config = DFSConfig.from_dict(ckpt["config"])
    else:  # written before DFSConfig: the conversion's fields were stored flat
        config = DFSConfig(bits=tuple(ckpt["bits"]), train_mode=ckpt.get("train_mode", "all"))
    base = create_model(ckpt["model"], num_classes=ckpt["num_classes"], in_channels=ckpt["in_channels"])
    net = convert(base, config, copy_model=False)
    net.load_state_dict(ckpt["state_dict"])
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return net.eval(), meta
