"""`pyeff info` (or `python -m pyeff.info`): what pyeff was built with and what this machine offers."""
import argparse
import json
import platform
import sys
from pathlib import Path

import torch

CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_vnni": "AVX512-VNNI",
                "avx_vnni": "AVX-VNNI", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "not installed"


def _triton_state() -> str:
    """Whether the Triton backend can run here: installed is not enough, its kernels need a GPU
    (or the interpreter, TRITON_INTERPRET=1, which is for tests)."""
    from pyeff.ops import _backend

    if not _backend.triton_available():
        return "not installed"
    if torch.cuda.is_available():
        return "yes"
    return "installed; no GPU" + (" (interpreted on the CPU)" if _backend.triton_interpreted() else "")


def _clone_isa(flags: set) -> str:
    """The target_clones version (csrc/common.h: avx512f, avx2, default) the loader picks here."""
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "baseline x86-64 (default clone)"


def cpu_paths(flags: set) -> dict:
    """Which path each op's native CPU backend takes on this CPU, from the ops' own route functions
    (pyeff.ops.quant_conv.cpu_route, pyeff.ops.masked_conv.cpu_strategy) under the current
    environment (PYEFF_QUANT_CONV_CPU_PATH, PYEFF_MASKED_CONV_STRATEGY)."""
    import os

    from pyeff import _extension
    from pyeff.ops import masked_conv as mc
    from pyeff.ops import quant_conv as qc

    if not _extension.loaded():
        return {"op paths (CPU)": "reference kernels only (pyeff._C not loaded)"}
    isa = _clone_isa(flags)
    int8 = "AMX-INT8" if "amx_int8" in flags else "AVX512-VNNI" if "avx512_vnni" in flags else \
        "AVX-VNNI" if "avx_vnni" in flags else None
    words = {"direct": f"direct: one oneDNN int8 conv ({int8}), epilogue fused",
             "sliced": f"sliced: one oneDNN int8 conv ({int8}) per byte slice + pyeff epilogue",
             "gemm": "gemm: pyeff im2col + int8 GEMM (at::_int_mm) + pyeff epilogue",
             "depthwise": "depthwise: pyeff's C++ depthwise kernel (exact float64 sums, epilogue fused)",
             "float": "float: F.conv2d on the integer levels (float32 below 2^24, else float64) + scales"}
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, 8, 8, generator=g), torch.randn(16, 16, 3, 3, generator=g)
    xl, wl = torch.randn(2, 256, 4, 4, generator=g), torch.randn(8, 256, 3, 3, generator=g)
    paths = {}
    try:
        paths["quant_conv2d route choice"] = (
            f"measured ({qc.AUTOTUNE_ENV}=1): each shape's first call times every exact route and keeps "
            "the fastest; the fixed rules would take the routes below" if qc.autotune_enabled() else
            f"the fixed rules below ({qc.AUTOTUNE_ENV}=1 measures per shape instead)")
        fixed = dict(padding=1, measured=False)
        paths["quant_conv2d <= 8 bits"] = words[qc.cpu_route(x, w, w_bits=8, a_bits=8, **fixed)]
        small, long = (qc.cpu_route(x, w, w_bits=16, a_bits=16, **fixed),
                       qc.cpu_route(xl, wl, w_bits=16, a_bits=16, **fixed))
        paths["quant_conv2d 9-16 bits"] = words[small] + (
            "" if small == long else f"; {long} where an accumulator could pass 2^24 (long reductions)")
        xd, wd = torch.randn(2, 16, 8, 8, generator=g), torch.randn(16, 1, 3, 3, generator=g)
        paths["quant_conv2d depthwise, 9-16 bits"] = words[qc.cpu_route(xd, wd, w_bits=16, a_bits=16, groups=16,
                                                                         **fixed)]
        paths["quant_conv2d float64"] = words[qc.cpu_route(x.double(), w.double(), w_bits=8, a_bits=8, **fixed)]
        if not qc.cpu_has_int8_dot():
            paths["quant_conv2d note"] = "no VNNI/AMX: oneDNN's int8 conv is not exact here, every call takes gemm"
    except ValueError as exc:  # a bad PYEFF_QUANT_CONV_CPU_PATH
        paths["quant_conv2d"] = str(exc)
    try:
        per_sample = torch.rand(2, 16, generator=g) < 0.5
        xw, ww = torch.randn(2, 48, 8, 8, generator=g), torch.randn(48, 48, 3, 3, generator=g)
        shared = torch.arange(48) < 34
        named = {"dense": "dense: F.conv2d (oneDNN)", "masked_dense": "masked_dense: F.conv2d of the masked input",
                 "slice": "slice: oneDNN conv on the active channel slice"}

        def strategy(xs, ws, stride=1, **masks):
            got = mc.cpu_strategy(xs, ws, stride=stride, **masks)
            if got != "kernel":
                return named[got]
            avx512 = mc._direct_kernel_applies(xs, [stride, stride], 1)
            return "kernel: pyeff's " + ("direct AVX-512 kernel" if avx512 else "portable C++ loop nest")

        paths["masked_conv2d fp32, stride 1, per-sample masks"] = strategy(x, w, out_mask=per_sample)
        paths["masked_conv2d fp32, one shared row >= 32 channels"] = strategy(xw, ww, in_mask=shared, out_mask=shared)
        paths["masked_conv2d strides / groups / float64"] = strategy(x, w, out_mask=per_sample, stride=2)
        paths["masked_conv2d above 80% active"] = strategy(x, w, out_mask=torch.arange(16) != 0)
    except ValueError as exc:  # a bad PYEFF_MASKED_CONV_STRATEGY
        paths["masked_conv2d"] = str(exc)
    paths["fake_quant kernel"] = f"{isa} (target_clones, chosen at load time)"
    forced = {k: os.environ[k] for k in (qc.CPU_PATH_ENV, qc.AUTOTUNE_ENV, mc.STRATEGY_ENV) if os.environ.get(k)}
    paths["forced from the environment"] = ", ".join(f"{k}={v}" for k, v in forced.items()) or "nothing"
    return paths


