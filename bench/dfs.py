"""DFS ResNet-38 inference (eval, batch 128) at a ~25% computation setting against the dense float32
ResNet-38 and against the reference-style execution (every candidate path on every sample, then
the one-hot mask, quantised paths fake-quantised in float32, as the paper's code runs).

    python bench/dfs.py [--quick] [--keep-memory]      (or: pyeff bench -k dfs)

The decisions are fixed per sample and block (drawn once, seeded, from a distribution over the
choices whose mean bit-product cost is ~25%): what is measured is execution speed, not what a
trained gate would pick. The gate still runs in every DFS timing (its cost is real).
"""

import torch

from pyeff.bench import harness
from pyeff.dfs import convert
from pyeff.dynamic import masked_all_paths
from pyeff.models import create_model

BITS = (0, 4, 8, 16, 32)
PAPER_BITS = (0, 8, 10, 12, 14, 16, 32)  # the reference baseline computes every one of these
PAPER = "paper's bit set (0, 8, 10, 12, 14, 16, 32)"
# share of sample-blocks per choice (skip, 4, 8, 16, 32), both at ~25% mean bit-product cost:
MIXES = {
    "A (every choice)": (0.35, 0.10, 0.25, 0.10, 0.20),  # 0.1/64 + 0.25/16 + 0.1/4 + 0.2 = 24.2%
    "B (skip/8/32)": (0.50, 0.00, 0.27, 0.00, 0.23),     # 0.27/16 + 0.23 = 24.7%
}


def reference_forward(net, x):
    """The paper's execution, written here only: each gated block computes every candidate (skip,
    each bit width fake-quantised in float32, float) for every sample and masks."""
    saved = []
    for blk in net.blocks:
        def execute(xx, decisions, weights=None, training=False, execution="routed", inplace=False, blk=blk):
            return masked_all_paths(xx, decisions, blk.paths("fake", blk.shortcut(xx)), weights)
        saved.append(blk.execute)
        blk.execute = execute
    try:
        return net(x)
    finally:
        for blk, ex in zip(net.blocks, saved):
            blk.execute = ex


def _ref(net, d, x):
    with net.fixed_decisions(d):
        return reference_forward(net, x)


def _setup(batch: int = 128):
    """(dense ResNet-38, input batch, DFS net calibrated on it, {mix: [N, G] decisions}), seeded."""
    torch.manual_seed(0)
    dense = create_model("resnet38").eval()
    x = torch.randn(batch, 3, 32, 32)
    net = convert(dense, bits=BITS).eval()
    net.calibrate([x])
    G = len(net.blocks)
    g = torch.Generator().manual_seed(0)
    dec = {name: torch.multinomial(torch.tensor(mix), batch * G, replacement=True, generator=g).view(batch, G)
           for name, mix in MIXES.items()}
    return dense, x, net, dec


def _rows(net, x, d):
    """rows(i, n=1): the net on samples i..i+n of x with their rows of the decisions d."""
    def rows(i, n=1):
        with net.fixed_decisions(d[i:i + n]):
            return net(x[i:i + n])
    return rows


def dfs_mix_b(batch: int = 128):
    """(net, fn): DFS at mix B on a channels_last batch (batch 1: harness.REQUESTS requests in sequence)."""
    _, x, net, dec = _setup(128)
    one = _rows(net, x.contiguous(memory_format=torch.channels_last), dec["B (skip/8/32)"])
    return net, (lambda: one(0, batch)) if batch > 1 else harness.requests(one)


