"""SMD, stochastic mini-batch dropping (E2-Train's data level, arXiv 1910.13349 Sec. 3.1), as a
hook on the shared training loop.

    from pyeff.e2train import SMDHook, stretch_epochs
    cfg = TrainConfig(..., epochs=stretch_epochs(160, 0.5))     # 213: the paper's 4/3 stretch
    Trainer(model, cfg, train_set, test_set, hooks=[SMDHook(p=0.5, seed=0)]).fit()

A dropped batch costs nothing: the Trainer asks `should_skip_batch` before the forward pass, so a
dropped batch runs no forward, no backward and (by default) no optimizer step. Only the loader's
work for it is spent, and the learning-rate schedule still advances (it counts every batch).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from pyeff.train.checkpoint import CheckpointError
from pyeff.train.hooks import Hook

# The paper's one data point: at p = 0.5 it trains for 4/3 of the epochs (2/3 of the baseline's
# batches computed, a 1/3 saving). The slope of the linear rule through (0, 1) and (0.5, 4/3).
PAPER_P, PAPER_STRETCH = 0.5, 4.0 / 3.0
_SLOPE = (PAPER_STRETCH - 1.0) / PAPER_P

# Mixed into Philox's key so SMD's draws differ from another Philox user's with the same seed.
_STREAM = 0x534D44  # "SMD"


def _check_p(p, who: str) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise ValueError(f"{who}: p is the probability of dropping a batch, in [0, 1) "
                         f"(p = 1 would never train), got p={p!r}")
    return float(p)


def drop_draw(seed: int, step: int) -> float:
    """The uniform number in [0, 1) that decides batch `step`: a counter-based draw (Philox,
    keyed by the seed, counter = the step), a pure function of (seed, step). So a resumed run
    draws the same numbers, and every DDP rank agrees without communicating."""
    raw = np.random.Philox(key=(_STREAM << 64) | seed, counter=step).random_raw()
    return (int(raw) >> 11) * 2.0 ** -53  # the top 53 bits: every double in [0, 1) this grid holds


def stretch_epochs(epochs: int, p: float = 0.5) -> int:
    """The epoch count that compensates dropping with probability p: epochs * (1 + 2p/3), to the
    nearest whole epoch (at least `epochs`).

    The paper gives one figure: 4/3 at p = 0.5. The general rule is ours: the straight line
    through no stretch at p = 0 and the paper's point, so it reproduces the paper exactly and
    stays monotone between them; above p = 0.5 it is an extrapolation nobody has validated.
    Explicit step-schedule milestones should be stretched the same way
    (`[stretch_epochs(m, p) for m in milestones]`); TrainConfig's default milestones (50% and
    75% of the epochs) follow the stretched count on their own.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"stretch_epochs: epochs must be a positive integer, got {epochs!r}")
    p = _check_p(p, "stretch_epochs")
    return max(int(epochs), math.floor(epochs * (1.0 + _SLOPE * p) + 0.5))


class SMDHook(Hook):
    """Drop each training batch with probability `p`, decided before any work is done.

    p: probability of dropping a batch, in [0, 1) (the paper: 0.5).
    seed: the draw for global step s is `drop_draw(seed, s)` (independent of the Trainer's RNG,
        which it neither reads nor advances), so the same seed drops the same steps in a fresh
        run, a resumed run and on every DDP rank.
    step_dropped: what a dropped batch does to the optimizer.
        False (default): nothing at all happens: no forward, backward or optimizer step; the
            momentum buffers and weights are exactly as the last kept batch left them.
        True: as in the reference code, optimizer.step() still runs with a zero gradient on
            every trainable parameter, so weight decay and momentum act (SGD: buf = mu*buf +
            wd*w, w -= lr*buf; Adam-like optimizers advance their moments and step count).
            This costs one optimizer step per dropped batch (no forward or backward). The
            reference's PyTorch 1.0 `zero_grad()` zeroed gradients in place, so the step it
            took on a dropped batch was exactly this zero-gradient step. It is done here, inside
            `should_skip_batch`, which is the one call the shared loop makes for a skipped batch:
            the step runs at that batch's learning rate (the scheduler steps after this call)
            and, since the drop decision is the same on every rank and the zero gradient needs
            no all-reduce, DDP ranks stay identical. Another hook's `after_backward` and the
            loop's gradient clipping do not run on such a step (there is no gradient to act on).

    Metrics added at each epoch end: smd_kept, smd_dropped (this epoch's batches; identical on
    every rank) and smd_drop_rate. State (checkpointed): p, seed, step_dropped and the run's
    totals; resuming with another p, seed or step_dropped is refused, since it would silently
    change which batches the rest of the run drops.
    """

    def __init__(self, p: float = 0.5, seed: int = 0, step_dropped: bool = False):
        self.p = _check_p(p, "SMDHook")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
            raise ValueError(f"SMDHook: seed must be an integer in [0, 2**64), got seed={seed!r}")
        self.seed = int(seed)
        if not isinstance(step_dropped, bool):
            raise ValueError(f"SMDHook: step_dropped must be True or False, got {step_dropped!r}")
        self.step_dropped = step_dropped
        self.kept = self.dropped = 0              # the whole run's
        self.epoch_kept = self.epoch_dropped = 0  # the current epoch's

    def drops(self, step: int) -> bool:
        """Whether global step `step` is dropped (the same answer every time it is asked)."""
        return self.p > 0.0 and drop_draw(self.seed, int(step)) < self.p

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        self.epoch_kept = self.epoch_dropped = 0

    def should_skip_batch(self, trainer, step: int, batch) -> bool:
        drop = self.drops(step)
        if drop:
            self.dropped += 1
            self.epoch_dropped += 1
            if self.step_dropped:
                self._zero_gradient_step(trainer.optimizer)
        else:
            self.kept += 1
            self.epoch_kept += 1
        return drop

    @staticmethod
    def _zero_gradient_step(optimizer) -> None:
        # Every trainable parameter gets a zero gradient, not None: torch's optimizers skip a
        # parameter whose grad is None, and then neither decay nor momentum would act on it.
        # Reusing the last kept batch's grad tensors avoids an allocation in the common case.
        for group in optimizer.param_groups:
            for w in group["params"]:
                if not w.requires_grad:
                    continue
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                else:
                    w.grad.detach_().zero_()
        optimizer.step()

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        n = self.epoch_kept + self.epoch_dropped
        metrics["smd_kept"] = self.epoch_kept
        metrics["smd_dropped"] = self.epoch_dropped
        metrics["smd_drop_rate"] = self.epoch_dropped / n if n else float("nan")

    def state_dict(self) -> dict:
        return {"p": self.p, "seed": self.seed, "step_dropped": self.step_dropped,
                "kept": self.kept, "dropped": self.dropped}

    def load_state_dict(self, state: dict) -> None:
        saved = (float(state["p"]), int(state["seed"]), bool(state["step_dropped"]))
        if saved != (self.p, self.seed, self.step_dropped):
            raise CheckpointError(
                f"cannot resume: the checkpoint's SMDHook has p={saved[0]}, seed={saved[1]}, "
                f"step_dropped={saved[2]}; this run's has p={self.p}, seed={self.seed}, "
                f"step_dropped={self.step_dropped}. Use the same settings, or another output "
                "directory to start a new run.")
        self.kept, self.dropped = int(state["kept"]), int(state["dropped"])

    def __repr__(self) -> str:
        return f"SMDHook(p={self.p}, seed={self.seed}, step_dropped={self.step_dropped})"
