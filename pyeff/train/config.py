"""Training configuration: one dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

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
class TrainConfig:
    """Everything the shared loop needs to know. Defaults suit ResNet-20 on the `shapes` set.

    `epochs` is the *final* number of epochs: the learning-rate schedule is laid out over it, so a
    run interrupted at epoch k and resumed with the same config ends exactly where an
    uninterrupted run does.
    """

    model: str = "resnet20"
    dataset: str = "shapes"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None        # resize the dataset's images (None: native size)
    epochs: int = 10
    batch_size: int = 128                   # global batch; each of N ranks gets batch_size // N
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"                # cosine | step | constant, stepped every batch
    milestones: Tuple[int, ...] = ()        # epochs where "step" multiplies lr by gamma
    gamma: float = 0.1                      # (empty: at 50% and 75% of the epochs)
    warmup: int = 0                         # epochs of linear warm-up from lr/warmup_steps
    seed: int = 0
    out_dir: Optional[str] = None           # None: runs/<model>-<dataset>-<timestamp>
    resume: bool = False                    # continue from out_dir/checkpoint.pt if it exists
    overwrite: bool = False                 # allow starting fresh over an existing checkpoint
    train_subset: Optional[int] = None      # use this many training images (quick runs)
    test_subset: Optional[int] = None
    augment: bool = True                    # the dataset's standard augmentation (crop/flip)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0                  # max gradient norm; 0 disables
    device: str = "auto"                    # auto | cpu | cuda
    threads: Optional[int] = None           # torch.set_num_threads; None leaves it alone
    progress: Optional[bool] = None         # tqdm bars; None: only when stderr is a TTY
    save_best: bool = True                  # also keep best.pt (weights of the best test acc)
    find_unused_parameters: bool = False    # DDP option, for models that skip blocks

    def __post_init__(self):
        self.milestones = tuple(int(m) for m in (self.milestones or ()))
        self.validate()

    def validate(self) -> "TrainConfig":
        def bad(msg):
            raise ValueError(f"invalid training config: {msg}")

        if not isinstance(self.model, str) or not self.model:
            bad("model must be a non-empty name such as 'resnet20'")
        if not isinstance(self.dataset, str) or not self.dataset:
            bad("dataset must be a non-empty name such as 'shapes'")
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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

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
