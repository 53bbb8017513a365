"""`pyeff dfs train|eval`: the DFS recipe and the evaluation of its result."""
from __future__ import annotations

import argparse
import json

from pyeff.dfs.model import PAPER_BITS


def _bits(text: str):
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits takes comma-separated integers such as 0,8,16,32, got {text!r}")


def register(subparsers):
    from pyeff.dfs.recipe import DEFAULT_BETA
    from pyeff.train.cli import add_recipe_run_args

    p = subparsers.add_parser("dfs", help="DFS (dynamic fractional skipping): train and evaluate",
                              description="Dynamic fractional skipping: per sample and residual block, skip, "
                                          "quantise or run the block in full precision.")
    sub = p.add_subparsers(dest="dfs_command", metavar="{train,eval}")
    t = sub.add_parser("train", help="the 3-phase recipe: float net, gate toward 100%%, both toward the target",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = t.add_argument
    a("--model", default="resnet38", help="zoo model (a residual network)")
    a("--data", "--dataset", dest="dataset", default="shapes", help="dataset name")
    a("--data-dir", default=None, help="directory of on-disk datasets")
    a("--bits", type=_bits, default=PAPER_BITS, help="choices: 0 = skip, 2-16 bits, 32 = full precision")
    a("--target", type=float, default=25.0, help="target computation percentage (bit-product cost)")
    a("--beta", type=float, default=DEFAULT_BETA, help="weight of the cost term (paper: 1e-5 for 64k iterations)")
    a("--train-mode", choices=["all", "routed"], default="all",
      help="all = every candidate then mask (paper-exact gate gradients); routed = only the chosen path")
    a("--gate-epochs", type=int, default=1, help="phase 2 epochs (gate only, toward 100%%)")
    a("--dfs-epochs", type=int, default=5, help="phase 3 epochs (both, toward --target)")
    a("--gate-lr", type=float, default=0.01, help="phase 2 learning rate")
    a("--dfs-lr", type=float, default=0.02, help="phase 3 learning rate")
    add_recipe_run_args(a, "dfs")
    t.set_defaults(func=train_main)
    e = sub.add_parser("eval", help="accuracy, computation %%, wall-clock vs the dense model, decision stats",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="dfs.pt written by pyeff dfs train")
    e.add_argument("--data-dir", default=None, help="directory of on-disk datasets")
    e.add_argument("--test-subset", type=int, default=None, help="evaluate on this many images")
    e.add_argument("--batch-size", type=int, default=128, help="batch size (also of the timing)")
    e.add_argument("--time", type=float, default=2.0, help="seconds of timing per model")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(func=eval_main)
    p.set_defaults(func=lambda args: (p.print_help(), 1)[1])
    return p


def train_main(args) -> int:
    from pyeff.dfs.recipe import train_dfs

    res = train_dfs(args.model, args.dataset, bits=args.bits, target=args.target, beta=args.beta,
                    train_mode=args.train_mode, base_epochs=args.base_epochs, gate_epochs=args.gate_epochs,
                    dfs_epochs=args.dfs_epochs, lr=args.lr, gate_lr=args.gate_lr, dfs_lr=args.dfs_lr,
                    batch_size=args.batch_size, train_subset=args.train_subset, test_subset=args.test_subset,
                    data_dir=args.data_dir, seed=args.seed, device=args.device, out_dir=args.out,
                    base_checkpoint=args.base_checkpoint, threads=args.threads)
    last = res["history"]["phase3"][-1]
    print(f"DFS {args.model} on {args.dataset}, bits {args.bits}, target {args.target}%: test acc "
          f"{100 * last['test_acc']:.2f}%, computation {last['computation_pct']:.1f}%; saved {res['checkpoint']}")
    return 0


def evaluate(net, meta: dict, test_set, batch_size: int = 128, min_run_time: float = 2.0) -> dict:
    """Accuracy, computation %, decision statistics, and wall-clock per image of the DFS net
    against its dense float model (eval, batch `batch_size`, median of torch.utils.benchmark)."""
    from pyeff.data import BatchLoader
    from pyeff.experiments.measure import inference_latency, latency_on

    loader = BatchLoader(test_set, batch_size, shuffle=False, augment=False)
    stats = net.decision_stats(loader)
    dense = dense_model(net)
    shape = (batch_size,) + tuple(test_set.images.shape[1:])
    # time on real images: the gate's decisions (hence the work) depend on the input
    x = next(iter(BatchLoader(test_set, batch_size, shuffle=True, augment=False)))[0]
    t_dfs = latency_on(net, x, min_run_time)
    t_dense = inference_latency(dense, shape, min_run_time=min_run_time)["per_image_ms"]
    return {"accuracy_pct": 100 * stats.get("accuracy", float("nan")), "computation_pct": stats["computation_pct"],
            "dfs_ms_per_image": t_dfs, "dense_ms_per_image": t_dense, "speedup": t_dense / t_dfs, "stats": stats,
            "bits": list(net.bits), "model": meta.get("model"), "dataset": meta.get("dataset")}


def dense_model(net):
    """The dense float network inside a DFSNet (its blocks unwrapped, parameters shared)."""
    import copy

    from pyeff.dfs.block import DFSBlock

    dense = copy.deepcopy(net.model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, DFSBlock):
            parent_name, _, child = name.rpartition(".")
            parent = dense.get_submodule(parent_name) if parent_name else dense
            setattr(parent, child, m.block)
    return dense.eval()


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
