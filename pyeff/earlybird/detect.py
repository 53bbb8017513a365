"""Early-bird ticket detection (You et al., ICLR 2020) as a hook of the shared loop, or by hand.

After each epoch, the global mask for each pruning ratio p: the |scale| of every BatchNorm2d channel
in one vector, thresholded at its p-quantile (a channel stays when its |scale| is above it). The
last `window` masks of each ratio are kept (FIFO); a ticket is drawn when the newest is within
`threshold` (normalised Hamming distance, 1 - equal entries / N) of each of the others.

    eb = EarlyBird(model)                       # ratios (0.3, 0.5, 0.7), window 5, threshold 0.1
    for epoch in range(epochs):
        train_one_epoch(model)
        eb.step()                               # or pass eb to pyeff.train.Trainer(hooks=[...])
    eb.drawn                                    # {0.5: 7, ...}: the epoch each ratio's ticket was drawn
    eb.mask(0.5)                                # {bn name: bool tensor}: for pyeff.prune.slim / apply_mask
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from pyeff.prune.plan import bn_layers
from pyeff.train.hooks import Hook


def mask_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised Hamming distance of two masks of the same shape: 1 - (#equal entries) / N."""
    if a.shape != b.shape:
        raise ValueError(f"mask_distance: masks of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("mask_distance: empty masks")
    return float((a != b).sum()) / a.numel()  # = 1 - equal / N, without its rounding at the threshold


def global_mask(scales: torch.Tensor, sizes: list, ratio: float) -> torch.Tensor:
    """The flat keep-mask of pruning ratio `ratio` on the concatenated |scale| vector: |scale| above
    its `ratio`-quantile, and in every layer (`sizes`: channels per layer) at least its largest."""
    s = scales.abs().float()
    k = int(math.floor(ratio * s.numel()))
    thr = s.kthvalue(k).values if k >= 1 else s.min() - 1
    keep = s > thr
    for chunk, mask in zip(s.split(sizes), keep.split(sizes)):
        if not mask.any():
            mask[chunk.argmax()] = True  # a view: sets the entry of `keep`
    return keep


def _check_ratio(r) -> float:
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r < 1:
        raise ValueError(f"EarlyBird: a pruning ratio is the fraction of channels to remove, in (0, 1); got {r!r}")
    return float(r)


class EarlyBird(Hook):
    """Draws early-bird tickets: `step()` once per epoch (the Trainer calls it at each epoch's end).

    Args:
        model: the network being trained; its BatchNorm2d scales rank the channels.
        ratios: pruning ratios to watch, each in (0, 1).
        window: masks kept per ratio (the newest is compared with the other window - 1); >= 2.
        threshold: the largest distance, in [0, 1), at which masks count as settled.
        stop: a ratio (or True: every ratio) whose drawn ticket ends training through the Trainer.
        keep_weights: keep a copy of the model's state_dict at each ticket's draw (`tickets`).
        checks_per_epoch: masks recorded per epoch in the shared loop (1: at each epoch's end, the
            paper's rule; k > 1: after every 1/k of the epoch's batches, so that a short schedule's
            window spans as small a share of training as the paper's 5 of 160 epochs). Epochs are then
            fractional (2.5 = half-way through epoch 3).

    Attributes:
        drawn: {ratio: epoch} of the tickets drawn so far.
        history: one dict per step: {"epoch", "distances": {ratio: [distance of the newest mask to each
            older one in the window, oldest first]}, "drawn": [ratios drawn at this step]}.
        masks: {ratio: [flat bool mask of each step]}: every epoch's mask, for `distance_matrix`.
        tickets: {ratio: state_dict at the draw} when keep_weights.
    """

    def __init__(self, model: nn.Module, ratios=(0.3, 0.5, 0.7), window: int = 5, threshold: float = 0.1,
                 stop=None, keep_weights: bool = False, checks_per_epoch: int = 1):
        self.bns = bn_layers(model)
        if not self.bns:
            raise ValueError(f"EarlyBird: {type(model).__name__} has no BatchNorm2d layer with a scale; early-bird "
                             "tickets rank channels by the BatchNorm after each conv, so the model needs one there")
        if isinstance(ratios, numbers.Real):
            ratios = (ratios,)
        self.ratios = tuple(sorted({_check_ratio(r) for r in ratios}))
        if not self.ratios:
            raise ValueError("EarlyBird: give at least one pruning ratio")
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 2:
            raise ValueError(f"EarlyBird: window is the number of masks compared, an integer >= 2; got {window!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold < 1:
            raise ValueError(f"EarlyBird: threshold is a mask distance in [0, 1); got {threshold!r}")
        if stop is True:
            stop = self.ratios
        elif stop is not None:
            stop = tuple(_check_ratio(r) for r in ((stop,) if isinstance(stop, numbers.Real) else stop))
            missing = [r for r in stop if r not in self.ratios]
            if missing:
                raise ValueError(f"EarlyBird: stop ratios {missing} are not among the watched ratios {self.ratios}")
        if isinstance(checks_per_epoch, bool) or not isinstance(checks_per_epoch, numbers.Integral) or checks_per_epoch < 1:
            raise ValueError(f"EarlyBird: checks_per_epoch must be an integer >= 1; got {checks_per_epoch!r}")
        self.checks_per_epoch = int(checks_per_epoch)
        self.model, self.window, self.threshold, self.stop = model, int(window), float(threshold), stop
        self.keep_weights = keep_weights
        self.sizes = [bn.num_features for bn in self.bns.values()]
        self.masks = {r: [] for r in self.ratios}
        self.drawn: dict = {}
        self.history: list = []
        self.tickets: dict = {}
        self.epoch = 0

    # -- the rule --------------------------------------------------------------------------------
    def scales(self) -> torch.Tensor:
        return torch.cat([bn.weight.detach().float().cpu() for bn in self.bns.values()])

    def flat_mask(self, ratio: float) -> torch.Tensor:
        """The current flat keep-mask at `ratio` (over all BatchNorm2d channels, module order)."""
        return global_mask(self.scales(), self.sizes, _check_ratio(ratio))

    def mask(self, ratio: float, flat: torch.Tensor | None = None) -> dict:
        """{bn name: bool keep tensor}: the newest recorded mask of `ratio` (or `flat`, or the current
        one when nothing was recorded), in the form pyeff.prune.slim and apply_mask take."""
        ratio = _check_ratio(ratio)
        if flat is None:
            flat = self.masks[ratio][-1] if self.masks.get(ratio) else self.flat_mask(ratio)
        return dict(zip(self.bns, flat.split(self.sizes)))

    def step(self, epoch: float | None = None) -> dict:
        """Record this epoch's masks; returns {ratio: drawn?} for the ratios drawn at this step."""
        self.epoch = (int(epoch) if float(epoch).is_integer() else float(epoch)) if epoch is not None \
            else self.epoch + 1
        s = self.scales()
        rec = {"epoch": self.epoch, "distances": {}, "drawn": []}
        for r in self.ratios:
            m = global_mask(s, self.sizes, r)
            self.masks[r].append(m)
            recent = self.masks[r][-self.window:]
            d = [mask_distance(m, old) for old in recent[:-1]]
            rec["distances"][r] = d
            if r not in self.drawn and len(recent) == self.window and max(d) < self.threshold:
                self.drawn[r] = self.epoch
                rec["drawn"].append(r)
                if self.keep_weights:
                    self.tickets[r] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.history.append(rec)
        return {r: True for r in rec["drawn"]}

    def distance_matrix(self, ratio: float) -> torch.Tensor:
        """[epochs x epochs] mask distances between every two recorded epochs at `ratio` (the paper's
        figure)."""
        ms = self.masks[_check_ratio(ratio)]
        if not ms:
            return torch.zeros(0, 0)
        a = torch.stack(ms).float()
        equal = a @ a.T + (1 - a) @ (1 - a).T
        return 1 - equal / a.shape[1]

    def done(self) -> bool:
        """True once every `stop` ratio has its ticket."""
        return bool(self.stop) and all(r in self.drawn for r in self.stop)

    # -- the shared loop ---------------------------------------------------------------------------
    def on_fit_begin(self, trainer) -> None:
        if trainer is not None and self.done():  # a resumed run whose tickets were already drawn
            trainer.request_stop(f"early-bird tickets already drawn for {list(self.stop)}")

    def on_batch_end(self, trainer, step: int, metrics: dict) -> None:
        if self.checks_per_epoch == 1:
            return
        n = trainer.steps_per_epoch
        i = step - (trainer.epoch - 1) * n + 1  # batches of this epoch done
        every = max(1, n // self.checks_per_epoch)
        if i % every == 0 and i // every < self.checks_per_epoch:  # the epoch's last check is at its end
            self._record(trainer, trainer.epoch - 1 + i / n)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        self._record(trainer, epoch)
        for r in self.ratios:
            d = self.history[-1]["distances"][r]
            metrics[f"eb_max_distance_{r:g}"] = max(d) if d else float("nan")
        for r, e in self.drawn.items():
            if epoch - 1 < e <= epoch:
                metrics[f"eb_drawn_{r:g}"] = e

    def _record(self, trainer, epoch) -> None:
        drawn = self.step(epoch)
        for r in drawn:
            if trainer is not None:
                trainer.log(f"early-bird ticket at pruning ratio {r:g} drawn at epoch {self.epoch:g}")
        if trainer is not None and self.done() and getattr(trainer, "stop_reason", None) is None:
            trainer.request_stop(f"early-bird tickets drawn for {list(self.stop)}")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "ratios": list(self.ratios),
                "masks": {str(r): [m.clone() for m in ms] for r, ms in self.masks.items()},
                "drawn": {str(r): e for r, e in self.drawn.items()}, "history": self.history,
                "tickets": {str(r): t for r, t in self.tickets.items()}}

    def load_state_dict(self, state: dict) -> None:
        if [float(r) for r in state["ratios"]] != list(self.ratios):
            raise ValueError(f"EarlyBird: the saved state watches ratios {state['ratios']}, this one {list(self.ratios)}")
        self.epoch = int(state["epoch"])
        self.masks = {float(r): list(ms) for r, ms in state["masks"].items()}
        self.drawn = {float(r): int(e) for r, e in state["drawn"].items()}
        self.history = list(state["history"])
        self.tickets = {float(r): t for r, t in state.get("tickets", {}).items()}


class SlimmingPenalty(Hook):
    """Network Slimming's sparsity penalty on the BatchNorm2d scales, through the gradient:
    gamma.grad += s * sign(gamma) after every backward (s = 1e-4 in Early-Bird)."""

    def __init__(self, model: nn.Module, s: float = 1e-4):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or s < 0:
            raise ValueError(f"SlimmingPenalty: s must be a finite number >= 0, got {s!r}")
        self.bns = list(bn_layers(model).values())
        if not self.bns:
            raise ValueError(f"SlimmingPenalty: {type(model).__name__} has no BatchNorm2d layer with a scale")
        self.s = float(s)

    @torch.no_grad()
    def apply(self) -> None:
        for bn in self.bns:
            if bn.weight.grad is not None:
                bn.weight.grad.add_(torch.sign(bn.weight), alpha=self.s)

    def after_backward(self, trainer) -> None:
        self.apply()
