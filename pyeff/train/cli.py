"""`pyeff train`: train a zoo model on a dataset with the shared loop. Its options are generated
from TrainConfig's fields (pyeff.config.add_config_args), so a new field is a new option.

Works unchanged under `torchrun --nproc_per_node=N -m pyeff train ...` (DDP; --batch-size stays
the global batch).
"""
from __future__ import annotations

import argparse
import os

from pyeff.train.config import TrainConfig

D = TrainConfig  # the class defaults, stated once
QUICK = {"epochs": 2, "train_subset": 2000, "test_subset": 1000}

# option names kept from before the options were generated
FLAGS = {"dataset": ["--data", "--dataset"], "out_dir": ["--out", "--out-dir"]}
DEFAULT_TEXT = {
    "epochs": f"{D.epochs}; {QUICK['epochs']} with --quick",
    "train_subset": f"all; {QUICK['train_subset']} with --quick",
    "test_subset": f"all; {QUICK['test_subset']} with --quick",
    "milestones": "50% and 75% of --epochs",
    "out_dir": "runs/<model>-<data>-<YYYYmmdd-HHMMSS>",
    "data_dir": "the dataset's own",
    "image_size": "native",
    "threads": "torch's choice",
    "progress": "only when stderr is a terminal",
}


def register(subparsers) -> argparse.ArgumentParser:
    from pyeff.config import add_config_args
    from pyeff.train.config import SCHEDULES

    p = subparsers.add_parser(
        "train", help="train a model with the shared loop",
        description="Train a model from the pyeff zoo on a dataset. Every epoch writes an atomic "
                    "checkpoint and metrics (JSONL + CSV) to the output directory; the end writes "
                    "a PNG of the curves and prints a table. Under torchrun it trains with DDP.")
    add_config_args(p, TrainConfig, flags=FLAGS, default_text=DEFAULT_TEXT, choices={"schedule": SCHEDULES},
                    help={"model": "model name from the zoo (pyeff.models.list_models(), or torchvision.<name>)"})
    p.add_argument("--quick", action="store_true",
                   help=f"a fast smoke run: {QUICK['epochs']} epochs on {QUICK['train_subset']}/"
                        f"{QUICK['test_subset']} train/test images unless given explicitly (default: off)")
    p.set_defaults(func=main)
    return p


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of a parsed `pyeff train` command line: defaults < --quick < given options."""
    from pyeff.config import config_from_args as build

    return build(TrainConfig, args, presets=QUICK if args.quick else None)


def main(args) -> int:
    from pyeff.train.build import run_training
    from pyeff.train.metrics import format_table

    config = config_from_args(args)
    trainer = run_training(config)
    if trainer.is_main:
        h = trainer.history
        print()
        print(format_table(h))
        total = sum(r["epoch_time"] + r.get("eval_time", 0) for r in h)
        print(f"\n{config.model} on {config.dataset}: final test acc "
              f"{100 * h[-1]['test_acc']:.2f}%, best {100 * trainer.best_acc:.2f}%, "
              f"{total:.1f}s of training and evaluation on {trainer.world_size} process(es), "
              f"device {trainer.device}")
        out = trainer.out_dir
        print(f"outputs in {out}/: "
              + ", ".join(f for f in ("checkpoint.pt", "best.pt", "metrics.jsonl", "metrics.csv",
                                      "curves.png") if os.path.exists(os.path.join(out, f))))
    return 0
