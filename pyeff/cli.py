"""The `pyeff` command. Each subcommand lives in its own module and registers itself here."""
import argparse
import importlib
import sys

# subcommand -> module with `register(subparsers)`; imported lazily so `pyeff info` stays fast
COMMANDS = {
    "info": "pyeff.info",
    "train": "pyeff.train.cli",
    "reproduce": "pyeff.experiments",
    "bench": "pyeff.bench",
    "dfs": "pyeff.dfs.cli",
    "ddi": "pyeff.ddi.cli",
    "e2train": "pyeff.e2train.cli",
    "earlybird": "pyeff.earlybird.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyeff",
        description="Efficient deep learning with real, measured savings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as exc:
        # bad input from the user: say what is wrong without a traceback (bugs keep theirs)
        sub = getattr(args, f"{args.command}_command", None)  # e.g. `pyeff dfs train`
        print(f"pyeff {args.command}{' ' + sub if sub else ''}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
