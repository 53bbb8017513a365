"""DDI ResNet-38 inference (eval, batch 128) at ~4x FLOP saving against the dense float32
ResNet-38 and against the papers' execution (every block on every sample, then masks).

    python bench/ddi.py [--quick] [--keep-memory]     (or: pyeff bench -k ddi)

Decisions are fixed per sample and block (a seeded draw at the stated execution rate and channel
density): what is measured is execution speed, not what a trained gate would pick. The gates still
run in every DDI timing (their cost is real). A budget row runs the untrained gates under
`set_budget(0.25)`, where the tightening (not the gates) decides what runs.
"""

import torch

from pyeff.bench import harness
from pyeff.ddi import convert
from pyeff.models import create_model

# (share of gated sample-blocks executed, share of inner channels active in an executed block)
MIXES = {
    "layers only (execute 20%)": (0.20, None),
    "layers + channel masks (execute 30%, channels 60%)": (0.30, 0.60),
    "layers + channel masks (execute 40%, channels 50%)": (0.40, 0.50),
}
# width mode: (share executed, the widths drawn uniformly from)
WIDTH_MIXES = {
    "layers + widths (execute 30%, widths 50/75%)": (0.30, (1, 2)),
    "layers + widths (execute 40%, widths 25/50/75%)": (0.40, (0, 1, 2)),
}


def _draw(net, batch, p_exec, channels=None, seed=0):
    """Seeded decisions: each sample-block executes with probability p_exec; `channels` is None (all
    on), a density (mask mode: each inner channel on with that probability) or a tuple of width
    indices (width mode: one drawn uniformly per sample)."""
    g = torch.Generator().manual_seed(seed)
    ex = torch.rand(batch, len(net.blocks), generator=g) < p_exec
    if channels is None:
        return ex, None
    if isinstance(channels, tuple):
        opts = torch.tensor(channels)
        return ex, [opts[torch.randint(0, len(opts), (batch,), generator=g)] for _ in net.blocks]
    return ex, [torch.rand(batch, b.width, generator=g) < channels for b in net.blocks]


QUARTER = list(MIXES)[1]  # ~25% FLOPs with layers and channels: the mix the targets name


def _setup(batch: int = 128):
    torch.manual_seed(0)
    dense = create_model("resnet38").eval()
    return dense, torch.randn(batch, 3, 32, 32), convert(dense).eval()


def _rows(net, x, draw):
    """rows(i, n=1): the net on samples i..i+n of x with their rows of the decisions `draw`."""
    ex, ch = draw

    def rows(i, n=1):
        with net.forced(execute=ex[i:i + n], channels=None if ch is None else [c[i:i + n] for c in ch]):
            return net(x[i:i + n])
    return rows


def ddi_quarter(batch: int = 128):
    """(net, fn): DDI at the QUARTER mix (batch 1: harness.REQUESTS requests in sequence)."""
    _, x, net = _setup(128)
    one = _rows(net, x, _draw(net, 128, *MIXES[QUARTER]))
    return net, (lambda: one(0, batch)) if batch > 1 else harness.requests(one)


