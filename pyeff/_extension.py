"""Loads the compiled extension pyeff._C, which registers the C++/CUDA kernels as torch ops.

pyeff works without it (every op has a pure-PyTorch reference kernel), but slower; `pyeff info`
says what was built and why something failed to load.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

LOAD_ERROR = None
try:
    from pyeff import _C  # noqa: F401
except ImportError as exc:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    return _C is not None


def built_with_cuda() -> bool:
    return _C is not None and bool(torch.ops.pyeff._built_with_cuda())
