"""quant_conv2d across the shape space (CPU): each convolution class x batch x layout x bit width,
every exact route of the native backend timed in the same run against F.conv2d on the same input.

    python bench/quant_conv_space.py [--quick]          (or: pyeff bench -k quant_conv_space)

Shape classes: dense 3x3, grouped (4 groups), depthwise, 1x1, strided (3x3 stride 2), dilated (3x3
dilation 2), tiny planes (2 px), a large plane (64 px); batch 1 and 128 (large plane: 1 and 16);
NCHW and channels_last input; 4, 8, 12 and 16 bits (weights and activations alike).
Columns: F.conv2d's time; each route's time ("-" where the route is not exact for the operands,
e.g. direct above 8 bits); the route the automatic choice takes ("auto") and its time; ratios
auto / F.conv2d and auto / the fastest route. pyeff's times include the whole call (min-max,
quantisation, integer convolution, epilogue), with the weight forms kept in a WeightPacks as a
layer keeps them.
"""
import os

import torch
import torch.nn.functional as F

from pyeff.bench import harness
from pyeff.ops import quant_conv2d
from pyeff.ops.packs import WeightPacks
from pyeff.ops.quant_conv import native, routes

# (class, C, K, H, kernel, stride, padding, dilation, groups, batches)
SHAPES = [
    ("dense 3x3", 64, 64, 16, 3, 1, 1, 1, 1, (1, 128)),
    ("grouped 3x3 (4 groups)", 64, 64, 16, 3, 1, 1, 1, 4, (1, 128)),
    ("depthwise 3x3", 64, 64, 16, 3, 1, 1, 1, 64, (1, 128)),
    ("1x1", 64, 64, 16, 1, 1, 0, 1, 1, (1, 128)),
    ("strided 3x3 s2", 64, 128, 16, 3, 2, 1, 1, 1, (1, 128)),
    ("dilated 3x3 d2", 64, 64, 16, 3, 1, 2, 2, 1, (1, 128)),
    ("tiny plane 2px", 64, 64, 2, 3, 1, 1, 1, 1, (1, 128)),
    ("large plane 64px", 16, 16, 64, 3, 1, 1, 1, 1, (1, 16)),
]
QUICK_SHAPES = ("dense 3x3", "depthwise 3x3", "1x1")
BITS = (4, 8, 12, 16)
ROUTE_NAMES = ("direct", "sliced", "gemm", "depthwise", "float")


def _targets(row: dict, name: str, C: int, groups: int) -> str:
    """The issue's targets that apply to this row, each 'met' or 'MISSED': at most 3x F.conv2d
    everywhere; 8/8 faster than F.conv2d on dense and 1x1 convs with >= 16 channels."""
    ratio = row["auto / F.conv2d"]
    out = [f"<= 3x F.conv2d: {'met' if ratio <= 3 else 'MISSED'}"]
    if row["bits"] == 8 and groups == 1 and C >= 16 and name.startswith(("dense", "1x1")):
        out.append(f"8/8 faster than F.conv2d: {'met' if ratio < 1 else 'MISSED'}")
    return "; ".join(out)


def _why(row: dict, floor_ms: float) -> str:
    """Where a target is missed, what bounds the row (from the row's own measurements): the fixed
    cost of a call, the quantiser's passes, or the exact wide products."""
    if "MISSED" not in row["targets"]:
        return ""
    f, auto, q = row["F.conv2d ms"], row["auto ms"], row["quantise ms"]
    if auto < 2.5 * floor_ms:
        return f"fixed cost: a call costs >= {floor_ms:.2f} ms (tiny conv), {floor_ms / f:.1f}x F.conv2d here"
    if q / f > 0.5:
        return f"quantiser: range + digits alone {q / f:.1f}x F.conv2d (memory-bound conv)"
    if row["bits"] > 8:
        return "wide operands: exact products as 4 int8 slice products (or float64), float64 epilogue"
    return "int8 conv itself slower than F.conv2d here"


def _route_fn(x, w, kw, bits, packs, route):
    """A closure running quant_conv2d with `route` forced, and the route that actually ran (a route
    the operands cannot take exactly falls back to the automatic choice)."""
    def call():
        return quant_conv2d(x, w, None, **kw, w_bits=bits, a_bits=bits, packs=packs, backend="native")

    old = os.environ.get(routes.CPU_PATH_ENV)
    os.environ[routes.CPU_PATH_ENV] = route
    try:
        with routes.tracing() as calls:
            call()
        ran = calls[-1]["route"]
    finally:
        if old is None:
            os.environ.pop(routes.CPU_PATH_ENV)
        else:
            os.environ[routes.CPU_PATH_ENV] = old

    def fn():
        os.environ[routes.CPU_PATH_ENV] = route
        try:
            return call()
        finally:
            if old is None:
                os.environ.pop(routes.CPU_PATH_ENV, None)
            else:
                os.environ[routes.CPU_PATH_ENV] = old
    return fn, ran


