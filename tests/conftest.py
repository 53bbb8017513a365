"""Shared test setup. Without a GPU, Triton kernels run under its interpreter on the CPU; the
variable must be set before triton compiles (decorates) any kernel."""
import os
import secrets

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run bench/gpu_check.sh on one)")


@pytest.fixture
def rng():
    """A generator with a fresh random seed per test; the seed is printed so a failure reproduces."""
    seed = secrets.randbits(31)
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)
