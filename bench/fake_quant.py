"""Benchmark of pyeff.ops.fake_quant (8-bit, per tensor and per channel) against torch's fused
fake_quantize ops (with aminmax) and against the plain torch expression, on 1M-64M elements.

    python bench/fake_quant.py [--quick] [--device cuda]     (or: pyeff bench -k fake_quant)
"""

import torch

from pyeff.bench import harness
from pyeff.ops import fake_quant
from pyeff.ops import _backend

BITS = 8
QMAX = (1 << BITS) - 1


def torch_fused(x):
    lo, hi = torch.aminmax(x)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / QMAX).clamp(min=1e-12).float().view(1)
    zp = torch.round(-lo / scale).clamp(0, QMAX).int().view(1)
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, QMAX)


def torch_plain(x):
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / QMAX).clamp(min=1e-12)
    zp = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zp, 0, QMAX)
    return (q - zp) * scale


def torch_fused_per_channel(x):
    lo, hi = torch.aminmax(x, dim=1)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / QMAX).clamp(min=1e-12).float()
    zp = torch.round(-lo / scale).clamp(0, QMAX).int()
    return torch.fake_quantize_per_channel_affine(x, scale, zp, 0, 0, QMAX)


def run(quick: bool = False, device: str = "cpu", out_dir=None) -> list:
    sizes = [1 << 20, 1 << 24] if quick else [1 << 20, 1 << 22, 1 << 24, 1 << 26]
    bandwidth = harness.copy_bandwidth(device)
    backends = [b for b in ("native", "triton") if _backend.available(b, torch.device(device))[0]
                and not (b == "triton" and device == "cpu")]
    rows = []
    for n in sizes:
        x = torch.randn(n, device=device)
        xc = x.view(256, n // 256)  # per channel: 256 channels of n/256 values
        t_fused = harness.median_seconds(lambda: torch_fused(x), device)
        t_plain = harness.median_seconds(lambda: torch_plain(x), device)
        t_fused_pc = harness.median_seconds(lambda: torch_fused_per_channel(xc), device)
        for backend in backends:
            for mode, fn, base in (
                ("per-tensor", lambda: fake_quant(x, BITS, backend=backend), t_fused),
                ("per-channel", lambda: fake_quant(xc, BITS, axis=0, backend=backend), t_fused_pc),
                ("per-tensor stochastic", lambda: fake_quant(x, BITS, stochastic=True, seed=1, backend=backend), t_fused),
            ):
                t = harness.median_seconds(fn, device)
                moved = 3 * 4 * n  # read for min/max, read + write for rounding
                rows.append({
                    "elements": f"{n >> 20}M", "mode": mode, "backend": backend,
                    "pyeff ms": t * 1e3, "torch fused ms": base * 1e3,
                    "torch plain ms": t_plain * 1e3 if mode == "per-tensor" else "",
                    "x fused": base / t, "x plain": t_plain / t if mode == "per-tensor" else "",
                    "GB/s": moved / t / 1e9, "% of copy bw": 100 * moved / t / bandwidth,
                })
                print(rows[-1], flush=True)
    columns = ["elements", "mode", "backend", "pyeff ms", "torch fused ms", "torch plain ms",
               "x fused", "x plain", "GB/s", "% of copy bw"]
    harness.write_results(
        "fake_quant", f"fake_quant, {BITS} bits, float32, {device}", rows, columns,
        {"device": device, "copy bandwidth GB/s (read+write)": round(bandwidth / 1e9, 1),
         "baselines": "torch fused = aminmax + fake_quantize_per_{tensor,channel}_affine; "
                      "torch plain = min/max/round/clamp expression"},
        out_dir, device,
        notes="x fused / x plain: speed-up of pyeff over the baseline measured in the same run "
              "(higher is better). Per channel: 256 channels. Bytes counted for pyeff: 3 x 4 x n.")
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "two sizes instead of four")
    a = p.parse_args(argv)
    run(a.quick, a.device, a.out)


if __name__ == "__main__":
    main()