def collect() -> dict:
    import pyeff
    from pyeff import _extension
    from pyeff.bench.harness import cpu_model
    from pyeff.ops import _backend

    flags = _cpu_flags()
    info = {
        "pyeff": pyeff.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "no",
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "triton interpreted (TRITON_INTERPRET=1)": _backend.triton_interpreted(),
        "extension pyeff._C": "loaded" if _extension.loaded() else f"NOT loaded: {_extension.LOAD_ERROR}",
        "backend CPU (C++)": _extension.loaded(),
        "backend CUDA (compiled)": _extension.built_with_cuda(),
        "backend Triton": _triton_state(),
        "CPU": cpu_model(),
        "CPU threads (torch)": torch.get_num_threads(),
        "CPU features": ", ".join(v for k, v in CPU_FEATURES.items() if k in flags) or "none detected",
        "torch CPU capability": torch.backends.cpu.get_cpu_capability(),
        "CUDA devices": [],
    }
    info.update(cpu_paths(flags))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["CUDA devices"].append(
                f"{i}: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                f"{p.multi_processor_count} SMs")
    return info


def render(info: dict) -> str:
    width = max(len(k) for k in info)
    lines = []
    for k, v in info.items():
        if isinstance(v, list):
            v = "; ".join(v) if v else "none"
        elif isinstance(v, bool):
            v = "yes" if v else "no"
        lines.append(f"{k.ljust(width)}  {v}")
    return "\n".join(lines)


def main(args=None) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if getattr(args, "json", False) else render(info))
    return 0


def register(subparsers):
    p = subparsers.add_parser("info", help="versions, built backends, CPU features, CUDA devices")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m pyeff.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON")
    sys.exit(main(parser.parse_args()))
