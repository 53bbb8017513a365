"""`pyeff ddi train|eval`: the DDI recipe and the evaluation of its result (with budgets). The train
options are generated from DDIRecipe (the recipe's settings) and DDIConfig (the conversion's)."""
from __future__ import annotations

import argparse
import json


def _budgets(text: str):
    try:
        vals = [float(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets takes comma-separated fractions such as 0.25,0.5,1, got {text!r}")
    if any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"budgets are fractions of the dense cost in (0, 1], got {text!r}")
    return vals


# option names kept from before the options were generated
FLAGS = {"dataset": ["--data", "--dataset"], "out_dir": ["--out"]}


def register(subparsers):
    from pyeff.config import add_config_args
    from pyeff.ddi.config import CHANNEL_MODES, TRAIN_MODES, UNITS, DDIConfig
    from pyeff.ddi.recipe import DDIRecipe

    p = subparsers.add_parser("ddi", help="DDI (dual dynamic inference): train and evaluate",
                              description="Dual dynamic inference: per-input layer and channel skipping, and "
                                          "budget-driven halting at early exits.")
    sub = p.add_subparsers(dest="ddi_command", metavar="{train,eval}")
    t = sub.add_parser("train", help="float net, then network + exits + gates toward the cost target",
                       description="(1) the float network (or --base-checkpoint); (2) convert, then network, "
                                   "exits, layer and channel gates together toward --target. Every setting is "
                                   "checked before phase 1.")
    add_config_args(t, DDIRecipe, title="recipe (pyeff.ddi.recipe.DDIRecipe)", flags=FLAGS,
                    help={"model": "zoo model (a CIFAR ResNet or DenseNet, or torchvision.resnet*); phase 1 "
                                   "trains it unless base_checkpoint is given",
                          "out_dir": "output folder (phase folders and ddi.pt)"})
    add_config_args(t, DDIConfig, title="conversion (pyeff.ddi.DDIConfig)", exclude=("input_size",),
                    choices={"cost": UNITS, "channel_mode": CHANNEL_MODES, "train_mode": TRAIN_MODES},
                    help={"cost": "the unit of the hinge and the budget (latency: timed on this machine; energy: "
                                  "the --energy-* unit costs in pJ)",
                          "channel_gates": "channel skipping (--no-channel-gates: layer skipping only)",
                          "layer_gates": "layer skipping (--no-layer-gates: channel skipping only)",
                          "exits": "early-exit classifiers after every stage but the last",
                          "gate_bias": "initial (skip, execute) logit bias of the layer gate",
                          "widths": "the per-sample widths of --channel-mode width, fractions of the inner "
                                    "channels",
                          "energy.mac_pj": "energy model: pJ per multiply-accumulate",
                          "energy.act_pj": "energy model: pJ per activation read or written",
                          "energy.weight_pj": "energy model: pJ per weight read"})
    t.set_defaults(func=train_main)
    e = sub.add_parser("eval", help="accuracy, cost, wall-clock vs the dense model, per-block statistics, budgets")
    e.add_argument("--checkpoint", required=True, help="ddi.pt written by pyeff ddi train")
    e.add_argument("--data-dir", default=None, help="directory of on-disk datasets (default: the dataset's own)")
    e.add_argument("--test-subset", type=int, default=None, help="evaluate on this many images (default: all)")
    e.add_argument("--batch-size", type=int, default=128, help="batch size, also of the timing (default: 128)")
    e.add_argument("--budgets", type=_budgets, default=None,
                   help="also evaluate under these budgets (fractions of the dense cost), e.g. 0.25,0.5,0.75 "
                        "(default: none)")
    e.add_argument("--retime", action="store_true",
                   help="re-measure a latency cost table on this machine (default: off)")
    e.add_argument("--time", type=float, default=2.0, help="seconds of timing per model (default: 2.0)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    e.set_defaults(func=eval_main)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    return p


def train_main(args) -> int:
    from pyeff.config import config_from_args
    from pyeff.ddi.config import DDIConfig
    from pyeff.ddi.recipe import DDIRecipe, train_ddi
    from pyeff.train.distributed import env_info

    recipe = config_from_args(DDIRecipe, args)
    config = config_from_args(DDIConfig, args)
    res = train_ddi(recipe, config)
    if not env_info().is_main:  # under torchrun every rank gets here; rank 0 speaks
        return 0
    last = res["history"]["phase2"][-1]
    print(f"DDI {recipe.model} on {recipe.dataset}, cost {config.cost}, target {recipe.target}%: test acc "
          f"{100 * last['test_acc']:.2f}%, cost {last['computation_pct']:.1f}%; saved {res['checkpoint']}")
    return 0


def evaluate(net, test_set, batch_size: int = 128, min_run_time: float = 2.0, budgets=None) -> dict:
    """Accuracy, cost %, per-block statistics and wall-clock per image against the dense network,
    without a budget and under each of `budgets`."""
    from pyeff.data import BatchLoader
    from pyeff.experiments.measure import latency_on

    loader = BatchLoader(test_set, batch_size, shuffle=False, augment=False)
    x = next(iter(BatchLoader(test_set, batch_size, shuffle=True, augment=False)))[0]
    with net.all_open():
        t_dense = latency_on(net, x, min_run_time)  # the dense network: every block and channel, no gates
    out = {"unit": net.table.unit, "dense_ms_per_image": t_dense, "runs": []}
    for b in [None] + list(budgets or []):
        net.set_budget(b)
        ev = net.evaluate(loader)
        ms = latency_on(net, x, min_run_time)
        out["runs"].append({"budget": b, **ev, "ms_per_image": ms, "speedup": t_dense / ms})
    net.set_budget(None)
    return out


def eval_main(args) -> int:
    from pyeff.data import load_dataset
    from pyeff.ddi.recipe import load_ddi

    net, meta = load_ddi(args.checkpoint)
    if args.retime and net.cost_unit == "latency":
        net.measure_costs("latency")
    test = load_dataset(meta["dataset"], "test", data_dir=args.data_dir)
    if args.test_subset and args.test_subset < len(test):
        test = test.subset(args.test_subset)
    res = evaluate(net, test, args.batch_size, args.time, args.budgets)
    print(f"{meta['model']} DDI on {meta['dataset']} (cost: {net.table.unit}); dense {res['dense_ms_per_image']:.3f} "
          f"ms / image (batch {args.batch_size})")
    print("| budget | exit | accuracy % | mean cost % | max sample cost % | ms / image | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        b = "none" if r["budget"] is None else f"{100 * r['budget']:.0f}%"
        print(f"| {b} | {r['halt_stage']} | {100 * r['accuracy']:.2f} | {r['cost_pct']:.1f} | {r['max_cost_pct']:.1f} "
              f"| {r['ms_per_image']:.3f} | {r['speedup']:.2f}x |")
    r0 = res["runs"][0]
    print("\nper gated block (no budget): execute rate / mean active channel fraction when executed")
    print(", ".join(f"{e:.2f}/{c:.2f}" for e, c in zip(r0["execute_rate"], r0["channel_fraction"])))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0
