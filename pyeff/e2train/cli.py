"""`pyeff e2train train|eval`: train with any combination of E2-Train's levels (SMD, SLU, PSG) and an
energy account, then evaluate the result. The training options are TrainConfig's (generated, as
`pyeff train`), plus the levels' flags. The shared Trainer writes atomic checkpoints (checkpoint.pt,
resumable with --resume) and metrics to --out; the end writes e2train.pt (atomically): the weights,
the settings and the run's energy account."""
from __future__ import annotations

import json
import os

FLAGS = {"dataset": ["--data", "--dataset"], "out_dir": ["--out", "--out-dir"]}
E2_FORMAT = "pyeff.e2train/1"
RESULT = "e2train.pt"


def register(subparsers):
    from pyeff.config import add_config_args
    from pyeff.train.config import SCHEDULES, TrainConfig

    p = subparsers.add_parser("e2train", help="E2-Train (SMD, SLU, PSG) with an energy account: train and evaluate",
                              description="E2-Train: stochastic mini-batch dropping, selective layer update and "
                                          "predictive sign gradients, any combination, with a per-phase energy "
                                          "account.")
    sub = p.add_subparsers(dest="e2train_command", metavar="{train,eval}")
    t = sub.add_parser("train", help="train a zoo model with the chosen levels; prints the energy table",
                       description="Train with the shared loop and E2-Train's levels. Every setting is checked "
                                   "before training starts.")
    add_config_args(t, TrainConfig, title="training (pyeff.train.TrainConfig)", flags=FLAGS,
                    choices={"schedule": SCHEDULES},
                    help={"model": "zoo model with residual blocks for SLU (a CIFAR ResNet or torchvision.resnet*)",
                          "out_dir": "output folder (checkpoint.pt, metrics, e2train.pt)"})
    g = t.add_argument_group("E2-Train levels")
    g.add_argument("--smd", action=_Bool, default=True, help="stochastic mini-batch dropping (default: on)")
    g.add_argument("--smd-p", type=float, default=0.5, help="SMD drop probability in [0, 1) (default: 0.5)")
    g.add_argument("--stretch", action=_Bool, default=True,
                   help="with SMD, stretch --epochs by stretch_epochs(epochs, p) (default: on)")
    g.add_argument("--slu", action=_Bool, default=True, help="selective layer update (default: on)")
    g.add_argument("--slu-target", type=float, default=0.5,
                   help="SLU: fraction of gated blocks to execute, in (0, 1] (default: 0.5)")
    g.add_argument("--slu-beta", type=float, default=1e-5, help="SLU: hinge weight per executed block (default: 1e-5)")
    g.add_argument("--psg", action=_Bool, default=True, help="predictive sign gradient (default: on)")
    g.add_argument("--psg-x-bits", type=int, default=4, help="PSG predictor: activation bits 2-16 (default: 4)")
    g.add_argument("--psg-g-bits", type=int, default=16, help="PSG predictor: gradient bits 2-16 (default: 16)")
    g.add_argument("--psg-threshold", type=float, default=5e-5,
                   help="PSG: |g_pred| above it is trusted; >= 0, inf = exact (default: 5e-5)")
    g.add_argument("--psg-sign-scale", type=float, default=1.0,
                   help="PSG: the sign step's gradient magnitude (default: 1.0)")
    t.set_defaults(func=train_main)
    e = sub.add_parser("eval", help="accuracy of e2train.pt on the test set, and its training energy table")
    e.add_argument("--checkpoint", required=True, help="e2train.pt written by pyeff e2train train")
    e.add_argument("--data-dir", default=None, help="directory of on-disk datasets (default: the dataset's own)")
    e.add_argument("--test-subset", type=int, default=None, help="evaluate on this many images (default: all)")
    e.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    e.set_defaults(func=eval_main)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    return p


class _Bool:  # argparse.BooleanOptionalAction without importing argparse at module level
    def __new__(cls, *a, **kw):
        import argparse
        return argparse.BooleanOptionalAction(*a, **kw)


def recipe_from_settings(s: dict):
    """The E2Train of saved or parsed settings {smd, smd_p, slu, slu_target, slu_beta, psg, psg_*}."""
    from pyeff.e2train.recipe import E2Train
    from pyeff.e2train.slu import SLUConfig
    from pyeff.e2train.smd import SMDHook

    smd = SMDHook(p=s["smd_p"], seed=s.get("seed", 0)) if s["smd"] else False
    slu = SLUConfig(target=s["slu_target"], beta=s["slu_beta"]) if s["slu"] else False
    psg = ({"x_bits": s["psg_x_bits"], "g_bits": s["psg_g_bits"], "threshold": s["psg_threshold"],
            "sign_scale": s["psg_sign_scale"]} if s["psg"] else False)
    return E2Train(smd=smd, slu=slu, psg=psg)


