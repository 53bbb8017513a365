"""The training-loop side of the dynamic core: a hook that adds the cost hinge to the loss and
logs the cost of training and evaluation batches. DFS and DDI (and any model whose forward returns
`(logits, {"cost": [N] fraction of full cost, ...})`) use it as is or extend it."""
from __future__ import annotations

from pyeff.dynamic.cost import hinge_cost_loss
from pyeff.train.hooks import Hook


class CostHingeHook(Hook):
    """Adds beta * mean cost * sign(cost% - target) to the loss; logs `train_computation_pct` and
    `computation_pct` (evaluation).

    Args:
        target: cost percentage to reach (0-100).
        beta: weight of the cost term.
    """

    def __init__(self, target: float, beta: float):
        if not 0 <= target <= 100:
            raise ValueError(f"target is a computation percentage in [0, 100], got {target}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.target, self.beta = float(target), float(beta)
        self._train = [0.0, 0]
        self._eval = [0.0, 0]

    @staticmethod
    def _cost(outputs):
        if "cost" not in outputs.aux:
            raise ValueError(f"this hook needs a model that returns (logits, {{'cost': ...}}) such as a pyeff "
                             f"DFSNet or DDINet; got aux keys {sorted(outputs.aux)}")
        return outputs.aux["cost"]

    def on_epoch_begin(self, trainer, epoch):
        self._train = [0.0, 0]

    def loss(self, trainer, outputs, targets, loss):
        cost = self._cost(outputs)
        self._train[0] += float(cost.detach().sum())
        self._train[1] += cost.shape[0]
        return loss + hinge_cost_loss(cost, self.target / 100.0, self.beta)

    def on_eval_begin(self, trainer):
        self._eval = [0.0, 0]

    def on_eval_batch(self, trainer, outputs, targets):
        cost = self._cost(outputs)
        self._eval[0] += float(cost.detach().sum())
        self._eval[1] += cost.shape[0]

    def eval_metrics(self, trainer) -> dict:
        s, n = trainer.all_reduce_sum(self._eval)
        return {"computation_pct": 100.0 * s / n if n else float("nan")}

    def on_epoch_end(self, trainer, epoch, metrics):
        s, n = trainer.all_reduce_sum(self._train)
        metrics["train_computation_pct"] = 100.0 * s / n if n else float("nan")
