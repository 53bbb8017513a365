"""Which kernel runs an op: the compiled one ("native": C++ on the CPU, CUDA on a GPU), Triton,
or the pure-PyTorch reference.

Users force a backend with an op's `backend=` argument or the environment variable
PYEFF_BACKEND (for every op) / PYEFF_BACKEND_<OP> (for one op, e.g. PYEFF_BACKEND_FAKE_QUANT).
"auto" picks the fastest measured kernel available for the tensor's device.
"""
import functools
import os

import torch

from pyeff import _extension

BACKENDS = ("auto", "native", "triton", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(backend: str, device: torch.device) -> tuple[bool, str]:
    """(usable, reason if not) for a backend on a device."""
    if backend == "reference":
        return True, ""
    if backend == "native":
        if not _extension.loaded():
            return False, f"the compiled extension pyeff._C did not load ({_extension.LOAD_ERROR})"
        if device.type == "cpu":
            return True, ""
        if device.type == "cuda":
            if _extension.built_with_cuda():
                return True, ""
            return False, "pyeff._C was built without CUDA kernels (reinstall on a machine with nvcc)"
        return False, f"no compiled kernels for device type {device.type!r}"
    if backend == "triton":
        if not triton_available():
            return False, "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
            return True, ""
        return False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)"
    return False, f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"


def resolve(op: str, device: torch.device, requested: str | None, preference: dict) -> str:
    """The backend to run `op` with. `preference` maps a device type to backends in order of
    measured speed (the benchmarks in bench/ set these)."""
    if requested in (None, "", "auto"):  # an explicit backend argument beats the environment
        requested = os.environ.get(f"PYEFF_BACKEND_{op.upper()}") or os.environ.get("PYEFF_BACKEND")
    choice = requested
    choice = (choice or "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"pyeff.ops.{op}: unknown backend {choice!r}; expected one of {', '.join(BACKENDS)}")
    if choice != "auto":
        ok, why = available(choice, device)
        if not ok:
            raise RuntimeError(f"pyeff.ops.{op}: backend {choice!r} is not usable on {device}: {why}")
        return choice
    for candidate in preference.get(device.type, ()):
        if available(candidate, device)[0]:
            return candidate
    return "reference"