def run(quick: bool = False, device: str = "cpu", out_dir=None, keep_memory: bool = False, compile: bool = True) -> list:
    harness.use_keep_memory(keep_memory)
    if device != "cpu":
        raise ValueError("bench/dfs.py measures the CPU engine; run it with --device cpu")
    batch = 128
    dense, x, net, dec = _setup(batch)
    G = len(net.blocks)
    xcl = x.contiguous(memory_format=torch.channels_last)
    baselines = harness.dense_baselines(dense, x, "float32 ResNet-38", compile=compile)
    nchw = next(iter(baselines))

    def fixed(d, xx, dfs=net):
        def f():
            with dfs.fixed_decisions(d):
                return dfs(xx)
        return f

    fns = {**baselines, "DFS, every block full precision (gate + routing overhead)": fixed([len(BITS) - 1] * G, x)}
    pct = {}
    for name, d in dec.items():
        fns[f"DFS mix {name}, NCHW input"] = fixed(d, x)
        fns[f"DFS mix {name}, channels_last input"] = fixed(d, xcl)
        with torch.no_grad(), net.fixed_decisions(d):
            pct[name] = 100 * float(net(x)[1]["cost"].mean())
    ref_name = "reference-style: all candidates + mask (mix A)"
    fns[ref_name] = lambda: _ref(net, dec["A (every choice)"], x)
    # the same mix B on a net with the paper's bit set, against that set's reference execution
    net_p = convert(dense, bits=PAPER_BITS).eval()
    net_p.calibrate([x])
    to_paper = torch.tensor([PAPER_BITS.index(b) if b in PAPER_BITS else -1 for b in BITS])  # mix B: skip/8/32
    d_p = to_paper[dec["B (skip/8/32)"]]
    mix_b_paper = f"DFS mix B (skip/8/32), NCHW input, {PAPER}"
    ref_paper = f"reference-style: all candidates + mask, {PAPER}"
    fns[mix_b_paper] = fixed(d_p, x, net_p)
    fns[ref_paper] = lambda: _ref(net_p, d_p, x)
    with torch.no_grad(), net_p.fixed_decisions(d_p):
        pct_paper = 100 * float(net_p(x)[1]["cost"].mean())
    with torch.no_grad():
        med = harness.interleaved_medians(fns, rounds=3 if quick else 9, settle=2)
    t_dense = med[nchw]
    best_name, best_dense = harness.best_dense(med, baselines)
    t_ref = med[ref_name]
    rows = []
    for name, sec in med.items():
        mix = next((m for m in dec if m in name), None)
        full = "full" in name or "dense" in name
        comp = f"{pct_paper:.1f}" if name == mix_b_paper else (f"{pct[mix]:.1f}" if mix else ("100" if full else "-"))
        rows.append({"execution": name, "batch": batch, "computation %": comp,
                     "ms / batch": sec * 1e3, "us / image": sec * 1e6 / batch,
                     "x vs dense NCHW": t_dense / sec, "x vs best dense": best_dense / sec,
                     "x vs reference": (med[ref_paper] if PAPER in name else t_ref) / sec})
        print(rows[-1], flush=True)
    # batch 1: single-image requests, each with its own row of mix B's decisions
    request = _rows(net, xcl, dec["B (skip/8/32)"])
    with torch.no_grad():
        pct1 = 100 * float(torch.stack([request(i)[1]["cost"] for i in range(harness.REQUESTS)]).mean())
    b1_name = "DFS mix B (skip/8/32), batch 1"
    rows1, best1 = harness.batch1_rows(dense, x, "float32 ResNet-38", {b1_name: request}, compile,
                                       rounds=5 if quick else 15, extra={b1_name: {"computation %": f"{pct1:.1f}"}})
    rows += rows1
    columns = ["execution", "batch", "computation %", "ms / batch", "us / image", "x vs dense NCHW", "x vs best dense",
               "x vs reference"]
    harness.write_results(
        "dfs", "DFS ResNet-38 inference (batch 128 and batch 1, 32x32, eval)", rows, columns,
        {"device": device, "best dense": best_name, "best dense at batch 1": best1, "bit set": f"{BITS} (rows marked otherwise: {PAPER_BITS})",
         "decision mixes (share of sample-blocks per choice skip/4/8/16/32)": "; ".join(
             f"{k}: {v}" for k, v in MIXES.items()),
         "gated blocks": G},
        out_dir, device, keep_memory=keep_memory,
        notes="Medians of round-robin timings (per round, two untimed then one timed call of each variant). Decisions fixed per sample and block (seeded draw from the mix above), the gate still runs. "
              "x ...: speed-up over that row (higher is better), all measured in this run; best dense = the fastest "
              "dense row of the same batch size (NCHW, channels_last, BN folded, torch.compile of that with and without inductor freezing, "
              "and at batch 128 the folded and the frozen model in micro-batches of 32; compiled before timing); batch 1: "
              f"{harness.REQUESTS} single-image requests in sequence (DFS: each its own row of mix B), ms per request; x vs reference = against the reference-style execution of the same bit set "
              "(the rows marked with the paper's bit set against its own reference). Targets: mix B >= 2x the best dense at batch 128, not slower than the best dense at batch 1, >= 10x the "
              "reference-style execution.")
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "shorter timings", "cpu only", keep_memory=True, compile=True)
    a = p.parse_args(argv)
    run(a.quick, a.device, a.out, a.keep_memory, a.compile)


if __name__ == "__main__":
    main()
