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
