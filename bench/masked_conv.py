"""Benchmark of pyeff.ops.masked_conv2d (channel skipping) and pyeff.ops.run_on_subset (layer
skipping) on ResNet-CIFAR shapes (3x3 convs, C = K = 16 / 32 / 64 at 32 / 16 / 8 px, batch 128),
against the dense float32 conv (oneDNN) measured in the same run.

Baselines: "dense" is F.conv2d on the NCHW batch (what a model calls); "dense CL" is the same conv
on a channels_last batch (oneDNN's faster layout at these channel counts; the conversion is not
timed). Each pair is timed in alternation for several rounds; the reported times are the medians
over rounds, the ratios are the medians of the per-round ratios (robust on a shared machine).

    python bench/masked_conv.py [--quick]      (or: pyeff bench -k masked_conv)
"""
import os
import statistics
import time

import torch
import torch.nn.functional as F

from pyeff.bench import harness
from pyeff.ops import masked_conv2d, run_on_subset

SHAPES = [(16, 32), (32, 16), (64, 8)]
BATCH = 128
TARGETS = {"per-sample out 50%": 1.5, "per-sample out 25%": 2.5, "shared out 50%": 1.8}


def _cpu_seconds(fn, min_run_time: float) -> float:
    """Median CPU time (all threads of the process) of one call: on a machine shared with other
    jobs this counts the cycles the call used, not the time it waited for a core."""
    fn()
    times, total = [], 0.0
    while total < min_run_time or len(times) < 5:
        t0 = time.process_time()
        fn()
        dt = time.process_time() - t0
        times.append(dt)
        total += dt
    return statistics.median(times)


def _alternate(fns, device, rounds, min_run_time, cpu_time=False):
    """Seconds per call of each fn, measured in `rounds` alternating rounds: a list per fn."""
    per = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            per[i].append(_cpu_seconds(fn, min_run_time) if cpu_time
                          else harness.median_seconds(fn, device, min_run_time))
    return per


class BasicBlock(torch.nn.Module):
    """ResNet BasicBlock (conv-bn-relu-conv-bn + identity, relu)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


def _rand_mask(rows, cols, density, gen, device):
    return (torch.rand(rows, cols, generator=gen) < density).to(device)


def run(quick: bool = False, device: str = "cpu", out_dir=None, cpu_time: bool = False) -> list:
    rounds = 1 if quick else 3
    mrt = 0.2 if quick else 0.4
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for c, px in SHAPES:
            x = torch.randn(BATCH, c, px, px, generator=gen).to(device)
            w = torch.randn(c, c, 3, 3, generator=gen).to(device)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            flops = 2 * BATCH * px * px * c * c * 9
            shared = torch.zeros(c, dtype=torch.bool)
            shared[torch.randperm(c, generator=gen)[: c // 2]] = True
            cases = [
                ("per-sample out 50%", None, _rand_mask(BATCH, c, 0.5, gen, device)),
                ("per-sample out 25%", None, _rand_mask(BATCH, c, 0.25, gen, device)),
                ("shared out 50%", None, shared.to(device)),
                ("per-sample in 50% + out 50%", _rand_mask(BATCH, c, 0.5, gen, device),
                 _rand_mask(BATCH, c, 0.5, gen, device)),
                ("per-sample in 50% + out 25%", _rand_mask(BATCH, c, 0.5, gen, device),
                 _rand_mask(BATCH, c, 0.25, gen, device)),
                ("all on", None, torch.ones(BATCH, c, dtype=torch.bool, device=device)),
            ]
            for name, im, om in cases:
                fns = [lambda: F.conv2d(x, w, padding=1),
                       lambda: F.conv2d(x_cl, w, padding=1),
                       lambda im=im, om=om: masked_conv2d(x, w, padding=1, in_mask=im, out_mask=om)]
                (t_d, t_cl, t_m) = _alternate(fns, device, rounds, mrt, cpu_time)
                ratio = statistics.median(a / b for a, b in zip(t_d, t_m))
                ratio_cl = statistics.median(a / b for a, b in zip(t_cl, t_m))
                active = float(om.float().mean()) * (1.0 if im is None else float(im.float().mean()))
                target = TARGETS.get(name)
                tm = statistics.median(t_m)
                rows.append({
                    "shape": f"C=K={c} {px}x{px}", "masks": name, "active work": f"{active:.0%}",
                    "dense ms": statistics.median(t_d) * 1e3, "dense CL ms": statistics.median(t_cl) * 1e3,
                    "pyeff ms": tm * 1e3, "x dense": ratio, "x dense CL": ratio_cl,
                    "pyeff GFLOP/s (useful)": flops * active / tm / 1e9,
                    "target": f">= {target}x" if target else "",
                    "met": ("yes" if ratio >= target else "no") if target else "",
                })
                print(rows[-1], flush=True)

        # layer skipping: a BasicBlock executed by a fraction f of the batch
        block = BasicBlock(16).to(device).eval()
        x = torch.randn(BATCH, 16, 32, 32, generator=gen).to(device)
        for f in (0.0, 0.25, 0.5, 0.75, 1.0):
            keep = torch.zeros(BATCH, dtype=torch.bool)
            keep[torch.randperm(BATCH, generator=gen)[: round(f * BATCH)]] = True
            keep = keep.to(device)
            t_d, t_s = _alternate([lambda: block(x), lambda keep=keep: run_on_subset(block, x, keep)],
                                  device, rounds, mrt, cpu_time)
            rel = statistics.median(s / d for s, d in zip(t_s, t_d))
            rows.append({
                "shape": "BasicBlock C=16 32x32", "masks": f"skip: f={f:g} execute",
                "active work": f"{f:.0%}", "dense ms": statistics.median(t_d) * 1e3,
                "pyeff ms": statistics.median(t_s) * 1e3, "x dense": 1 / rel,
                "time / dense": rel, "target": f"<= {f + 0.1:.2f} x dense",
                "met": "yes" if rel <= f + 0.1 else "no",
            })
            print(rows[-1], flush=True)

    columns = ["shape", "masks", "active work", "dense ms", "dense CL ms", "pyeff ms", "x dense",
               "x dense CL", "time / dense", "pyeff GFLOP/s (useful)", "target", "met"]
    harness.write_results(
        "masked_conv", f"masked_conv2d and layer skipping, float32, batch {BATCH}, {device}", rows, columns,
        {"device": device, "rounds": rounds,
         "timing": "process CPU time (summed over threads) per call" if cpu_time else "wall time per call",
         "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "unset"),
         "baselines": "dense = F.conv2d on NCHW (oneDNN); dense CL = F.conv2d on channels_last input; "
                      "skip rows: the dense BasicBlock in eval mode"},
        out_dir, device,
        notes="x dense: speed-up over the dense conv measured in the same run (median of per-round "
              "ratios, higher is better). Targets are against the NCHW dense conv. Layer-skip target: "
              "time <= (f + 0.1) x the dense block. Random masks are Bernoulli per (sample, channel). "
              "On a machine shared with other jobs use --cpu-time --threads 1; with glibc's default "
              "malloc, batch-sized scatter outputs can pay first-touch page faults (see docs/masked_conv.md).")
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "one round, shorter timing")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with process CPU time instead of wall time (for a machine shared with other jobs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.quick, a.device, a.out, a.cpu_time)


if __name__ == "__main__":
    main()
