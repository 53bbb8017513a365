"""Experiment registry and `pyeff reproduce`.

A method package registers its headline comparison with a decorator:

    from pyeff.experiments import register_experiment

    @register_experiment("dfs", "DFS vs. dense ResNet-38 on shapes: accuracy against FLOPs")
    def run(out_dir, quick, data_dir=None, seed=0, **overrides) -> dict:
        ...
        return {"summary": {...}, "table": [{...}, ...], "plots": ["curves.png"], "notes": "..."}

and is found either through EXPERIMENT_MODULES or, with no edit here, by living in
`pyeff/<package>/experiment.py` (or `experiments.py`).

The returned dict may hold (all optional):
    summary: {name: value}          headline numbers, shown in the overview table
    table:   [{column: value}, ...] one table, or
    tables:  [{"title": str, "rows": [{column: value}, ...]}, ...]
    plots:   [path, ...]             PNGs, absolute or relative to out_dir; embedded in the report
                                     (linked relative to report.md, so the report folder can move)
    notes:   Markdown text
    claims:  [{"claim": str, "paper": str, "measured": str, "holds": bool or None}, ...]
             the paper's claims and what this run measured; rendered first (see `claim`)
Everything returned is also saved to results.json. `quick=True` is a smoke-test preset that
should finish within minutes on a 2-core CPU (measured: baseline ~1.5 min, dfs 287 s, ddi 512 s);
keyword overrides (from `--set key=value`) let tests shrink a run further.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

# Modules that register experiments when imported, in report order. Method packages may also
# just provide pyeff/<package>/experiment.py, found by discover().
EXPERIMENT_MODULES = ["pyeff.experiments.baseline"]


@dataclass
class Experiment:
    name: str
    description: str
    fn: Callable
    module: str
    claims: Optional[Callable] = None  # claims(result) -> the claim rows, from the result alone


_REGISTRY: dict[str, Experiment] = {}
_LOAD_ERRORS: dict[str, str] = {}
_DISCOVERED = False


def register_experiment(name: str, description: str, claims: Optional[Callable] = None):
    """Decorator: register `fn(out_dir, quick, data_dir=None, seed=0, **overrides) -> dict`.
    `claims(result) -> [claim(...), ...]` judges the paper's claims from a result alone: run after
    the experiment (filling result["claims"]) and again by `rerender`, so that a report follows a
    corrected rule without rerunning the experiment."""
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"experiment names must be non-empty without spaces, got {name!r}")

    def deco(fn):
        old = _REGISTRY.get(name)
        if old is not None and (old.module, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"experiment {name!r} is already registered by {old.module}")
        _REGISTRY[name] = Experiment(name, description, fn, fn.__module__, claims)
        return fn

    return deco


def _candidate_modules() -> list:
    mods = list(EXPERIMENT_MODULES)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the pyeff package
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        entries = []
    for pkg in entries:
        if pkg.startswith(("_", ".")) or pkg == "experiments":
            continue
        for mod in ("experiment", "experiments"):
            if os.path.isfile(os.path.join(root, pkg, f"{mod}.py")):
                mods.append(f"pyeff.{pkg}.{mod}")
    return list(dict.fromkeys(mods))


def discover(force: bool = False) -> dict:
    """Import every experiment module once; returns {module: error} for those that failed."""
    global _DISCOVERED
    if _DISCOVERED and not force:
        return dict(_LOAD_ERRORS)
    for mod in _candidate_modules():
        try:
            importlib.import_module(mod)
            _LOAD_ERRORS.pop(mod, None)
        except Exception as exc:  # noqa: BLE001  (one broken package must not hide the others)
            _LOAD_ERRORS[mod] = f"{type(exc).__name__}: {exc}"
    _DISCOVERED = True
    return dict(_LOAD_ERRORS)


def list_experiments() -> list:
    discover()
    return list(_REGISTRY.values())


def get_experiment(name: str) -> Experiment:
    discover()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        msg = f"unknown experiment {name!r}; known experiments: {known}"
        if _LOAD_ERRORS:
            msg += "; modules that failed to load: " + "; ".join(
                f"{m} ({e})" for m, e in _LOAD_ERRORS.items())
        raise ValueError(msg)
    return _REGISTRY[name]


def gap_text(ref: float, value: float) -> str:
    """'k points below' / 'k points above': value against the reference, for claim tables."""
    d = ref - value
    return f"{abs(d):.1f} points {'below' if d >= 0 else 'above'}"


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def claim(text: str, paper: str, measured: str, holds) -> dict:
    """One row of a report's claim table: the paper's claim (briefly), the paper's own figure, the
    measured counterpart, and whether it holds here (None: not testable in this run)."""
    return {"claim": text, "paper": paper, "measured": measured, "holds": holds}


def equal_cost_comparison(ours, theirs, cost: str, slack, acc: str = "accuracy %") -> tuple[list, list]:
    """(wins, losses) of our points against theirs at equal cost, as pairs (ours, theirs): a win is
    one of our points costing at most slack(their cost) with at least their accuracy; a loss is one
    of theirs costing at most slack(our cost) with more accuracy than ours. `slack(c)`: the largest
    cost still "equal" to c (a cost hinge reaches its target only approximately)."""
    wins = [(o, t) for o in ours for t in theirs if o[cost] <= slack(t[cost]) and o[acc] >= t[acc]]
    losses = [(o, t) for o in ours for t in theirs if t[cost] <= slack(o[cost]) and t[acc] > o[acc]]
    return wins, losses


def beats_everywhere(ours, theirs, cost: str, slack, acc: str = "accuracy %") -> bool:
    """True when every point of theirs is matched by a win of ours and no point of theirs beats one of
    ours at equal cost (see equal_cost_comparison)."""
    wins, losses = equal_cost_comparison(ours, theirs, cost, slack, acc)
    beaten = {id(t) for _, t in wins}
    return bool(theirs) and not losses and all(id(t) in beaten for t in theirs)


def equal_cost_text(ours, theirs, cost: str, slack, names=("ours", "theirs"), acc: str = "accuracy %",
                    label=None) -> str:
    """The claim table's 'measured' text for an equal-cost comparison: for each of their points, our
    cheapest point that matches it (or none), then every loss. `label`: a column naming their points."""
    wins, losses = equal_cost_comparison(ours, theirs, cost, slack, acc)

    def pt(r, who, lab=None):
        return f"{who}{' ' + str(r[lab]) if lab else ''} {r[acc]:.1f}% at {r[cost]:.0f}%"
    parts = []
    for t in theirs:
        mine = [o for o, tt in wins if tt is t]
        parts.append(f"{pt(min(mine, key=lambda r: r[cost]), names[0])} >= {pt(t, names[1], label)}" if mine
                     else f"nothing of {names[0]} at <= {slack(t[cost]):.0f}% reaches {pt(t, names[1], label)}")
    parts += [f"LOSS: {pt(o, names[0])} < {pt(t, names[1], label)}" for o, t in losses]
    return "; ".join(parts) or "no points to compare"


def near_dense_claim(text: str, paper: str, points, cost: str, level: float, dense_acc: float, max_gap: float,
                     at_level, unit: str = "%", acc: str = "accuracy %"):
    """The claim "within `max_gap` points of dense at about `level`": judged on the point nearest
    to `level` (None when there is no point), which must also satisfy `at_level(cost)`."""
    p = min(points, key=lambda r: abs(r[cost] - level), default=None)
    if p is None:
        return None
    return claim(text, paper, f"{p[acc]:.1f}% at {p[cost]:.0f}{unit} vs dense {dense_acc:.1f}% "
                              f"({gap_text(dense_acc, p[acc])})",
                 bool(at_level(p[cost])) and dense_acc - p[acc] <= max_gap)


def _claims_table(claims) -> str:
    rows = [{"claim": c["claim"], "paper": c.get("paper", ""), "measured here": c.get("measured", ""),
             "holds here": {True: "**yes**", False: "**no**"}.get(c.get("holds"), "not tested")} for c in claims]
    return markdown_table(rows)


def markdown_table(rows) -> str:
    """A Markdown table from a list of dicts (columns in first-seen order)."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _call(exp: Experiment, out_dir, quick, data_dir, seed, overrides):
    if overrides:
        params = inspect.signature(exp.fn).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        bad = [k for k in overrides if k not in params and not takes_any]
        if bad:
            ok = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY]
            raise ValueError(f"experiment {exp.name!r} does not take {', '.join(bad)}; "
                             f"it takes: {', '.join(ok) or 'no overrides'}")
    return exp.fn(out_dir, quick, data_dir=data_dir, seed=seed, **overrides)


