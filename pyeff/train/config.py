"""Training configuration: one dataclass on pyeff's Config base, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from pyeff.config import Config

SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")

# Fields that define *what* is trained; a checkpoint made with other values cannot be resumed
# to the same result. Everything else (paths, device, threads, progress bars) may change.
RUN_DEFINING_FIELDS = (
    "model", "dataset", "image_size", "epochs", "batch_size", "lr", "momentum", "nesterov",
    "weight_decay", "schedule", "milestones", "gamma", "warmup", "seed", "train_subset",
    "test_subset", "label_smoothing", "augment", "grad_clip",
)


@dataclass
class TrainConfig(Config):
    """Everything the shared loop needs to know. Defaults suit ResNet-20 on the `shapes` set.

    `epochs` is the *final* number of epochs: the learning-rate schedule is laid out over it, so a
    run interrupted at epoch k and resumed with the same config ends exactly where an
    uninterrupted run does.

    model: model name from the zoo (`pyeff.models.list_models()`, `torchvision.<name>`); a module
        you pass to the Trainer yourself needs a name registered with `pyeff.models.register_model`.
    dataset: dataset name (`pyeff.data.list_datasets()`; shapes is embedded, no download).
    data_dir: directory of on-disk datasets (cifar10, cifar100).
    image_size: resize the dataset's images to this size.
    epochs: total epochs; the LR schedule spans them.
    batch_size: global batch size, split over DDP ranks.
    lr: peak learning rate of SGD.
    momentum: SGD momentum.
    nesterov: Nesterov momentum.
    weight_decay: weight decay.
    schedule: LR schedule (cosine, step or constant), stepped every batch.
    milestones: epochs where the step schedule multiplies the LR by gamma, comma-separated.
    gamma: step-schedule factor.
    warmup: epochs of linear warm-up.
    seed: random seed (model init, data order, augmentation, subsets).
    out_dir: output directory.
    resume: continue from <out>/checkpoint.pt if it exists.
    overwrite: start fresh even if <out> already holds a checkpoint.
    train_subset: train on this many images (class-balanced, seeded).
    test_subset: evaluate on this many images (class-balanced, seeded).
    augment: the dataset's standard crop/flip augmentation.
    label_smoothing: label smoothing of the training loss.
    grad_clip: max gradient norm, 0 = off.
    device: auto, cpu, cuda or cuda:N.
    threads: torch CPU threads.
    progress: progress bars.
    save_best: also keep best.pt, the weights of the epoch with the best test accuracy.
    find_unused_parameters: DDP option, for models that skip blocks.
    """

    model: str = "resnet20"
    dataset: str = "shapes"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None        # None: the dataset's native size
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: Tuple[int, ...] = ()        # empty: at 50% and 75% of the epochs
    gamma: float = 0.1
    warmup: int = 0
    seed: int = 0
    out_dir: Optional[str] = None           # None: runs/<model>-<dataset>-<timestamp>
    resume: bool = False
    overwrite: bool = False
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    augment: bool = True
    label_smoothing: float = 0.0
    grad_clip: float = 0.0                  # 0 disables
    device: str = "auto"
    threads: Optional[int] = None           # None leaves torch's setting alone
    progress: Optional[bool] = None         # None: only when stderr is a TTY
    save_best: bool = True
    find_unused_parameters: bool = False

    @classmethod
    def _what(cls) -> str:
        return "training config"

    def validate(self) -> "TrainConfig":
        def bad(msg):
            raise ValueError(f"invalid training config: {msg}")

        try:
            self.milestones = tuple(int(m) for m in (self.milestones or ()))
        except (TypeError, ValueError):
            bad(f"milestones must be epochs (integers), got {self.milestones!r}")
        if not isinstance(self.model, str) or not self.model:
            bad("model must be a non-empty name such as 'resnet20'")
        if not isinstance(self.dataset, str) or not self.dataset:
            bad("dataset must be a non-empty name such as 'shapes'")
        _check_names(self.model, self.dataset, bad)
        if int(self.epochs) != self.epochs or self.epochs <= 0:
            bad(f"epochs must be a positive integer, got {self.epochs!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size <= 0:
            bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not self.lr > 0:
            bad(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            bad(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if any(m <= 0 or m > self.epochs for m in self.milestones):
            bad(f"milestones must lie in 1..epochs={self.epochs}, got {list(self.milestones)}")
        if list(self.milestones) != sorted(self.milestones):
            bad(f"milestones must be increasing, got {list(self.milestones)}")
        if not 0 < self.gamma <= 1:
            bad(f"gamma must be in (0, 1], got {self.gamma!r}")
        if self.warmup < 0 or self.warmup >= self.epochs:
            bad(f"warmup must be in 0..epochs-1={self.epochs - 1}, got {self.warmup!r}")
        for name in ("train_subset", "test_subset", "image_size", "threads"):
            v = getattr(self, name)
            if v is not None and (int(v) != v or v <= 0):
                bad(f"{name} must be a positive integer or None, got {v!r}")
        if not 0 <= self.label_smoothing < 1:
            bad(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.grad_clip < 0:
            bad(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            bad(f"unknown device {self.device!r}; choose auto, cpu, cuda or cuda:N")
        return self

    def effective_milestones(self) -> Tuple[int, ...]:
        if self.milestones:
            return self.milestones
        return tuple(sorted({max(1, self.epochs // 2), max(1, (3 * self.epochs) // 4)}))

    def differences(self, other: dict) -> list:
        """Run-defining fields where `other` (a saved config dict) differs from this config."""
        mine = self.to_dict()
        out = []
        for k in RUN_DEFINING_FIELDS:
            a, b = mine.get(k), other.get(k)
            if isinstance(b, tuple):
                b = list(b)
            if a != b:
                out.append(f"{k}: checkpoint has {b!r}, this run has {a!r}")
        return out


def _check_names(model: str, dataset: str, bad) -> None:
    # imported here: pyeff.models and pyeff.data import torch's model and data code, which a
    # process that only reads configs (pyeff --help) need not pay for; neither imports pyeff.train
    from pyeff.data import list_datasets
    from pyeff.models import is_model, list_models

    if not is_model(model):
        bad(f"unknown model {model!r}; known models: {', '.join(list_models())} (and torchvision.<name>; "
            "a model of your own needs a name registered with pyeff.models.register_model)")
    if dataset not in list_datasets():
        bad(f"unknown dataset {dataset!r}; known datasets: {', '.join(list_datasets())}")
