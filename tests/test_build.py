"""The extension is built, and its CUDA part is built wherever a toolkit and a CUDA torch exist,
so that a broken .cu file fails CI even on machines without a GPU."""
import os
import shutil

import torch

import pyeff
from pyeff import _extension


def test_extension_loads():
    assert _extension.loaded(), f"pyeff._C failed to load: {_extension.LOAD_ERROR}"
    assert hasattr(torch.ops.pyeff, "fake_quant_minmax")


def _toolkit_present() -> bool:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(home, "bin", "nvcc"))


def test_cuda_sources_built_when_toolkit_present():
    if os.environ.get("PYEFF_NO_CUDA") == "1":
        return  # the user asked for a CPU-only build
    if _toolkit_present() and torch.version.cuda is not None:
        assert _extension.built_with_cuda(), (
            "a CUDA toolkit and a CUDA build of torch are present, but pyeff._C has no CUDA kernels: "
            "the CUDA sources were not compiled")
    else:
        assert not torch.cuda.is_available() or _extension.built_with_cuda()


def test_version():
    assert pyeff.__version__.count(".") == 2


def test_info_names_triton_without_a_gpu_as_not_usable(monkeypatch):
    # regression: `pyeff info` said "backend Triton  yes" on a machine without a GPU
    from pyeff import info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = info.collect()["backend Triton"]
    assert state == "not installed" or state.startswith("installed; no GPU")
    line = next(ln for ln in info.render(info.collect()).splitlines() if ln.startswith("backend Triton"))
    assert not line.endswith("yes")
