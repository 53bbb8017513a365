"""Where the time of a dynamic network's forward goes: the torch profiler's CPU op times sorted
into what the work is (gate, grouping, gathers and scatters, float / integer / masked convs,
quantisers, element-wise ops), and the rest of the wall time (Python and dispatch).

    python bench/breakdown.py [--quick]        (or: pyeff bench -k breakdown)

DFS mix B and DDI at ~25% FLOPs on ResNet-38, batch 128 and batch 1. A second table
(`ceiling-<machine>`) times, at batch 128, each forward against the same work with deciding and
routing taken away: the ceiling of executing per group with these kernels.

Used by bench/dfs.py and bench/ddi.py for their breakdown tables. The gate and the router's
steps are marked as profiler scopes only while profiling (hooks and wrappers put on here and
taken off after), so the timed runs carry no instrumentation.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from pyeff.bench import harness

# op name -> category, by prefix (first match); an op inside a scope takes the scope's category
OP_CATEGORIES = (
    ("onednn::qconv", "integer conv"), ("pyeff::quant_conv_quantize", "quantise activations"),
    ("pyeff::quant_conv", "integer conv"), ("pyeff::masked_conv", "masked conv"),
    ("aten::mkldnn_convolution", "float conv"), ("mkldnn::_convolution", "float conv"),
    ("aten::_slow_conv2d", "float conv"), ("aten::thnn_conv", "float conv"), ("aten::_nnpack", "float conv"),
    ("aten::index_select", "gather / scatter"), ("aten::index_copy", "gather / scatter"),
    ("aten::cat", "gather / scatter"),
    ("aten::add", "element-wise"), ("aten::clamp", "element-wise"), ("aten::relu", "element-wise"),
    ("aten::mul", "element-wise"), ("aten::copy_", "element-wise"), ("aten::fill_", "element-wise"),
    ("aten::addcmul", "element-wise"), ("aten::rsqrt", "element-wise"), ("aten::sub", "element-wise"),
    ("aten::native_batch_norm", "element-wise"),
)
SCOPES = {"pyeff.gate": "gate", "pyeff.grouping": "grouping", "pyeff.gather": "gather / scatter",
          "pyeff.scatter": "gather / scatter"}
CATEGORIES = ("gate", "grouping", "gather / scatter", "float conv", "integer conv", "quantise activations",
              "masked conv", "element-wise", "other ops", "Python and dispatch (wall - ops)")


def _category(name: str) -> str:
    for prefix, cat in OP_CATEGORIES:
        if name.startswith(prefix):
            return cat
    return "other ops"


@contextlib.contextmanager
def _scopes(net: nn.Module):
    """Profiler scopes around the gates (forward hooks) and the router's grouping, gather and
    scatter (module functions wrapped), removed on exit."""
    from pyeff.dynamic import router
    from pyeff.dynamic.gates import ChannelGate, RecurrentGate, WidthGate

    handles, saved = [], {}
    for m in net.modules():
        if isinstance(m, (RecurrentGate, ChannelGate, WidthGate)):
            def pre(mod, args, m=m):
                mod._pyeff_rf = torch.profiler.record_function("pyeff.gate")
                mod._pyeff_rf.__enter__()

            def post(mod, args, out):
                mod._pyeff_rf.__exit__(None, None, None)
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    for fname, scope in (("group_indices", "pyeff.grouping"), ("gather_rows", "pyeff.gather"),
                         ("scatter_rows_", "pyeff.scatter")):
        f = saved[fname] = getattr(router, fname)

        def wrapped(*a, f=f, scope=scope, **k):
            with torch.profiler.record_function(scope):
                return f(*a, **k)
        setattr(router, fname, wrapped)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for fname, f in saved.items():
            setattr(router, fname, f)


def breakdown(fn, net: nn.Module, rounds: int = 10) -> dict:
    """{category: ms per call} of fn() (a forward of `net`), plus "wall" (median ms unprofiled).
    Op times are self CPU times under the profiler; "Python and dispatch" is the unprofiled wall
    time minus every op's time (the profiler's own cost inflates the ops a little, so this is a
    lower bound)."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        wall = harness.median_seconds(fn) * 1e3
        with _scopes(net), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                fn()
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for e in prof.events():
        if e.name in SCOPES:
            continue
        cat, p = None, e.cpu_parent
        while p is not None:
            if p.name in SCOPES:
                cat = SCOPES[p.name]
            p = p.cpu_parent
        totals[cat or _category(e.name)] += e.self_cpu_time_total / 1e3 / rounds
    totals["Python and dispatch (wall - ops)"] = max(0.0, wall - sum(totals.values()))
    return {"wall": wall, **totals}


def rows_of(label: str, b: dict) -> list:
    """Table rows (one per category with time) of a `breakdown` result."""
    rows = []
    for cat in CATEGORIES:
        if b[cat] > 0.005:
            rows.append({"forward": label, "part": cat, "ms": b[cat], "% of wall": 100 * b[cat] / b["wall"]})
    rows.append({"forward": label, "part": "wall (unprofiled median)", "ms": b["wall"], "% of wall": 100.0})
    return rows