def run_experiments(names=None, out_dir=None, quick=False, data_dir=None, seed=0, overrides=None,
                    command=None, stream=sys.stdout) -> dict:
    """Run experiments (all when `names` is empty) and write out_dir/report.md + results.json.

    A failing experiment is recorded in the report (with its traceback) and the others still
    run. Returns {"report": path, "results": {name: result}, "failed": [names]}.
    """
    discover()
    exps = [get_experiment(n) for n in names] if names else list(_REGISTRY.values())
    if not exps:
        raise ValueError("no experiments are registered")
    out_dir = out_dir or os.path.join("runs", "reproduce-" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out_dir, exist_ok=True)
    from pyeff.experiments.measure import machine_info

    results, failed, walls = {}, [], {}
    t_all = time.perf_counter()
    for exp in exps:
        sub = os.path.join(out_dir, exp.name)
        os.makedirs(sub, exist_ok=True)
        print(f"== {exp.name}: {exp.description}", file=stream, flush=True)
        t0 = time.perf_counter()
        try:
            res = _call(exp, sub, quick, data_dir, seed, overrides or {})
            if not isinstance(res, dict):
                raise TypeError(f"experiment {exp.name!r} returned {type(res).__name__}, "
                                "not a dict")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001  (record it, run the rest)
            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            failed.append(exp.name)
            print(f"   FAILED: {res['error']}", file=stream, flush=True)
        if exp.claims is not None and "error" not in res:
            res["claims"] = exp.claims(_jsonable(res))
        walls[exp.name] = time.perf_counter() - t0
        res["wall_time_s"] = walls[exp.name]
        results[exp.name] = res
        print(f"   {exp.name} took {walls[exp.name]:.1f}s", file=stream, flush=True)
    total = time.perf_counter() - t_all
    machine = machine_info()
    report = _render_report(exps, results, out_dir, quick, machine, total, command)
    report_path = os.path.join(out_dir, "report.md")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(report)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_jsonable({"machine": machine, "quick": quick, "seed": seed, "command": command,
                             "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_time_s": total,
                             "experiments": results}), f, indent=2)
    return {"report": report_path, "results": results, "failed": failed}


