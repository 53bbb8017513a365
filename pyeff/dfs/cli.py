"""`pyeff dfs train|eval`: the DFS recipe and the evaluation of its result. The train options are
generated from DFSRecipe (the recipe's settings) and DFSConfig (the conversion's)."""
from __future__ import annotations

import json

# option names kept from before the options were generated
FLAGS = {"dataset": ["--data", "--dataset"], "out_dir": ["--out"]}


def register(subparsers):
    from pyeff.config import add_config_args
    from pyeff.dfs.config import TRAIN_MODES, DFSConfig
    from pyeff.dfs.recipe import DFSRecipe

    p = subparsers.add_parser("dfs", help="DFS (dynamic fractional skipping): train and evaluate",
                              description="Dynamic fractional skipping: per sample and residual block, skip, "
                                          "quantise or run the block in full precision.")
    sub = p.add_subparsers(dest="dfs_command", metavar="{train,eval}")
    t = sub.add_parser("train", help="the 3-phase recipe: float net, gate toward 100%%, both toward the target",
                       description="(1) the float network (or --base-checkpoint); (2) convert, train the gate "
                                   "alone toward 100% computation; (3) network and gate toward --target. "
                                   "Every setting is checked before phase 1.")
    add_config_args(t, DFSRecipe, title="recipe (pyeff.dfs.recipe.DFSRecipe)", flags=FLAGS,
                    help={"out_dir": "output folder (phase folders and dfs.pt)"})
    add_config_args(t, DFSConfig, title="conversion (pyeff.dfs.DFSConfig)", choices={"train_mode": TRAIN_MODES},
                    help={"bits": "the gate's choices, comma-separated ascending: 0 = skip, 2-16 = the residual "
                                  "branch quantised to that many bits, 32 = full precision",
                          "gate_bias": "initial logit bias per choice of the gate (one per bit width; none: "
                                       "favour the widest choice); negative values as --gate-bias=-1,0,2"})
    t.set_defaults(func=train_main)
    e = sub.add_parser("eval", help="accuracy, computation %%, wall-clock vs the dense model, decision stats")
    e.add_argument("--checkpoint", required=True, help="dfs.pt written by pyeff dfs train")
    e.add_argument("--data-dir", default=None, help="directory of on-disk datasets (default: the dataset's own)")
    e.add_argument("--test-subset", type=int, default=None, help="evaluate on this many images (default: all)")
    e.add_argument("--batch-size", type=int, default=128, help="batch size, also of the timing (default: 128)")
    e.add_argument("--time", type=float, default=2.0, help="seconds of timing per model (default: 2.0)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    e.set_defaults(func=eval_main)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    return p


def train_main(args) -> int:
    from pyeff.config import config_from_args
    from pyeff.dfs.config import DFSConfig
    from pyeff.dfs.recipe import DFSRecipe, train_dfs
    from pyeff.train.distributed import env_info

    recipe = config_from_args(DFSRecipe, args)
    config = config_from_args(DFSConfig, args)
    res = train_dfs(recipe, config)
    if not env_info().is_main:  # under torchrun every rank gets here; rank 0 speaks
        return 0
    last = res["history"]["phase3"][-1]
    print(f"DFS {recipe.model} on {recipe.dataset}, bits {config.bits}, target {recipe.target}%: test acc "
          f"{100 * last['test_acc']:.2f}%, computation {last['computation_pct']:.1f}%; saved {res['checkpoint']}")
    return 0


def evaluate(net, meta: dict, test_set, batch_size: int = 128, min_run_time: float = 2.0) -> dict:
    """Accuracy, computation %, decision statistics, and wall-clock per image of the DFS net
    against its dense float model (eval, batch `batch_size`, median of torch.utils.benchmark)."""
    from pyeff.data import BatchLoader
    from pyeff.experiments.measure import inference_latency, latency_on

    loader = BatchLoader(test_set, batch_size, shuffle=False, augment=False)
    stats = net.decision_stats(loader)
    dense = net.to_dense()
    shape = (batch_size,) + tuple(test_set.images.shape[1:])
    # time on real images: the gate's decisions (hence the work) depend on the input
    x = next(iter(BatchLoader(test_set, batch_size, shuffle=True, augment=False)))[0]
    t_dfs = latency_on(net, x, min_run_time)
    t_dense = inference_latency(dense, shape, min_run_time=min_run_time)["per_image_ms"]
    return {"accuracy_pct": 100 * stats.get("accuracy", float("nan")), "computation_pct": stats["computation_pct"],
            "dfs_ms_per_image": t_dfs, "dense_ms_per_image": t_dense, "speedup": t_dense / t_dfs, "stats": stats,
            "bits": list(net.bits), "model": meta.get("model"), "dataset": meta.get("dataset")}


def stats_table(stats: dict) -> list:
    rows = []
    for name, counts in zip(stats["blocks"], stats["counts"]):
        n = max(sum(counts), 1)
        rows.append({"block": name, **{(f"{b} bits" if b else "skip"): f"{100 * c / n:.0f}%"
                                       for b, c in zip(stats["bits"], counts)}})
    return rows


def eval_main(args) -> int:
    from pyeff.data import load_dataset
    from pyeff.dfs.recipe import load_dfs
    from pyeff.experiments import markdown_table

    net, meta = load_dfs(args.checkpoint)
    test = load_dataset(meta["dataset"], "test", data_dir=args.data_dir)
    if args.test_subset and args.test_subset < len(test):
        test = test.subset(args.test_subset)
    res = evaluate(net, meta, test, args.batch_size, args.time)
    print(f"{meta['model']} DFS on {meta['dataset']} (bits {tuple(net.bits)}): accuracy {res['accuracy_pct']:.2f}%, "
          f"computation {res['computation_pct']:.1f}%")
    print(f"wall-clock per image (batch {args.batch_size}): DFS {res['dfs_ms_per_image']:.3f} ms, dense float "
          f"{res['dense_ms_per_image']:.3f} ms ({res['speedup']:.2f}x)")
    print()
    print(markdown_table(stats_table(res["stats"])))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)
    return 0