def compute_only(compile: bool = True, rounds: int = 15) -> list:
    """The measured ceiling of per-group execution at batch 128: each net's whole forward against
    the same work with deciding and routing taken away (the static stem and first block, plus each
    block's executed paths run on groups gathered beforehand: no gate, grouping, gather or scatter),
    all beside the dense deployment variants, round-robin in one run."""
    from pyeff.bench.ddi import MIXES, QUARTER, _draw, _rows as ddi_rows, convert as ddi_convert
    from pyeff.bench.dfs import _rows as dfs_rows, _setup
    from pyeff.dynamic.modules import module_inputs
    from pyeff.dynamic.router import gather_rows, group_indices

    def inputs_of(n, forward):  # each block's input, channels_last (copies: skips write in place)
        with torch.no_grad():
            got = module_inputs(n.blocks, forward, clone=True)
        return [(blk, got[blk].contiguous(memory_format=torch.channels_last)) for blk in n.blocks]

    dense, x, net, dec = _setup(128)
    x = x.contiguous(memory_format=torch.channels_last)
    d = dec["B (skip/8/32)"]
    dfs_full = lambda: dfs_rows(net, x, d)(0, 128)  # noqa: E731
    work = []  # (block, choice, its group's input)
    for i, (blk, x_in) in enumerate(inputs_of(net, dfs_full)):
        for k, idx in enumerate(group_indices(d[:, i], len(blk.bits))):
            if idx is not None and blk.bits[k] != 0:
                work.append((blk, k, gather_rows(x_in, idx)))

    dnet = ddi_convert(dense).eval()
    ex, ch = _draw(dnet, 128, *MIXES[QUARTER])
    ddi_full = lambda: ddi_rows(dnet, x, (ex, ch))(0, 128)  # noqa: E731
    dwork = []  # (block, its executed samples' input, their channel masks)
    for i, (blk, x_in) in enumerate(inputs_of(dnet, ddi_full)):
        idx = ex[:, i].nonzero().flatten()
        if idx.numel():
            dwork.append((blk, gather_rows(x_in, idx), ch[i].index_select(0, idx)))

    def static(n):
        return lambda: n.model.layer1[0](n.model.stem(x))
    base = harness.dense_baselines(dense, x, "float32 ResNet-38", compile=compile)
    fns = {**base,
           "DFS mix B: whole forward": dfs_full, "DFS mix B: static stem + first block": static(net),
           "DFS mix B: executed paths on groups gathered beforehand":
               lambda: [blk.paths("engine")[k](xg) for blk, k, xg in work],
           f"DDI {QUARTER}: whole forward": ddi_full, f"DDI {QUARTER}: static stem + first block": static(dnet),
           f"DDI {QUARTER}: executed paths on groups gathered beforehand":
               lambda: [blk.exec_path(xg, None, h, False, None) for blk, xg, h in dwork]}
    with torch.no_grad():
        med = harness.interleaved_medians(fns, rounds=rounds, settle=1)
    best_name, best = harness.best_dense(med, base)
    rows = [{"execution": k, "ms / batch": v * 1e3, "x vs best dense": best / v} for k, v in med.items()]
    for label in ("DFS mix B", f"DDI {QUARTER}"):
        t = med[f"{label}: static stem + first block"] + med[f"{label}: executed paths on groups gathered beforehand"]
        rows.append({"execution": f"{label}: ceiling without deciding and routing (static + paths)",
                     "ms / batch": t * 1e3, "x vs best dense": best / t})
    for r in rows:
        print(r, flush=True)
    return rows, best_name


def run(quick: bool = False, device: str = "cpu", out_dir=None) -> list:
    from pyeff.bench.ddi import QUARTER, ddi_quarter
    from pyeff.bench.dfs import dfs_mix_b

    if device != "cpu":
        raise ValueError("bench/breakdown.py profiles the CPU engine; run it with --device cpu")
    rows = []
    for batch in (128, 1):
        for label, make in (("DFS mix B (skip/8/32)", dfs_mix_b), (f"DDI {QUARTER}", ddi_quarter)):
            net, fn = make(batch)
            b = breakdown(fn, net, rounds=3 if quick else 10)
            what = f"{label}, batch {batch}" if batch > 1 else f"{label}, batch 1 ({harness.REQUESTS} requests)"
            rows += rows_of(what, b if batch > 1 else {k: v / harness.REQUESTS for k, v in b.items()})
            print(rows[-1], flush=True)
    harness.write_results("breakdown", "Where a DFS / DDI ResNet-38 forward spends its time (eval, 32x32)", rows,
                          ["forward", "part", "ms", "% of wall"], {"device": device}, out_dir, device,
                          notes="Self CPU op times under torch.profiler, sorted by what the op does; an op inside "
                                "the gate or the router's grouping / gather / scatter counts there. Python and "
                                "dispatch = unprofiled median wall time - all op times (a lower bound: the profiler "
                                "inflates the ops). Batch 1: ms per request.")
    ceiling, best_name = compute_only(compile=not quick, rounds=3 if quick else 15)
    harness.write_results("ceiling", "DFS / DDI ResNet-38 at batch 128 without deciding and routing: the ceiling of "
                          "per-group execution", ceiling, ["execution", "ms / batch", "x vs best dense"],
                          {"device": device, "best dense": best_name}, out_dir, device,
                          notes="Round-robin medians in one run. 'executed paths on groups gathered beforehand' runs, "
                                "for every gated block, the chosen paths on their samples gathered outside the timing "
                                "(no gate, grouping, gather, scatter or block bookkeeping); with the static stem and "
                                "first block it is what the forward would cost if deciding and routing were free. The "
                                "head (pool + linear) is left out of both (it is under 0.1 ms).")
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "fewer profiled rounds", "cpu only")
    a = p.parse_args(argv)
    run(a.quick, a.device, a.out)


if __name__ == "__main__":
    main()
