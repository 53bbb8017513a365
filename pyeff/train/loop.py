"""The shared training loop (`Trainer`): seeded, resumable bit for bit, DDP-aware, hookable."""
from __future__ import annotations

import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from pyeff.train import distributed as dist_util
from pyeff.train.checkpoint import (CheckpointError, atomic_save, load_checkpoint, rng_state,
                                    seed_everything, set_rng_state, FORMAT, VERSION)
from pyeff.train.config import TrainConfig
from pyeff.train.hooks import Hook, split_outputs
from pyeff.train.metrics import plot_curves, write_metrics

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


class LRSchedule:
    """Learning-rate factor per global batch index, laid out over the *final* epoch count.

    A plain object (not a closure) so LambdaLR can save it; stepping per batch keeps warm-up and
    cosine smooth and makes the factor a pure function of the step, hence resumable exactly.
    """

    def __init__(self, schedule: str, epochs: int, steps_per_epoch: int, warmup: int = 0,
                 milestones=(), gamma: float = 0.1):
        self.schedule = schedule
        self.total = epochs * steps_per_epoch
        self.warm = warmup * steps_per_epoch
        self.milestone_steps = [m * steps_per_epoch for m in milestones]
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        if step < self.warm:
            return (step + 1) / self.warm
        if self.schedule == "cosine":
            t = min(1.0, (step - self.warm) / max(1, self.total - self.warm))
            return 0.5 * (1.0 + math.cos(math.pi * t))
        if self.schedule == "step":
            return self.gamma ** sum(step >= m for m in self.milestone_steps)
        return 1.0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def default_out_dir(config: TrainConfig) -> str:
    return os.path.join("runs", f"{config.model}-{config.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def _loader_len(loader, n: int, batch_size: int) -> int:
    try:
        return len(loader)
    except TypeError:
        return math.ceil(n / batch_size)


class Trainer:
    """Train `model` on `train_set`, evaluate on `test_set`, per `config`.

    Args:
        model: an nn.Module returning logits, `(logits, aux)` or a dict with "logits".
        config: a TrainConfig. `train_subset`/`test_subset` are applied here (class-balanced,
            seeded); `batch_size` is global (each of N DDP ranks gets batch_size // N).
        train_set, test_set: pyeff.data.ImageDataset-like (images, labels, subset(), ...).
        hooks: Hook instances, called in order (see pyeff.train.hooks).
        optimizer: default SGD(lr, momentum, weight_decay, nesterov) over all parameters.
        criterion: default cross-entropy with config.label_smoothing. Test loss is always plain
            cross-entropy, so it is comparable across recipes.
        verbose: print one line per epoch on rank 0.

    Attributes hooks may use: model (unwrapped), train_model (DDP-wrapped or model), optimizer,
    scheduler, config, device, epoch (1-based), global_step, history, out_dir, rank, world_size,
    is_main, train_loader, test_loader, train_set, test_set.
    """

    def __init__(self, model, config: TrainConfig, train_set, test_set, hooks=(), optimizer=None,
                 criterion=None, verbose: bool = True):
        from pyeff.data import BatchLoader

        self.config = config.validate()
        self.hooks = list(hooks)
        for h in self.hooks:
            if not isinstance(h, Hook):
                raise TypeError(f"hooks must be pyeff.train.Hook instances, got {type(h).__name__}")
        self.verbose = verbose
        if config.threads:
            torch.set_num_threads(config.threads)

        info = dist_util.env_info()
        self.device = resolve_device(config.device, info.local_rank)
        self.dist, self._started_dist = dist_util.setup(self.device.type)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        if config.batch_size % self.world_size:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                             f"{self.world_size} processes")
        self.per_rank_batch = config.batch_size // self.world_size

        out_dir = config.out_dir or default_out_dir(config)
        self.out_dir = dist_util.gather_objects(out_dir)[0]  # rank 0's timestamp wins
        if self.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        self.checkpoint_path = os.path.join(self.out_dir, CHECKPOINT)

        if config.train_subset and config.train_subset < len(train_set):
            train_set = train_set.subset(config.train_subset, seed=config.seed)
        if config.test_subset and config.test_subset < len(test_set):
            test_set = test_set.subset(config.test_subset, seed=config.seed)
        self.train_set, self.test_set = train_set, test_set
        common = dict(rank=self.rank, world_size=self.world_size, device=self.device)
        self.train_loader = BatchLoader(train_set, self.per_rank_batch, shuffle=True,
                                        augment=config.augment, seed=config.seed, **common)
        self.test_loader = BatchLoader(test_set, self.per_rank_batch, shuffle=False,
                                       augment=False, seed=config.seed, **common)
        self.steps_per_epoch = _loader_len(self.train_loader, len(train_set), config.batch_size)

        self.model = model.to(self.device)
        self.train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DDP(self.model, device_ids=ids,
                                   find_unused_parameters=config.find_unused_parameters)
        self.optimizer = optimizer or torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay, nesterov=config.nesterov)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRSchedule(
            config.schedule, config.epochs, self.steps_per_epoch, config.warmup,
            config.effective_milestones(), config.gamma))
        self.criterion = criterion or torch.nn.CrossEntropyLoss(
            label_smoothing=config.label_smoothing)

        self.epoch = 0
        self.global_step = 0
        self.history: list[dict] = []
        self.best_acc = -1.0
        self.resumed_from = None
        self.stop_reason = None
        progress = config.progress
        if progress is None:
            progress = sys.stderr.isatty()
        self.show_progress = bool(progress) and self.is_main

    # -- helpers for hooks ------------------------------------------------------------------
    def all_reduce_sum(self, values) -> list:
        """Sum a list of numbers over all ranks (identity on one process)."""
        return dist_util.all_reduce_sum(values, self.device)

    def request_stop(self, reason: str) -> None:
        """End training after the current epoch (its checkpoint and metrics are still written), e.g.
        when an early-bird ticket is drawn. Every rank runs the hooks, so every rank asks alike."""
        self.stop_reason = reason

    def log(self, msg: str) -> None:
        if self.verbose and self.is_main:
            print(msg, flush=True)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        rngs = dist_util.gather_objects(rng_state())  # collective: every rank calls it
        return {
            "format": FORMAT, "version": VERSION,
            "epoch": self.epoch, "global_step": self.global_step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs, "world_size": self.world_size,
            "history": self.history, "best_acc": self.best_acc,
            "config": self.config.to_dict(),
            "hooks": [{"type": type(h).__name__, "state": h.state_dict()} for h in self.hooks],
        }

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        if self.is_main:
            atomic_save(state, self.checkpoint_path)
        dist_util.barrier()

    @staticmethod
    def _hook_key(name, before) -> str:
        """'Name' or 'Name#2' for the second hook of that type: how hook states are matched."""
        n = sum(1 for b in before if (b["type"] if isinstance(b, dict) else type(b).__name__)
                == name)
        return name if n == 0 else f"{name}#{n + 1}"

    def load_state(self, ckpt: dict, path: str) -> None:
        diffs = self.config.differences(ckpt["config"])
        if diffs:
            raise CheckpointError(
                f"cannot resume from {path}: it was made with different settings ("
                + "; ".join(diffs) + "). Use the same settings, or another output directory "
                "to start a new run.")
        saved = {}
        for i, s in enumerate(ckpt.get("hooks", [])):
            saved[self._hook_key(s["type"], ckpt["hooks"][:i])] = s["state"]
        keys = [self._hook_key(type(h).__name__, self.hooks[:i]) for i, h in enumerate(self.hooks)]
        orphans = [k for k, st in saved.items() if st and k not in keys]
        if orphans:
            raise CheckpointError(
                f"cannot resume from {path}: it holds the state of hook(s) "
                f"{', '.join(orphans)} that this run does not have; resume with the same hooks")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"cannot resume from {path}: the model does not match "
                                  f"({str(exc).splitlines()[0]})") from None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        for h, k in zip(self.hooks, keys):
            if k in saved:
                h.load_state_dict(saved[k])
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt["global_step"])
        self.history = list(ckpt["history"])
        self.best_acc = float(ckpt.get("best_acc", -1.0))
        rngs = ckpt["rng"]
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank])
        else:
            warnings.warn(f"checkpoint was written by {len(rngs)} processes, this run has "
                          f"{self.world_size}: RNG streams restart from rank 0's state")
            set_rng_state(rngs[0])
        self.resumed_from = path

    # -- training ---------------------------------------------------------------------------
    def fit(self) -> list:
        """Train to config.epochs (resuming if asked) and return the per-epoch history."""
        cfg = self.config
        exists = os.path.exists(self.checkpoint_path)
        if cfg.resume and exists:
            self.load_state(load_checkpoint(self.checkpoint_path, map_location="cpu"),
                            self.checkpoint_path)
            self.log(f"resumed from {self.checkpoint_path} after epoch {self.epoch}")
        else:
            if exists and not cfg.overwrite:
                raise ValueError(f"{self.checkpoint_path} already exists: pass --resume to "
                                 "continue that run, or choose another --out directory")
            if cfg.resume:
                self.log(f"no checkpoint at {self.checkpoint_path}; starting fresh")
            seed_everything(cfg.seed + self.rank)
        dist_util.barrier()  # nobody writes a checkpoint before every rank has read it

        for h in self.hooks:
            h.on_fit_begin(self)
        for epoch in range(self.epoch + 1, cfg.epochs + 1):
            if self.stop_reason is not None:  # asked before the first epoch, e.g. by a resumed hook
                self.log(f"not training further: {self.stop_reason}")
                break
            self.epoch = epoch
            if hasattr(self.train_loader, "set_epoch"):
                self.train_loader.set_epoch(epoch)
            for h in self.hooks:
                h.on_epoch_begin(self, epoch)
            metrics = {"epoch": epoch, **self._train_epoch(epoch)}
            t0 = time.perf_counter()
            ev = self.evaluate()
            metrics["test_loss"], metrics["test_acc"] = ev.pop("loss"), ev.pop("acc")
            metrics["eval_time"] = time.perf_counter() - t0
            metrics.update(ev)
            for h in self.hooks:
                h.on_epoch_end(self, epoch, metrics)
            self.history.append(metrics)
            improved = metrics["test_acc"] > self.best_acc
            self.best_acc = max(self.best_acc, metrics["test_acc"])
            self.save_checkpoint()
            if self.is_main:
                if improved and cfg.save_best:
                    atomic_save({"model": self.model.state_dict(), "epoch": epoch,
                                 "test_acc": metrics["test_acc"], "config": cfg.to_dict()},
                                os.path.join(self.out_dir, BEST))
                write_metrics(self.history, self.out_dir)
            self.log(f"epoch {epoch}/{cfg.epochs}  train loss {metrics['train_loss']:.4f} "
                     f"acc {100 * metrics['train_acc']:.2f}%  test loss {metrics['test_loss']:.4f}"
                     f" acc {100 * metrics['test_acc']:.2f}%  lr {metrics['lr']:.4g}  "
                     f"{metrics['epoch_time']:.1f}s ({metrics['images_per_s']:.0f} img/s)")
            if self.stop_reason is not None:
                self.log(f"stopping after epoch {epoch}: {self.stop_reason}")
                break
        for h in self.hooks:
            h.on_fit_end(self, self.history)
        if self.is_main and self.history:
            write_metrics(self.history, self.out_dir)
            plot_curves(self.history, os.path.join(self.out_dir, "curves.png"),
                        title=f"{cfg.model} on {cfg.dataset}")
        return self.history

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.config
        self.model.train()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        loss_sum, correct, seen, skipped = zero.clone(), zero.clone(), 0, 0
        lr_first = self.lr
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True, file=sys.stderr)
        self._sync()
        t0 = time.perf_counter()
        try:
            for x, y in self.train_loader:
                step = self.global_step
                skip = False
                for h in self.hooks:  # ask every hook, so hooks that draw random numbers stay in step
                    skip = bool(h.should_skip_batch(self, step, (x, y))) or skip
                if self.dist.enabled:
                    skip = dist_util.any_rank(skip, self.device)
                if skip:
                    skipped += 1
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    out = split_outputs(self.train_model(x))
                    loss = self.criterion(out.logits, y)
                    for h in self.hooks:
                        loss = h.loss(self, out, y, loss)
                    loss.backward()
                    for h in self.hooks:
                        h.after_backward(self)
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    self.optimizer.step()
                    n = y.shape[0]
                    batch_loss = loss.detach()
                    batch_correct = (out.logits.detach().argmax(1) == y).sum()
                    loss_sum += batch_loss * n
                    correct += batch_correct
                    seen += n
                    bm = {"loss": batch_loss, "correct": batch_correct, "batch_size": n,
                          "lr": self.lr}
                    for h in self.hooks:
                        h.on_batch_end(self, step, bm)
                with warnings.catch_warnings():  # stepping before any optimizer.step (skips)
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                self.global_step += 1
                if bar is not None:
                    bar.update(1)
                    if not skip and (step % 10 == 0):
                        bar.set_postfix(loss=f"{batch_loss.item():.3f}", lr=f"{self.lr:.3g}")
        finally:
            if bar is not None:
                bar.close()
        self._sync()
        elapsed = time.perf_counter() - t0
        loss_sum, correct, seen, skipped = self.all_reduce_sum(
            [loss_sum.item(), correct.item(), seen, skipped])
        return {"train_loss": loss_sum / seen if seen else float("nan"),
                "train_acc": correct / seen if seen else float("nan"),
                "lr": lr_first, "epoch_time": elapsed,
                "images_per_s": seen / elapsed if elapsed > 0 else float("nan"),
                "skipped_batches": int(skipped) // self.world_size}

    @torch.no_grad()
    def evaluate(self, loader=None) -> dict:
        """Loss (plain cross-entropy) and accuracy over `loader` (default: the test set), reduced
        over ranks, plus every hook's eval_metrics()."""
        loader = loader or self.test_loader
        was_training = self.model.training
        self.model.eval()
        for h in self.hooks:
            h.on_eval_begin(self)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        # under DDP the loader pads the last batches with repeated samples so every rank gets
        # the same count; count each test sample once by trimming this rank's excess
        left = None
        if self.world_size > 1 and hasattr(loader, "dataset"):
            left = len(range(self.rank, len(loader.dataset), self.world_size))
        for x, y in loader:
            if left is not None:
                if left <= 0:
                    continue
                x, y, left = x[:left], y[:left], left - y.shape[0]
            out = split_outputs(self.model(x))
            loss_sum += F.cross_entropy(out.logits.float(), y, reduction="sum")
            correct += (out.logits.argmax(1) == y).sum()
            seen += y.shape[0]
            for h in self.hooks:
                h.on_eval_batch(self, out, y)
        loss_sum, correct, seen = self.all_reduce_sum([loss_sum.item(), correct.item(), seen])
        result = {"loss": loss_sum / seen if seen else float("nan"),
                  "acc": correct / seen if seen else float("nan")}
        for h in self.hooks:
            result.update(h.eval_metrics(self) or {})
        self.model.train(was_training)
        return result

    def close(self, sync: bool = True) -> None:
        """Shut down the process group if this Trainer started it (`sync=False` after an error:
        see `distributed.teardown`)."""
        if self._started_dist:
            dist_util.teardown(sync)
            self._started_dist = False
