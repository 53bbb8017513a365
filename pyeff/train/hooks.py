"""Hooks: how method recipes (DFS, E2-Train, Early-Bird, ...) plug into the shared loop.

Subclass `Hook` and override what you need; every method is a no-op by default. Hooks run in the
order given to the Trainer. Epochs are counted from 1; `step` is the global batch index counted
from 0 across epochs (skipped batches included, so it matches the learning-rate schedule).

Model output convention: a model returns either logits `[N, classes]`, or a tuple
`(logits, aux)`, or a dict with a "logits" key (the other entries become `aux`). The Trainer
wraps it as `Outputs(logits, aux, raw)`; `aux` is a dict (empty when the model returns only
logits), e.g. the per-sample cost of a dynamic model that a `loss` hook adds to the objective.

Call order for one epoch (training):
    on_fit_begin (once, after any resume)
    on_epoch_begin(epoch)
      per batch: should_skip_batch(step, batch) -> loss(outputs, targets, loss) -> backward
                 -> after_backward -> [grad clip] -> optimizer.step -> on_batch_end(step, metrics)
    evaluation: on_eval_begin, on_eval_batch(outputs, targets) per batch, eval_metrics()
    on_epoch_end(epoch, metrics)   (may add keys to metrics; they land in metrics.jsonl/csv)
    checkpoint (state_dict of every hook is saved with it)
    on_fit_end(history)

Under DDP every rank runs the hooks; `trainer.is_main` says which rank writes files.
`should_skip_batch` answers are combined across ranks (skip if any rank skips), so ranks stay in
step. Hook state must be tensors and plain containers so the checkpoint loads with
weights_only=True.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class Outputs(NamedTuple):
    logits: Any
    aux: dict
    raw: Any


def split_outputs(out) -> Outputs:
    """Normalise a model's output to Outputs(logits, aux, raw)."""
    if isinstance(out, Outputs):
        return out
    if isinstance(out, dict):
        if "logits" not in out:
            raise ValueError("a model returning a dict must include a 'logits' entry; "
                             f"got keys {sorted(out)}")
        return Outputs(out["logits"], {k: v for k, v in out.items() if k != "logits"}, out)
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise ValueError("a model returning a tuple must return (logits, aux); "
                             f"got a tuple of {len(out)}")
        aux = out[1] if isinstance(out[1], dict) else {"aux": out[1]}
        return Outputs(out[0], aux, out)
    return Outputs(out, {}, out)


class Hook:
    """No-op base class. Override any subset."""

    def on_fit_begin(self, trainer) -> None: ...

    def on_epoch_begin(self, trainer, epoch: int) -> None: ...

    def should_skip_batch(self, trainer, step: int, batch) -> bool:
        """Return True to skip this training batch entirely (no forward, backward or step)."""
        return False

    def loss(self, trainer, outputs: Outputs, targets, loss):
        """Return the loss to minimise (default: unchanged). Add cost or regularisation terms."""
        return loss

    def after_backward(self, trainer) -> None:
        """Gradients are ready and not yet applied: mask or rescale them here."""

    def on_batch_end(self, trainer, step: int, metrics: dict) -> None:
        """After the optimizer step. metrics: loss, acc, lr, batch_size (this rank's)."""

    def on_eval_begin(self, trainer) -> None: ...

    def on_eval_batch(self, trainer, outputs: Outputs, targets) -> None: ...

    def eval_metrics(self, trainer) -> dict:
        """Extra evaluation metrics (reduce across ranks yourself, e.g. trainer.all_reduce_sum)."""
        return {}

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        """Runs before the checkpoint; add keys to `metrics` to have them logged."""

    def on_fit_end(self, trainer, history: list) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LambdaHook(Hook):
    """Build a hook from keyword callables, e.g. LambdaHook(on_epoch_end=lambda t, e, m: ...)."""

    _NAMES = ("on_fit_begin", "on_epoch_begin", "should_skip_batch", "loss", "after_backward",
              "on_batch_end", "on_eval_begin", "on_eval_batch", "eval_metrics", "on_epoch_end",
              "on_fit_end")

    def __init__(self, **fns):
        unknown = sorted(set(fns) - set(self._NAMES))
        if unknown:
            raise ValueError(f"unknown hook methods {unknown}; known: {', '.join(self._NAMES)}")
        for name, fn in fns.items():
            setattr(self, name, fn)