def _settings(args) -> dict:
    keys = ("smd", "smd_p", "stretch", "slu", "slu_target", "slu_beta", "psg", "psg_x_bits", "psg_g_bits",
            "psg_threshold", "psg_sign_scale")
    return {k: getattr(args, k) for k in keys}


def _check(s: dict) -> None:
    from pyeff.e2train.slu import SLUConfig
    from pyeff.e2train.smd import _check_p
    _check_p(s["smd_p"], "pyeff e2train: --smd-p")
    try:
        SLUConfig(target=s["slu_target"], beta=s["slu_beta"]).validate()
    except ValueError as e:
        raise ValueError(f"--slu-target / --slu-beta: {e}") from None


def train_main(args) -> int:
    from pyeff.config import config_from_args
    from pyeff.e2train.energy_hook import format_energy_table
    from pyeff.train import atomic_save
    from pyeff.train.build import build_model, load_data, run_training
    from pyeff.train.config import TrainConfig

    config = config_from_args(TrainConfig, args)
    s = _settings(args)
    s["seed"] = config.seed
    _check(s)
    e2 = recipe_from_settings(s)  # every level's setting checked here
    if s["smd"] and s["stretch"]:
        config = config.replace(epochs=e2.epochs(config.epochs)).validate()
    if s["slu"] and not config.find_unused_parameters:
        config = config.replace(find_unused_parameters=True)  # DDP: a block no sample runs gets no gradient
    data = load_data(config)
    model, hooks = e2.apply(build_model(config, data[0]))
    trainer = run_training(config, hooks=hooks, model=model, data=data, verbose=False)
    if not trainer.is_main:
        return 0
    path = os.path.join(trainer.out_dir, RESULT)
    atomic_save({"format": E2_FORMAT, "settings": s, "config": config.to_dict(), "model": model.state_dict(),
                 "num_classes": data[0].num_classes, "in_channels": data[0].images.shape[1],
                 "energy": e2.energy_hook.account.state_dict(), "energy_model": e2.energy.to_dict(),
                 "history": trainer.history}, path)
    last = trainer.history[-1]
    print(format_energy_table(e2.energy_hook.table()))
    print(f"\nE2-Train {config.model} on {config.dataset} (smd={s['smd']}, slu={s['slu']}, psg={s['psg']}): test acc "
          f"{100 * last['test_acc']:.2f}%, training energy {e2.energy_hook.account.energy_j():.4g} J over "
          f"{config.epochs} epoch(s); saved {path}")
    return 0


def load_e2train(path: str):
    """(model in eval mode, saved dict) of an e2train.pt."""
    from pyeff.models import create_model
    from pyeff.train.checkpoint import read_checkpoint
    from pyeff.train.config import TrainConfig

    saved = read_checkpoint(path, what="E2-Train result", format=E2_FORMAT,
                            required=("settings", "config", "model", "num_classes", "in_channels", "energy"),
                            advice="give the e2train.pt written by pyeff e2train train")
    config = TrainConfig.from_dict(saved["config"])
    state = saved["model"]
    base = create_model(config.model, num_classes=saved["num_classes"], in_channels=saved["in_channels"])
    model, _ = recipe_from_settings(saved["settings"]).apply(base)
    model.load_state_dict(state)
    return model.eval(), saved


def eval_main(args) -> int:
    import torch

    from pyeff.data import BatchLoader, load_dataset
    from pyeff.e2train.energy_hook import format_energy_table
    from pyeff.energy import EnergyAccount, EnergyModel
    from pyeff.train.config import TrainConfig

    model, saved = load_e2train(args.checkpoint)
    config = TrainConfig.from_dict(saved["config"])
    test = load_dataset(config.dataset, "test", data_dir=args.data_dir)
    if args.test_subset and args.test_subset < len(test):
        test = test.subset(args.test_subset)
    correct = seen = 0
    with torch.no_grad():
        for x, y in BatchLoader(test, args.batch_size, shuffle=False, augment=False):
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            correct += int((logits.argmax(1) == y).sum())
            seen += y.shape[0]
    acct = EnergyAccount(EnergyModel.from_dict(saved["energy_model"]))
    acct.load_state_dict(saved["energy"])
    res = {"accuracy": correct / max(1, seen), "images": seen, "settings": saved["settings"],
           "training_energy_j": acct.energy_j(), "energy_table": acct.table()}
    print(f"{config.model} E2-Train on {config.dataset}: test accuracy {100 * res['accuracy']:.2f}% on {seen} images")
    print(f"training energy account ({res['training_energy_j']:.4g} J):")
    print(format_energy_table(res["energy_table"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2, default=str)
    return 0
