"""Benchmark of pyeff.ops.quant_conv2d against float32 F.conv2d and torch's own int8 pipeline, on
ResNet-CIFAR conv shapes (3x3, stride 1, padding 1) plus one wide layer; all timed in one run.

    python bench/quant_conv.py [--quick] [--device cuda] [--keep-memory]     (or: pyeff bench -k quant_conv)

Baselines:
  float32     F.conv2d(x, w, b) on the NCHW float32 input.
  torch int8  the eager int8 pipeline: aminmax of x -> quantize_per_tensor (quint8) ->
              quantized::conv2d with a prepacked int8 per-channel weight (prepacked once, output
              scale calibrated once) -> dequantize.
pyeff's times include everything per call: the min-max pass, quantisation, the integer conv and
the dequantising epilogue (the weight's quantised, packed form is kept in a WeightPacks, as
pyeff.nn.QuantConv2d keeps it, and checked against the weight's contents on every call).
"""
import warnings

import torch
import torch.nn.functional as F

from pyeff.bench import harness
from pyeff.ops import quant_conv2d
from pyeff.ops.packs import WeightPacks

SHAPES = [  # (name, N, C, K, H)
    ("resnet-cifar 16ch 32px", 128, 16, 16, 32),
    ("resnet-cifar 32ch 16px", 128, 32, 32, 16),
    ("resnet-cifar 64ch 8px", 128, 64, 64, 8),
    ("wide 256ch 14px", 32, 256, 256, 14),
]


def torch_int8_pipeline(x, w, b):
    """Returns a closure running torch's eager int8 conv pipeline (weights prepacked once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = (w.abs().amax((1, 2, 3)) / 127).clamp(min=1e-12)
        qw = torch.quantize_per_channel(w, ws.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.conv2d_prepack(qw, b, [1, 1], [1, 1], [1, 1], 1)
        ref = F.conv2d(x, w, b, padding=1)
        out_lo, out_hi = min(ref.min().item(), 0.0), max(ref.max().item(), 0.0)
        out_scale = (out_hi - out_lo) / 255
        out_zp = int(round(-out_lo / out_scale))

    def run():
        lo, hi = torch.aminmax(x)
        lo, hi = min(lo.item(), 0.0), max(hi.item(), 0.0)
        scale = max((hi - lo) / 255, 1e-12)
        qx = torch.quantize_per_tensor(x, scale, int(round(-lo / scale)), torch.quint8)
        return torch.ops.quantized.conv2d(qx, packed, out_scale, out_zp).dequantize()

    return run


def run(quick: bool = False, device: str = "cpu", out_dir=None, keep_memory: bool = False) -> list:
    harness.use_keep_memory(keep_memory)
    shapes = SHAPES[:1] + SHAPES[-1:] if quick else SHAPES
    rows = []
    torch.manual_seed(0)
    for name, N, C, K, H in shapes:
        x = torch.randn(N, C, H, H, device=device)
        w = torch.randn(K, C, 3, 3, device=device) * 0.1
        b = torch.randn(K, device=device)
        packs = WeightPacks()
        fns = {"fp32": lambda: F.conv2d(x, w, b, padding=1),
               "8": lambda: quant_conv2d(x, w, b, padding=1, w_bits=8, a_bits=8, packs=packs),
               "16": lambda: quant_conv2d(x, w, b, padding=1, w_bits=16, a_bits=16, packs=packs),
               "4": lambda: quant_conv2d(x, w, b, padding=1, w_bits=4, a_bits=4, packs=packs)}
        if device == "cpu":  # round-robin, so that load from other processes hits every variant alike
            fns["int8"] = torch_int8_pipeline(x, w, b)
            t = harness.interleaved_medians(fns, rounds=10 if quick else 25, settle=2)
        else:
            t = {k: harness.median_seconds(f, device) for k, f in fns.items()}
            t["int8"] = float("nan")
        t_fp32, t_int8, t_8, t_16, t_4 = t["fp32"], t["int8"], t["8"], t["16"], t["4"]
        gops = 2 * N * K * C * 9 * H * H / 1e9
        rows.append({
            "shape": f"{name} (N={N}, C=K={C}, {H}x{H})", "fp32 ms": t_fp32 * 1e3,
            "torch int8 ms": t_int8 * 1e3, "pyeff 8/8 ms": t_8 * 1e3, "pyeff 4/4 ms": t_4 * 1e3,
            "pyeff 16/16 ms": t_16 * 1e3,
            "8/8 x fp32": t_fp32 / t_8, "8/8 x torch int8": t_int8 / t_8, "16/16 x fp32": t_fp32 / t_16,
            "8/8 GOPS": gops / t_8,
        })
        print(rows[-1], flush=True)
    columns = ["shape", "fp32 ms", "torch int8 ms", "pyeff 8/8 ms", "pyeff 4/4 ms", "pyeff 16/16 ms",
               "8/8 x fp32", "8/8 x torch int8", "16/16 x fp32", "8/8 GOPS"]
    harness.write_results(
        "quant_conv", f"quant_conv2d (3x3, stride 1, padding 1), {device}", rows, columns,
        {"device": device, "baselines": "fp32 = F.conv2d on NCHW float32; torch int8 = aminmax + quantize_per_tensor + "
                      "quantized::conv2d (weights prepacked once) + dequantize"},
        out_dir, device, keep_memory=keep_memory,
        notes="x ...: speed-up of pyeff over the baseline measured in the same run (higher is better). "
              "pyeff's output is channels_last; its packed weights are kept in a WeightPacks, as in a layer.")
    return rows


def main(argv=None):
    p = harness.parser(__doc__, "two shapes instead of four", keep_memory=True)
    a = p.parse_args(argv)
    run(a.quick, a.device, a.out, a.keep_memory)


if __name__ == "__main__":
    main()
