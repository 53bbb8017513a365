"""pyeff's benchmarks (installed as pyeff.bench): `pyeff bench [--quick] [-k NAME] [--device D]`.

Each module has `run(quick, device, out_dir) -> rows` and runs alone with
`python bench/<name>.py`. Results land in bench/results/ as JSON and Markdown, one file per
benchmark and machine."""
import importlib

BENCHMARKS = ["fake_quant", "masked_conv", "quant_conv", "quant_conv_space", "dfs", "ddi", "breakdown", "e2train", "earlybird"]


def register(subparsers):
    p = subparsers.add_parser("bench", help="run the benchmarks and write bench/results/")
    p.add_argument("--quick", action="store_true", help="fewer sizes, for a smoke run")
    p.add_argument("-k", dest="select", default=None, help="run the benchmarks whose name contains this")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.set_defaults(func=main)


def main(args) -> int:
    names = [n for n in BENCHMARKS if args.select is None or args.select in n]
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    if not names:
        raise ValueError(f"no benchmark matches {args.select!r}; known: {', '.join(BENCHMARKS)}")
    for name in names:
        print(f"== {name}")
        importlib.import_module(f"pyeff.bench.{name}").run(args.quick, args.device, args.out)
    return 0
