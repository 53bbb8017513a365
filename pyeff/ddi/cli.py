"""`pyeff ddi train|eval`: the DDI recipe and the evaluation of its result (with budgets)."""
from __future__ import annotations

import argparse
import json


def _budgets(text: str):
    try:
        vals = [float(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets takes comma-separated fractions such as 0.25,0.5,1, got {text!r}")
    if any(not 0 < v for v in vals):
        raise argparse.ArgumentTypeError(f"budgets are fractions of the dense cost (> 0), got {text!r}")
    return vals


def register(subparsers):
    from pyeff.ddi.costs import UNITS
    from pyeff.ddi.recipe import DEFAULT_BETA, DEFAULT_EXIT_WEIGHT
    from pyeff.train.cli import add_recipe_run_args

    p = subparsers.add_parser("ddi", help="DDI (dual dynamic inference): train and evaluate",
                              description="Dual dynamic inference: per-input layer and channel skipping, and "
                                          "budget-driven halting at early exits.")
    sub = p.add_subparsers(dest="ddi_command", metavar="{train,eval}")
    t = sub.add_parser("train", help="float net, then network + exits + gates toward the cost target",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = t.add_argument
    a("--model", default="resnet38", help="zoo model (a CIFAR ResNet or DenseNet, or torchvision.resnet*)")
    a("--data", "--dataset", dest="dataset", default="shapes", help="dataset name")
    a("--data-dir", default=None, help="directory of on-disk datasets")
    a("--cost", choices=UNITS, default="flops", help="the cost the hinge targets (latency: timed on this machine)")
    a("--target", type=float, default=25.0, help="target cost, percent of the dense network")
    a("--beta", type=float, default=DEFAULT_BETA, help="weight of the cost term")
    a("--exit-weight", type=float, default=DEFAULT_EXIT_WEIGHT, help="weight of each early exit's loss")
    a("--no-channel-gates", action="store_true", help="layer skipping only")
    a("--no-layer-gates", action="store_true", help="channel skipping only")
    a("--channel-mode", choices=["mask", "width"], default="mask",
      help="mask = any subset of inner channels per sample; width = a per-sample width (25/50/75/100%%), "
           "run as dense convs on sliced weights")
    a("--ddi-epochs", type=int, default=5, help="phase 2 epochs (network, exits and gates)")
    a("--ddi-lr", type=float, default=0.02, help="phase 2 learning rate")
    add_recipe_run_args(a, "ddi")
    t.set_defaults(func=train_main)
    e = sub.add_parser("eval", help="accuracy, cost, wall-clock vs the dense model, per-block statistics, budgets",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="ddi.pt written by pyeff ddi train")
    e.add_argument("--data-dir", default=None, help="directory of on-disk datasets")
    e.add_argument("--test-subset", type=int, default=None, help="evaluate on this many images")
    e.add_argument("--batch-size", type=int, default=128, help="batch size (also of the timing)")
    e.add_argument("--budgets", type=_budgets, default=None,
                   help="also evaluate under these budgets (fractions of the dense cost), e.g. 0.25,0.5,0.75")
    e.add_argument("--retime", action="store_true", help="re-measure a latency cost table on this machine")
    e.add_argument("--time", type=float, default=2.0, help="seconds of timing per model")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(func=eval_main)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    return p


def train_main(args) -> int:
    from pyeff.ddi.recipe import train_ddi

    res = train_ddi(args.model, args.dataset, cost=args.cost, target=args.target, beta=args.beta,
                    exit_weight=args.exit_weight, channel_gates=not args.no_channel_gates,
                    layer_gates=not args.no_layer_gates, channel_mode=args.channel_mode,
                    base_epochs=args.base_epochs, ddi_epochs=args.ddi_epochs,
                    lr=args.lr, ddi_lr=args.ddi_lr, batch_size=args.batch_size, train_subset=args.train_subset,
                    test_subset=args.test_subset, data_dir=args.data_dir, seed=args.seed, device=args.device,
                    out_dir=args.out, base_checkpoint=args.base_checkpoint, threads=args.threads)
    last = res["history"]["phase2"][-1]
    print(f"DDI {args.model} on {args.dataset}, cost {args.cost}, target {args.target}%: test acc "
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