def rerender(out_dir: str) -> str:
    """Rewrite out_dir/report.md (and results.json) from out_dir/results.json, judging each
    experiment's claims again with its current `claims` rule; nothing is rerun. Returns the report."""
    discover()
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        results = saved["experiments"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a results.json that pyeff reproduce wrote ({exc})") from None
    exps = [get_experiment(n) for n in results]
    for exp in exps:
        if exp.claims is not None and "error" not in results[exp.name]:
            results[exp.name]["claims"] = exp.claims(results[exp.name])
    command = saved.get("command")
    report = _render_report(exps, results, out_dir, saved.get("quick", False), saved.get("machine", {}),
                            saved.get("wall_time_s", 0.0), command, generated=saved.get("generated"),
                            rerendered=True)
    report_path = os.path.join(out_dir, "report.md")
    with open(report_path, "w", encoding="utf-8") as f:
        f.write(report)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable(saved), f, indent=2)
    return report_path


def _report_link(path: str, exp_dir: str, report_dir: str) -> str:
    """The link from report_dir/report.md to a plot an experiment returned: `path` is absolute or
    relative to its exp_dir (the contract), or, when only that exists, relative to the working
    directory (os.path.join(out_dir, name) with a relative out_dir, an easy slip)."""
    if not os.path.isabs(path):
        in_exp = os.path.join(exp_dir, path)
        path = path if not os.path.exists(in_exp) and os.path.exists(path) else in_exp
    # forward slashes: a Markdown link, not an OS path
    return os.path.relpath(path, report_dir).replace(os.sep, "/")


