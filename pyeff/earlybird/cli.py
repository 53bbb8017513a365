"""`pyeff earlybird train|eval`: the Early-Bird recipe on a zoo model. The search trains the dense
network with Network Slimming's penalty until EarlyBird draws the ticket at --ratio (or the schedule
ends); the ticket is slimmed (pyeff.prune.slim) and trained for the epochs the schedule has left, at
the learning rate the schedule had reached. Both runs are the shared Trainer's (atomic checkpoints,
--resume continues either), in <out>/search and <out>/slim; the end writes <out>/earlybird.pt
(atomically): the mask, the slim weights and the settings."""
from __future__ import annotations

import json
import os

FLAGS = {"dataset": ["--data", "--dataset"], "out_dir": ["--out", "--out-dir"]}
EB_FORMAT = "pyeff.earlybird/1"
RESULT = "earlybird.pt"


def register(subparsers):
    from pyeff.config import add_config_args
    from pyeff.train.config import SCHEDULES, TrainConfig

    p = subparsers.add_parser("earlybird", help="Early-Bird tickets: search, slim, train the ticket; evaluate it",
                              description="Early-Bird tickets: find the pruning mask early, slim the network, train "
                                          "the slim network for the rest of the schedule.")
    sub = p.add_subparsers(dest="earlybird_command", metavar="{train,eval}")
    t = sub.add_parser("train", help="search with EarlyBird, slim the ticket, train it to the end of the schedule",
                       description="The whole schedule (--epochs, --lr, --schedule, --milestones) is the search's; "
                                   "the slim network trains for the epochs left after the draw.")
    add_config_args(t, TrainConfig, title="training (pyeff.train.TrainConfig)", flags=FLAGS,
                    choices={"schedule": SCHEDULES},
                    help={"model": "zoo model with a BatchNorm2d after its convs (e.g. vgg16, preresnet20, "
                                   "torchvision.resnet18)",
                          "out_dir": "output folder (search/, slim/, earlybird.pt)"})
    g = t.add_argument_group("Early-Bird")
    g.add_argument("--ratio", type=float, default=0.5, help="pruning ratio in (0, 1) (default: 0.5)")
    g.add_argument("--penalty", type=float, default=1e-4, help="slimming penalty s on the BN scales (default: 1e-4)")
    g.add_argument("--window", type=int, default=5, help="masks compared, >= 2 (default: 5)")
    g.add_argument("--threshold", type=float, default=0.1, help="largest mask distance of a ticket (default: 0.1)")
    g.add_argument("--checks-per-epoch", type=int, default=1, help="masks recorded per epoch (default: 1)")
    t.set_defaults(func=train_main)
    e = sub.add_parser("eval", help="accuracy and FLOPs of earlybird.pt on the test set")
    e.add_argument("--checkpoint", required=True, help="earlybird.pt written by pyeff earlybird train")
    e.add_argument("--data-dir", default=None, help="directory of on-disk datasets (default: the dataset's own)")
    e.add_argument("--test-subset", type=int, default=None, help="evaluate on this many images (default: all)")
    e.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    e.set_defaults(func=eval_main)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    return p


def _rest_of_schedule(config, epoch: int, steps: int):
    """(lr, settings) that train the epochs after `epoch` as the schedule would have: the learning
    rate it had reached, the step milestones still ahead (cosine restarts from that rate)."""
    from pyeff.train.loop import LRSchedule

    sched = LRSchedule(config.schedule, config.epochs, steps, config.warmup, config.effective_milestones(),
                       config.gamma)
    lr = config.lr * sched(epoch * steps)
    ms = tuple(m - epoch for m in config.effective_milestones() if m > epoch)
    return lr, {"epochs": config.epochs - epoch, "lr": lr, "warmup": 0,
                **({"milestones": ms or (config.epochs - epoch,), "gamma": config.gamma if ms else 1.0}
                   if config.schedule == "step" else {})}


def train_main(args) -> int:
    from pyeff.config import config_from_args
    from pyeff.train import distributed as dist_util
    from pyeff.train.config import TrainConfig

    config = config_from_args(TrainConfig, args)
    # one process group for the search and the slim run under torchrun (distributed.process_group)
    with dist_util.process_group(config.device):
        return _train(args, config)


