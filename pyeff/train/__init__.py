"""The shared training loop: config, Trainer, hooks, atomic checkpoints, metrics, DDP.

    from pyeff.train import TrainConfig, Trainer, Hook, run_training
    trainer = run_training(TrainConfig(model="resnet20", dataset="shapes", epochs=5))

See docs/training.md.
"""
from pyeff.train.build import build_model, load_data, run_training
from pyeff.train.checkpoint import (CheckpointError, atomic_save, load_checkpoint, read_checkpoint,
                                    seed_everything)
from pyeff.train.config import TrainConfig
from pyeff.train.hooks import Hook, LambdaHook, Outputs, split_outputs
from pyeff.train.loop import LRSchedule, Trainer
from pyeff.train.metrics import format_table, plot_curves, read_jsonl, write_metrics

__all__ = [
    "TrainConfig", "Trainer", "Hook", "LambdaHook", "Outputs", "split_outputs", "LRSchedule",
    "run_training", "build_model", "load_data", "CheckpointError", "atomic_save",
    "load_checkpoint", "read_checkpoint", "seed_everything", "write_metrics", "read_jsonl", "plot_curves",
    "format_table",
]