def _render_report(exps, results, out_dir, quick, machine, total, command, generated=None,
                   rerendered=False) -> str:
    L = ["# pyeff reproduce report", ""]
    L.append(f"Generated {generated or time.strftime('%Y-%m-%d %H:%M:%S')}"
             + (f" by `{command}`" if command else "") + f"; mode: **{'quick' if quick else 'full'}**;"
             f" total wall time {total:.1f} s."
             + (f" Re-rendered {time.strftime('%Y-%m-%d %H:%M:%S')} from its results.json (claims judged "
                "again by the current rules; nothing rerun)." if rerendered else ""))
    L.append("")
    if quick:
        L += ["> **Smoke test, not evidence.** `--quick` trains small networks on a subset for minutes so "
              "that CI can run every experiment; its accuracy columns are noise. The evidence is the "
              "default mode (`pyeff reproduce NAME`, see docs/reproduce.md).", ""]
    mrow = {"CPU": machine.get("cpu"), "cores": machine.get("cpu_count"),
            "torch threads": machine.get("torch_threads"), "torch": machine.get("torch")}
    if "gpu" in machine:
        mrow["GPU"] = machine["gpu"]
    if "pyeff_extension" in machine:
        mrow["pyeff._C"] = machine["pyeff_extension"]
    L += ["## Machine", "", markdown_table([mrow]), "## Overview", ""]
    overview = []
    for exp in exps:
        res = results[exp.name]
        row = {"experiment": f"[{exp.name}](#{exp.name})",
               "status": "FAILED" if "error" in res else "ok",
               "wall time (s)": res["wall_time_s"]}
        overview.append(row)
    L += [markdown_table(overview)]
    for exp in exps:
        res = results[exp.name]
        L += [f"## {exp.name}", "", exp.description, ""]
        if "error" in res:
            L += [f"**Failed:** {res['error']}", "", "```", res["traceback"].rstrip(), "```", ""]
            continue
        if res.get("claims"):
            L += ["**The paper's claims, measured here**", "", _claims_table(res["claims"])]
        if res.get("summary"):
            L += ["| metric | value |", "|---|---|"]
            L += [f"| {k} | {_fmt(v)} |" for k, v in res["summary"].items()]
            L.append("")
        tables = list(res.get("tables", []))
        if res.get("table"):
            tables.insert(0, {"title": None, "rows": res["table"]})
        for t in tables:
            if t.get("title"):
                L += [f"**{t['title']}**", ""]
            L += [markdown_table(t.get("rows", [])), ""]
        for p in res.get("plots", []):
            rel = _report_link(p, os.path.join(out_dir, exp.name), out_dir)
            L += [f"![{exp.name}: {os.path.basename(p)}]({rel})", ""]
        if res.get("notes"):
            L += [res["notes"].rstrip(), ""]
        L += [f"_Wall time: {res['wall_time_s']:.1f} s._", ""]
    return "\n".join(L)


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "reproduce", help="run the papers' headline experiments and write a Markdown report",
        description="Run registered experiments (all when no NAME is given) at small scale on the "
                    "embedded data; write <out>/report.md with a table per experiment, the plots, "
                    "the machine and the wall time, plus results.json.")
    p.add_argument("names", nargs="*", metavar="NAME", help="experiments to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="smoke-test presets for CI, minutes each on 2 CPU cores; their reports are "
                        "labelled 'smoke test, not evidence' (default: off: the evidence presets, "
                        "each experiment within an hour on 2 CPU cores; see docs/reproduce.md)")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/reproduce-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--data-dir", default=None,
                   help="directory of on-disk datasets (default: each dataset's own)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pass a keyword override to every selected experiment, e.g. "
                        "--set epochs=1 (repeatable) (default: none)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.add_argument("--rerender", metavar="DIR", default=None,
                   help="rewrite DIR/report.md from DIR/results.json, judging the claims again with the "
                        "current rules; nothing is rerun (default: off)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    if args.rerender:
        print(f"report: {rerender(args.rerender)}")
        return 0
    if args.list:
        for exp in list_experiments():
            print(f"{exp.name:16s} {exp.description}")
        for mod, err in _LOAD_ERRORS.items():
            print(f"(failed to load {mod}: {err})", file=sys.stderr)
        return 0
    overrides = {}
    for item in args.overrides:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip().replace("-", "_")] = _parse_value(v.strip())
    names = list(dict.fromkeys(args.names))
    for n in names:  # fail before any work for a typo
        get_experiment(n)
    cmd = " ".join(["pyeff reproduce", *names] + (["--quick"] if args.quick else [])
                   + (["--seed", str(args.seed)] if args.seed else [])
                   + [f"--set {o}" for o in args.overrides])
    out = run_experiments(names, args.out, args.quick, args.data_dir, args.seed, overrides,
                          command=cmd)
    print(f"report: {out['report']}")
    if out["failed"]:
        print(f"failed: {', '.join(out['failed'])} (see the report)", file=sys.stderr)
        return 1
    return 0