def _train(args, config) -> int:
    import torch

    from pyeff.earlybird import EarlyBird, SlimmingPenalty
    from pyeff.experiments.measure import count_flops
    from pyeff.prune import slim
    from pyeff.train import atomic_save
    from pyeff.train.build import build_model, load_data, run_training

    data = load_data(config)
    model = build_model(config, data[0])
    eb = EarlyBird(model, ratios=(args.ratio,), window=args.window, threshold=args.threshold, stop=args.ratio,
                   keep_weights=False, checks_per_epoch=args.checks_per_epoch)
    pen = SlimmingPenalty(model, args.penalty)
    out = config.out_dir or os.path.join("runs", f"earlybird-{config.model}-{config.dataset}")
    search = run_training(config.replace(out_dir=os.path.join(out, "search")), hooks=[pen, eb], model=model,
                          data=data, verbose=True)
    drawn = eb.drawn.get(args.ratio)
    epoch = len(search.history)
    if drawn is None and search.is_main:
        print(f"no early-bird ticket at ratio {args.ratio:g} within {epoch} epochs: slimming the final mask "
              "(this is network slimming, not an early-bird ticket)")
    keep = eb.mask(args.ratio)
    x = torch.zeros(1, *data[0].images.shape[1:])
    small = slim(search.model.cpu(), keep, x)
    if epoch < config.epochs:
        _, rest = _rest_of_schedule(config, epoch, search.steps_per_epoch)
        tr = run_training(config.replace(out_dir=os.path.join(out, "slim"), **rest), model=small, data=data,
                          verbose=True)
        small, history = tr.model.cpu(), tr.history
        if not tr.is_main:
            return 0
    else:
        history = []
    if not search.is_main:
        return 0
    dense_f, slim_f = count_flops(search.model.cpu(), x.shape), count_flops(small, x.shape)
    path = os.path.join(out, RESULT)
    atomic_save({"format": EB_FORMAT, "config": config.to_dict(), "ratio": args.ratio, "ticket_epoch": drawn,
                 "search_epochs": epoch, "keep": keep, "model": small.state_dict(),
                 "num_classes": data[0].num_classes, "in_channels": data[0].images.shape[1],
                 "input_shape": list(data[0].images.shape[1:]), "flops": {"dense": dense_f, "slim": slim_f},
                 "history": {"search": search.history, "slim": history}}, path)
    acc = 100 * (history[-1]["test_acc"] if history else search.history[-1]["test_acc"])
    print(f"Early-Bird {config.model} on {config.dataset}: ticket at ratio {args.ratio:g} "
          f"{'drawn at epoch ' + format(drawn, 'g') if drawn is not None else 'not drawn'}; slim network "
          f"{100 * slim_f / dense_f:.1f}% of the dense FLOPs, test acc {acc:.2f}% after {config.epochs} epochs in "
          f"all; saved {path}")
    return 0


def load_earlybird(path: str):
    """(slim model in eval mode, saved dict) of an earlybird.pt: the zoo model, slimmed by the saved
    mask, with the saved weights."""
    import torch

    from pyeff.models import create_model
    from pyeff.prune import slim
    from pyeff.train.checkpoint import read_checkpoint
    from pyeff.train.config import TrainConfig

    saved = read_checkpoint(path, what="Early-Bird result", format=EB_FORMAT,
                            required=("config", "keep", "model", "num_classes", "in_channels"),
                            advice="give the earlybird.pt written by pyeff earlybird train")
    config = TrainConfig.from_dict(saved["config"])
    base = create_model(config.model, num_classes=saved["num_classes"], in_channels=saved["in_channels"])
    shape = saved.get("input_shape") or [saved["in_channels"], config.image_size or 32, config.image_size or 32]
    model = slim(base, saved["keep"], torch.zeros(1, *shape))
    model.load_state_dict(saved["model"])
    return model.eval(), saved


def eval_main(args) -> int:
    from pyeff.data import load_dataset
    from pyeff.experiments.measure import accuracy_percent
    from pyeff.train.config import TrainConfig

    model, saved = load_earlybird(args.checkpoint)
    config = TrainConfig.from_dict(saved["config"])
    test = load_dataset(config.dataset, "test", data_dir=args.data_dir)
    if args.test_subset and args.test_subset < len(test):
        test = test.subset(args.test_subset)
    seen = len(test)
    res = {"accuracy": accuracy_percent(model, test, args.batch_size) / 100, "images": seen, "ratio": saved["ratio"],
           "ticket_epoch": saved.get("ticket_epoch"), "flops": saved.get("flops")}
    f = saved.get("flops") or {}
    print(f"{config.model} Early-Bird ticket (ratio {saved['ratio']:g}) on {config.dataset}: test accuracy "
          f"{100 * res['accuracy']:.2f}% on {seen} images; "
          + (f"{100 * f['slim'] / f['dense']:.1f}% of the dense FLOPs" if f else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(res, fh, indent=2, default=str)
    return 0
