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


@pytest.fixture(autouse=True)
def _own_baseline_cache(tmp_path, monkeypatch):
    """Each test its own float-baseline cache (pyeff.train.baseline_cache): nothing written to the
    user's cache, and no test sees another's entries."""
    monkeypatch.setenv("PYEFF_BASELINE_CACHE", str(tmp_path / "baselines"))


@pytest.fixture
def rng():
    """A generator with a fresh random seed per test; the seed is printed so a failure reproduces."""
    seed = secrets.randbits(31)
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


def randomise_bn(model, g):
    """Give every BatchNorm2d of `model` non-trivial statistics and affine parameters drawn from
    `g` (so a zeroed channel does not stay zero); returns the model in eval mode."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 0.4 - 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) * 0.4 - 0.2)
    return model.eval()