def _floor_ms() -> float:
    """The fixed cost of one quant_conv2d call: a 1x16x4x4 input, 3x3 weights, 8 bits."""
    x, w, packs = torch.randn(1, 16, 4, 4), torch.randn(16, 16, 3, 3), WeightPacks()
    t = harness.interleaved_medians({"floor": lambda: quant_conv2d(x, w, None, padding=1, packs=packs,
                                                                   backend="native")}, rounds=50, settle=5)
    return 1e3 * t["floor"]


def run(quick: bool = False, device: str = "cpu", out_dir=None) -> list:
    if device != "cpu":
        raise ValueError("quant_conv_space times the native CPU routes; run it with --device cpu")
    torch.manual_seed(0)
    rows = []
    floor_ms = _floor_ms()
    shapes = [s for s in SHAPES if not quick or s[0] in QUICK_SHAPES]
    for name, C, K, H, k, s, p, d, g, batches in shapes:
        for N in (batches[:1] if quick else batches):
            for layout in ("NCHW", "channels_last"):
                x = torch.randn(N, C, H, H)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                w = torch.randn(K, C // g, k, k) * 0.1
                kw = dict(stride=s, padding=p, dilation=d, groups=g)
                for bits in (BITS[1:2] if quick else BITS):
                    packs = WeightPacks()
                    fns = {"F.conv2d": lambda x=x, w=w, kw=kw: F.conv2d(x, w, None, **kw)}
                    ran = {}
                    for r in ROUTE_NAMES + ("auto",):
                        fn, ran[r] = _route_fn(x, w, kw, bits, packs, r)
                        if r == "auto" or ran[r] == r:  # time a route only where it runs as itself
                            fns[r] = fn
                    fns["quantise"] = lambda x=x, bits=bits: native.quantize(x, bits, None)
                    t = harness.interleaved_medians(fns, rounds=5 if quick else 9, settle=1)
                    best = min((r for r in ROUTE_NAMES if r in t), key=t.get)
                    row = {"class": name, "N": N, "C->K": f"{C}->{K}", "plane": f"{H}px", "layout": layout,
                           "bits": bits, "F.conv2d ms": 1e3 * t["F.conv2d"]}
                    for r in ROUTE_NAMES:
                        row[f"{r} ms"] = 1e3 * t[r] if r in t else "-"
                    row.update({"auto": ran["auto"], "auto ms": 1e3 * t["auto"], "fastest": best,
                                "auto / F.conv2d": t["auto"] / t["F.conv2d"], "auto / fastest": t["auto"] / t[best]})
                    row["quantise ms"] = 1e3 * t["quantise"]
                    row["quantise / F.conv2d"] = t["quantise"] / t["F.conv2d"]
                    row["targets"] = _targets(row, name, C, g)
                    row["why missed"] = _why(row, floor_ms)
                    rows.append(row)
                    print(row, flush=True)
    columns = ["class", "N", "C->K", "plane", "layout", "bits", "F.conv2d ms"] + [f"{r} ms" for r in ROUTE_NAMES] \
        + ["auto", "auto ms", "fastest", "auto / F.conv2d", "auto / fastest", "quantise ms", "quantise / F.conv2d",
           "targets", "why missed"]
    missed = [r for r in rows if "MISSED" in r["targets"]]
    print(f"targets missed in {len(missed)} of {len(rows)} rows", flush=True)
    harness.write_results(
        "quant_conv_space", "quant_conv2d across the shape space (CPU)", rows, columns,
        {"device": device, "baseline": "F.conv2d (float32) on the same input and layout",
         "timing": "medians, round-robin over the variants of a row (bench/harness.interleaved_medians)"},
        out_dir, device,
        notes=f"The fixed cost of a call (quant_conv2d on a 1x16x4x4 input, 3x3, 8 bits) was {floor_ms:.3f} ms. "
              "'quantise' is the activation quantiser alone (range and digits), a floor for every route. "
              "A route column is '-' where that route is not exact for the operands (direct: both operands <= 8 "
              "bits; sliced: every slice accumulator below 2^24; both: no oneDNN-unsafe geometry). 'auto' is the "
              "route the native backend chose and its time; auto / F.conv2d > 1 means slower than the float "
              f"convolution. Weights and activations take the same bit width. Targets missed in {len(missed)} of "
              f"{len(rows)} rows.")
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "three classes, batch 1, 8 bits")
    a = p.parse_args(argv)
    run(a.quick, a.device, a.out)


if __name__ == "__main__":
    main()
