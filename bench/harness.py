"""Timing and reporting shared by pyeff's benchmarks: medians after warm-up, ratios against a
baseline measured in the same run, the machine, and JSON + Markdown files per machine kind."""
import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    info = {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_slug(device: str = "cpu") -> str:
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_model()
    name = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*$", "", name)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def median_seconds(fn, device: str = "cpu", min_run_time: float = 0.5) -> float:
    """Median time of one call of `fn`, warm-up excluded."""
    if device.startswith("cuda"):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=max(100, int(min_run_time * 1000)), return_mode="median") / 1e3
    import torch.utils.benchmark as tbench  # imported here: it drags in cpp_extension and its warnings

    fn()  # warm-up (lazy initialisation, caches)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: str = "cpu", nbytes: int = 256 << 20) -> float:
    """Bytes per second of a large copy, counting bytes read plus bytes written: the ceiling a
    memory-bound kernel is measured against."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), device)
    return 2 * nbytes / t


def write_results(name: str, title: str, rows: list, columns: list, meta: dict, out_dir=None,
                  device: str = "cpu", notes: str = "", keep_memory: bool = False) -> tuple[Path, Path]:
    """Write `<name>-<machine>.json` and `.md` under out_dir (default: ./bench/results);
    `<name>-keep-memory-<machine>` for a --keep-memory run."""
    if keep_memory:
        name += "-keep-memory"
    meta = {"malloc": "keeps freed memory (--keep-memory)" if keep_memory else "the process default", **meta}
    out = Path(out_dir or os.environ.get("PYEFF_BENCH_OUT", "bench/results"))
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{machine_slug(device)}"
    payload = {"benchmark": name, "machine": machine(device), **meta, "rows": rows}
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, json_path)
    lines = [f"# {title}", ""]
    m = payload["machine"]
    lines.append(f"Machine: {m.get('gpu', m['cpu'])}; {m['threads']} CPU threads; torch {m['torch']}; {m['date']}.")
    for k, v in meta.items():
        lines.append(f"{k}: {v}.")
    if notes:
        lines += ["", notes]
    lines += ["", markdown_table(rows, columns)]
    tmp = md_path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md_path)
    return json_path, md_path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: list, columns: list) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def interleaved_medians(fns: dict, rounds: int, settle: int = 0) -> dict:
    """Median seconds per call of each fn, timed round-robin (one call of each per round, after a
    warm-up round) so that load from other processes on a shared machine hits every variant alike
    and the ratios stay meaningful. `settle` untimed calls precede each timed one, so a variant is
    timed in its own steady state rather than right after another variant freed (and the allocator
    returned to the OS) buffers it then has to fault in again."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(settle):
                f()
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# the dense network as a user would deploy it: one builder, shared with `pyeff reproduce`
from pyeff.experiments.measure import (DENSE_CL, DENSE_COMPILED, DENSE_FOLDED, DENSE_NCHW,  # noqa: E402,F401
                                       dense_baselines)


def best_dense(medians: dict, baselines: dict) -> tuple[str, float]:
    """(row name, seconds) of the fastest dense baseline row measured in this run."""
    name = min(baselines, key=lambda k: medians[k])
    return name, medians[name]


REQUESTS = 16  # batch-1 latency: this many single-image requests in sequence, the mean per request


def requests(fn_of_row, n: int = REQUESTS):
    """A callable serving `n` single-image requests in sequence (`fn_of_row(i)` serves request i,
    e.g. row i of a batch with its own decisions): its time / n is the batch-1 latency."""
    def f():
        for i in range(n):
            fn_of_row(i)
    return f


def batch1_rows(dense, x, label: str, dynamic: dict, compile: bool, rounds: int, extra: dict | None = None) -> tuple:
    """Batch-1 latency of every dense deployment variant of `dense` (on x[:1]) and of each
    `dynamic` {name: fn_of_row} (REQUESTS requests in sequence), timed round-robin. Returns (rows,
    best dense row name): ms per request and the ratios against the NCHW and the best dense."""
    base = dense_baselines(dense, x[:1], f"{label}, batch 1", compile=compile)
    fns = {k: requests(lambda i, f=f: f()) for k, f in base.items()}
    fns.update({k: requests(f) for k, f in dynamic.items()})
    with torch.no_grad():
        med = interleaved_medians(fns, rounds=rounds, settle=1)
    nchw = next(iter(base))
    best_name, best = best_dense(med, base)
    rows = []
    for name, sec in med.items():
        ms = sec * 1e3 / REQUESTS
        rows.append({"execution": name, "batch": 1, "ms / batch": ms, "us / image": 1e3 * ms,
                     "x vs dense NCHW": med[nchw] / sec, "x vs best dense": best / sec, **(extra or {}).get(name, {})})
        print(rows[-1], flush=True)
    return rows, best_name


def use_keep_memory(keep: bool) -> None:
    """--keep-memory: glibc's malloc keeps freed memory for the rest of the process
    (pyeff.runtime.keep_freed_memory), for every variant of the run alike."""
    from pyeff.runtime import keep_freed_memory

    if keep and not keep_freed_memory():
        raise RuntimeError("--keep-memory needs glibc's mallopt")


def parser(doc: str, quick_help: str, devices: str = "cpu or cuda", keep_memory: bool = False,
           compile: bool = False):
    """The command line every benchmark script shares: --quick, --device, --out (and
    --keep-memory, --no-compile where the script has them)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", default="cpu", help=devices)
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    if keep_memory:
        p.add_argument("--keep-memory", action="store_true",
                       help="glibc malloc keeps freed memory (no page faults for big tensors); results go to "
                            "<name>-keep-memory-<machine> files")
    if compile:
        p.add_argument("--no-compile", dest="compile", action="store_false",
                       help="leave out the torch.compile dense baseline (its compilation takes minutes on 2 cores)")
    return p