def run(quick: bool = False, device: str = "cpu", out_dir=None, keep_memory: bool = False, compile: bool = True) -> list:
    harness.use_keep_memory(keep_memory)
    if device != "cpu":
        raise ValueError("bench/ddi.py measures the CPU engine; run it with --device cpu")
    batch = 128
    dense, x, net = _setup(batch)
    G = len(net.blocks)
    baselines = harness.dense_baselines(dense, x, "float32 ResNet-38", compile=compile)
    nchw = next(iter(baselines))

    wnet = convert(dense, channel_mode="width").eval()  # widths 25/50/75/100% of the inner channels

    def forced(ex, ch, mode="routed", net=net):
        def f():
            with net.forced(execute=ex, channels=ch), net.execution(mode):
                return net(x)
        return f

    def budget(b):
        def f():
            net.set_budget(b)
            try:
                return net(x)
            finally:
                net.set_budget(None)
        return f

    all_on = torch.ones(G, dtype=torch.bool)
    fns = {**baselines,
           "DDI, every block and channel on (gate + routing overhead)":
               forced(all_on, [torch.ones(batch, b.width, dtype=torch.bool) for b in net.blocks])}
    draws = {}
    for name, (pe, pc) in MIXES.items():
        draws[name] = _draw(net, batch, pe, pc)
        fns[f"DDI {name}"] = forced(*draws[name])
    for name, (pe, choices) in WIDTH_MIXES.items():
        fns[f"DDI {name}"] = forced(*_draw(wnet, batch, pe, choices), net=wnet)
    ref_mix = list(MIXES)[1]
    ref_name = f"papers' execution: every block, then masks ({ref_mix})"
    fns[ref_name] = forced(*draws[ref_mix], mode="masked")
    fns["DDI, untrained gates under set_budget(0.25) (greedy tightening)"] = budget(0.25)
    cost = {}
    with torch.no_grad():
        for name, f in fns.items():
            out = f()
            if isinstance(out, tuple):
                c = out[1]["cost"]
                cost[name] = (100 * float(c.mean()), 100 * float(c.max()))
        med = harness.interleaved_medians(fns, rounds=3 if quick else 9)
    t_dense = med[nchw]
    best_name, best_dense = harness.best_dense(med, baselines)
    t_ref = med[ref_name]
    rows = []
    for name, sec in med.items():
        mean_c, max_c = cost.get(name, (100.0, 100.0))
        rows.append({"execution": name, "batch": batch, "FLOPs % (mean)": mean_c, "FLOPs % (max sample)": max_c,
                     "ms / batch": sec * 1e3, "us / image": sec * 1e6 / batch,
                     "x vs dense NCHW": t_dense / sec, "x vs best dense": best_dense / sec,
                     "x vs papers' execution": t_ref / sec})
        print(rows[-1], flush=True)
    # batch 1: single-image requests, each with its own row of the QUARTER mix's decisions
    request = _rows(net, x, draws[QUARTER])
    with torch.no_grad():
        c1 = torch.cat([request(i)[1]["cost"] for i in range(harness.REQUESTS)])
    b1_name = f"DDI {QUARTER}, batch 1"
    rows1, best1 = harness.batch1_rows(
        dense, x, "float32 ResNet-38", {b1_name: request}, compile, rounds=5 if quick else 15,
        extra={b1_name: {"FLOPs % (mean)": 100 * float(c1.mean()), "FLOPs % (max sample)": 100 * float(c1.max())}})
    rows += rows1
    columns = ["execution", "batch", "FLOPs % (mean)", "FLOPs % (max sample)", "ms / batch", "us / image",
               "x vs dense NCHW", "x vs best dense", "x vs papers' execution"]
    harness.write_results(
        "ddi", "DDI ResNet-38 inference (batch 128 and batch 1, 32x32, eval)", rows, columns,
        {"device": device, "best dense": best_name, "best dense at batch 1": best1, "gated blocks": G, "cost unit": "FLOPs (conv + linear, multiply-add = 2)",
         "channel masks": "channel_mode='mask': any subset of inner channels per sample (pyeff.ops.masked_conv2d)",
         "widths": "channel_mode='width': the first 25/50/75/100% of the inner channels (importance-sorted), "
                   "dense convs on sliced weights, samples grouped by width"},
        out_dir, device, keep_memory=keep_memory,
        notes="Medians of round-robin timings (one call of each variant per round). Decisions fixed per sample and "
              "block (seeded draw at the stated rates); the gates still run. FLOPs % counts everything that ran "
              "(stem, first block, shortcuts, head) against the dense network; gate FLOPs (<0.1%) are not counted. "
              "x ...: speed-up over that row (higher is better), all measured in this run; best dense = the fastest dense "
              "row of the same batch size (NCHW, channels_last, BN folded, torch.compile of that with and without inductor "
              "freezing, and at batch 128 the folded and the frozen model in micro-batches of 32; compiled before timing); "
              f"batch 1: {harness.REQUESTS} single-image requests in sequence, each its own row of the mix, ms per request. "
              f"Targets: DDI {QUARTER} >= 2x the best dense at batch 128; not slower than the best dense at batch 1.")
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "shorter timings", "cpu only", keep_memory=True, compile=True)
    a = p.parse_args(argv)
    run(a.quick, a.device, a.out, a.keep_memory, a.compile)


if __name__ == "__main__":
    main()
