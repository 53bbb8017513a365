"""`pyeff train`: train a zoo model on a dataset with the shared loop.

Works unchanged under `torchrun --nproc_per_node=N -m pyeff train ...` (DDP; --batch-size stays
the global batch).
"""
from __future__ import annotations

import argparse
import os

from pyeff.train.config import TrainConfig

D = TrainConfig()  # the defaults, stated once
QUICK = {"epochs": 2, "train_subset": 2000, "test_subset": 1000}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train", help="train a model with the shared loop",
        description="Train a model from the pyeff zoo on a dataset. Every epoch writes an atomic "
                    "checkpoint and metrics (JSONL + CSV) to the output directory; the end writes "
                    "a PNG of the curves and prints a table. Under torchrun it trains with DDP.")
    a = p.add_argument
    a("--model", default=D.model, help=f"model name from the zoo (default: {D.model})")
    a("--data", "--dataset", dest="dataset", default=D.dataset,
      help=f"dataset name (default: {D.dataset}, embedded, no download)")
    a("--data-dir", default=None, help="directory of on-disk datasets (default: the dataset's own)")
    a("--epochs", type=int, default=None,
      help=f"total epochs; the LR schedule spans them (default: {D.epochs}; "
           f"{QUICK['epochs']} with --quick)")
    a("--batch-size", type=int, default=D.batch_size,
      help=f"global batch size, split over DDP ranks (default: {D.batch_size})")
    a("--lr", type=float, default=D.lr, help=f"peak learning rate of SGD (default: {D.lr})")
    a("--momentum", type=float, default=D.momentum, help=f"SGD momentum (default: {D.momentum})")
    a("--nesterov", action="store_true", help="Nesterov momentum (default: off)")
    a("--weight-decay", type=float, default=D.weight_decay,
      help=f"weight decay (default: {D.weight_decay})")
    a("--schedule", choices=["cosine", "step", "constant"], default=D.schedule,
      help=f"LR schedule, stepped per batch (default: {D.schedule})")
    a("--milestones", type=int, nargs="*", default=[],
      help="epochs where the step schedule multiplies the LR by --gamma "
           "(default: 50%% and 75%% of --epochs)")
    a("--gamma", type=float, default=D.gamma, help=f"step-schedule factor (default: {D.gamma})")
    a("--warmup", type=int, default=D.warmup, help=f"linear warm-up epochs (default: {D.warmup})")
    a("--label-smoothing", type=float, default=D.label_smoothing,
      help=f"label smoothing of the training loss (default: {D.label_smoothing})")
    a("--grad-clip", type=float, default=D.grad_clip,
      help=f"max gradient norm, 0 = off (default: {D.grad_clip})")
    a("--no-augment", dest="augment", action="store_false",
      help="turn off the dataset's crop/flip augmentation (default: augment)")
    a("--image-size", type=int, default=None, help="resize images to this size (default: native)")
    a("--train-subset", type=int, default=None,
      help=f"train on this many images (default: all; {QUICK['train_subset']} with --quick)")
    a("--test-subset", type=int, default=None,
      help=f"evaluate on this many images (default: all; {QUICK['test_subset']} with --quick)")
    a("--seed", type=int, default=D.seed, help=f"random seed (default: {D.seed})")
    a("--out", default=None,
      help="output directory (default: runs/<model>-<data>-<YYYYmmdd-HHMMSS>)")
    a("--resume", action="store_true",
      help="continue from <out>/checkpoint.pt if it exists (default: off)")
    a("--overwrite", action="store_true",
      help="start fresh even if <out> already holds a checkpoint (default: off)")
    a("--device", default=D.device, help=f"auto, cpu, cuda or cuda:N (default: {D.device})")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--progress", dest="progress", action="store_true", default=None,
      help="force progress bars (default: only when stderr is a terminal)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a("--quick", action="store_true",
      help=f"a fast smoke run: {QUICK['epochs']} epochs on {QUICK['train_subset']}/"
           f"{QUICK['test_subset']} train/test images unless given explicitly (default: off)")
    p.set_defaults(func=main)
    return p


def add_recipe_run_args(add, method: str) -> None:
    """The arguments every `pyeff <method> train` shares after its own: phase 1 source, batch,
    subsets, seed, device, threads and the output folder (`add` = parser.add_argument)."""
    add("--base-checkpoint", default=None, help="a pyeff checkpoint of --model: skips phase 1")
    add("--base-epochs", type=int, default=10, help="phase 1 epochs (float network)")
    add("--lr", type=float, default=0.1, help="phase 1 learning rate")
    add("--batch-size", type=int, default=128, help="batch size")
    add("--train-subset", type=int, default=None, help="train on this many images")
    add("--test-subset", type=int, default=None, help="evaluate on this many images")
    add("--seed", type=int, default=0, help="random seed")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--threads", type=int, default=None, help="torch CPU threads")
    add("--out", default=f"runs/{method}", help=f"output folder (phase folders and {method}.pt)")


def config_from_args(args) -> TrainConfig:
    quick = QUICK if args.quick else {}

    def pick(name, default):
        v = getattr(args, name)
        return v if v is not None else quick.get(name, default)

    return TrainConfig(
        model=args.model, dataset=args.dataset, data_dir=args.data_dir,
        image_size=args.image_size, epochs=pick("epochs", D.epochs), batch_size=args.batch_size,
        lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
        weight_decay=args.weight_decay, schedule=args.schedule, milestones=tuple(args.milestones),
        gamma=args.gamma, warmup=args.warmup, seed=args.seed, out_dir=args.out,
        resume=args.resume, overwrite=args.overwrite,
        train_subset=pick("train_subset", None), test_subset=pick("test_subset", None),
        augment=args.augment, label_smoothing=args.label_smoothing, grad_clip=args.grad_clip,
        device=args.device, threads=args.threads, progress=args.progress)


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
