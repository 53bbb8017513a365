"""pyeff.ops.fake_quant: every backend against the reference on fresh random inputs, the
reference against independent definitions, autograd, opcheck, torch.compile and bad input."""
import itertools

import pytest
import torch

from pyeff.ops import fake_quant, fake_quant_reference
from pyeff.ops import _backend
from pyeff.ops.fake_quant import quant_params
from conftest import requires_cuda

SHAPES_AXES = [((1,), None), ((7,), 0), ((3, 5, 7), None), ((3, 5, 7), 1), ((64, 33), 0),
               ((64, 33), -1), ((2, 3, 17, 19), 1), ((2, 3, 17, 19), 3), ((4100,), None)]


def _cpu_backends():
    return [b for b in ("native", "triton") if _backend.available(b, torch.device("cpu"))[0]]


def _rand(shape, rng, dtype=torch.float32, device="cpu"):
    # random scale and offset so ranges differ from test to test
    scale = float(torch.empty(()).uniform_(0.1, 10, generator=rng))
    shift = float(torch.empty(()).uniform_(-2, 2, generator=rng))
    return (torch.randn(shape, generator=rng, dtype=torch.float64) * scale + shift).to(device, dtype)


def test_native_and_triton_available_on_cpu():
    # the test matrix below must not silently shrink to the reference alone
    assert "native" in _cpu_backends()
    assert _backend.triton_available()


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_native_matches_reference_bitwise(shape, axis, scheme, stochastic, rng):
    for bits in (1, 2, 4, 8, 11, 16):
        if scheme == "sym" and bits == 1:
            continue
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            x = _rand(shape, rng, dtype)
            seed = int(torch.randint(0, 1 << 32, (), generator=rng)) if stochastic else None
            got = fake_quant(x, bits, scheme=scheme, axis=axis, stochastic=stochastic, seed=seed, backend="native")
            ref = fake_quant_reference(x, bits, scheme, None if axis is None else axis % x.dim(), seed)
            assert got.dtype == x.dtype and got.shape == x.shape
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=lambda m: f"{bits} bits {dtype}: {m}")


@pytest.mark.parametrize("shape,axis", [s for s in SHAPES_AXES if s[0] != (4100,)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_triton_interpreted_matches_reference(shape, axis, stochastic, rng):
    if "triton" not in _cpu_backends():
        pytest.skip("with a GPU present the interpreter is off and test_cuda_matches_reference covers the Triton kernels")
    for scheme, bits in (("asym", 3), ("sym", 8), ("asym", 16)):
        x = _rand(shape, rng)
        seed = 12345 if stochastic else None
        got = fake_quant(x, bits, scheme=scheme, axis=axis, stochastic=stochastic, seed=seed, backend="triton")
        ref = fake_quant_reference(x, bits, scheme, None if axis is None else axis % x.dim(), seed)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_large_tensor_parallel_paths(rng):
    # sizes that split across threads and lanes, per tensor and per channel with short/long inner
    for shape, axis in (((1 << 20) + 3, None), ((257, 4099), 0), ((4099, 5), 1), ((3, 70001), 0)):
        x = _rand(shape, rng)
        for stochastic in (False, True):
            seed = 7 if stochastic else None
            got = fake_quant(x, 6, axis=axis, stochastic=stochastic, seed=seed, backend="native")
            torch.testing.assert_close(got, fake_quant_reference(x, 6, "asym", axis, seed), rtol=0, atol=0)


# ---- the reference against independent definitions -----------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_reference_matches_torch_fake_quantize_per_tensor(bits, rng):
    x = _rand((1000,), rng)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / (2 ** bits - 1)
    zp = int(min(max(round(-lo / scale), 0), 2 ** bits - 1))
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 2 ** bits - 1)
    got = fake_quant(x, bits)
    # torch rounds half to even and we round half up: only exact ties may differ, by one step
    diff = (got - expected).abs()
    assert diff.max() <= scale * 1.0001
    assert (diff > scale * 1e-3).float().mean() < 0.01  # below that: float32 vs float64 scale


def test_reference_per_channel_levels_and_error(rng):
    x = _rand((6, 50), rng)
    for bits in (2, 5, 8):
        y = fake_quant(x, bits, axis=0, scheme="asym")
        mm = torch.stack([x.amin(1), x.amax(1)])
        scale = quant_params(mm, bits, "asym")[0]
        for c in range(6):
            assert len(torch.unique(y[c])) <= 2 ** bits
            assert (y[c] - x[c]).abs().max() <= scale[c] * 0.5 + 1e-5
        ysym = fake_quant(x, bits, axis=0, scheme="sym")
        for c in range(6):
            assert len(torch.unique(ysym[c])) <= 2 ** bits - 1


def test_zero_is_exact_and_constant_tensors():
    x = torch.tensor([0.0, 1.0, 2.5, -0.7])
    assert fake_quant(x, 3)[0] == 0
    zeros = torch.zeros(10)
    assert torch.equal(fake_quant(zeros, 4), zeros)
    const = torch.full((10,), 3.0)
    torch.testing.assert_close(fake_quant(const, 4), const)


def test_stochastic_rounding_is_unbiased_and_between_levels(rng):
    x = torch.rand(200_000, generator=rng)
    det = fake_quant(x, 3)
    sto = fake_quant(x, 3, stochastic=True, seed=99)
    step = 1 / 7
    assert ((sto - x).abs() < step + 1e-6).all()  # one of the two neighbouring levels
    assert abs((sto - x).mean().item()) < 0.002 * step * 10
    assert not torch.equal(det, sto)
    # same seed, same result; another seed, another result; the generator drives the seed
    assert torch.equal(sto, fake_quant(x, 3, stochastic=True, seed=99))
    assert not torch.equal(sto, fake_quant(x, 3, stochastic=True, seed=100))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(fake_quant(x, 3, stochastic=True, generator=g1), fake_quant(x, 3, stochastic=True, generator=g2))


# ---- autograd, opcheck, compile ----------------------------------------------------------------

def test_straight_through_gradient(rng):
    # fake_quant is a step function whose true derivative is 0 almost everywhere, so gradcheck
    # against finite differences does not apply; the contract is the straight-through estimator.
    for backend in ("native", "reference"):
        x = _rand((5, 9), rng, torch.float64).requires_grad_()
        g = torch.randn(5, 9, generator=rng, dtype=torch.float64)
        fake_quant(x, 4, axis=1, backend=backend).backward(g)
        assert torch.equal(x.grad, g)


def test_gradcheck_through_surrounding_ops(rng):
    # with the straight-through backward, d/dw sum(fq(x) * w) = fq(x): gradcheck verifies the
    # composite is wired correctly through autograd in float64
    x = _rand((4, 6), rng, torch.float64)
    w = torch.randn(4, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: (fake_quant(x, 5, backend="native") * w).sum(), (w,))


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_opcheck(backend, rng):
    x = _rand((3, 8), rng)
    for args in ((x, 4, "asym", None, None, backend), (x, 6, "sym", 1, 17, backend)):
        torch.library.opcheck(torch.ops.pyeff.fake_quant.default, args)
    mm = torch.ops.pyeff.fake_quant_minmax(x, 1)
    torch.library.opcheck(torch.ops.pyeff.fake_quant_minmax.default, (x, 1))
    s, i, z, qmin, qmax = quant_params(mm, 4, "asym")
    torch.library.opcheck(torch.ops.pyeff.fake_quant_apply.default, (x, s, i, z, qmin, qmax, 1, 3))


def test_torch_compile_fullgraph(rng):
    def f(x):
        return fake_quant(x * 2, 4, axis=0) + 1

    x = _rand((8, 16), rng)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)
    inductor = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(inductor(x), f(x), rtol=0, atol=0)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,exc,text", [(0, ValueError, "[1, 16]"), (17, ValueError, "[1, 16]"),
                                           (4.5, TypeError, "integer"), (True, TypeError, "integer"),
                                           ("8", TypeError, "integer")])
def test_bad_bits(bits, exc, text):
    with pytest.raises(exc, match=text.replace("[", r"\[").replace("]", r"\]")):
        fake_quant(torch.randn(4), bits)


def test_bad_inputs():
    with pytest.raises(TypeError, match="dtype int64"):
        fake_quant(torch.arange(4), 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fake_quant([1.0, 2.0], 4)
    with pytest.raises(ValueError, match="scheme"):
        fake_quant(torch.randn(4), 4, scheme="log")
    with pytest.raises(ValueError, match="bits >= 2"):
        fake_quant(torch.randn(4), 1, scheme="sym")
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        fake_quant(torch.randn(4, 3), 4, axis=2)
    with pytest.raises(ValueError, match="NaN or infinity"):
        fake_quant(torch.tensor([1.0, float("nan")]), 4)
    with pytest.raises(ValueError, match="NaN or infinity"):
        fake_quant(torch.tensor([[1.0, float("inf")]] * 40), 4, axis=1)
    with pytest.raises(ValueError, match="unknown backend"):
        fake_quant(torch.randn(4), 4, backend="fpga")
    with pytest.raises(ValueError, match="seed"):
        fake_quant(torch.randn(4), 4, stochastic=True, seed=-1)
    assert fake_quant(torch.empty(0, 3), 4).shape == (0, 3)


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA device"):
        fake_quant(torch.randn(4), 4, backend="triton")


def test_environment_forces_backend(monkeypatch):
    monkeypatch.setenv("PYEFF_BACKEND_FAKE_QUANT", "reference")
    assert _backend.resolve("fake_quant", torch.device("cpu"), None, {"cpu": ("native",)}) == "reference"
    monkeypatch.setenv("PYEFF_BACKEND_FAKE_QUANT", "nonsense")
    with pytest.raises(ValueError, match="unknown backend"):
        fake_quant(torch.randn(4), 4)


# ---- CUDA ---------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_matches_reference(backend, rng):
    for (shape, axis), scheme, stochastic in itertools.product(SHAPES_AXES + [(((1 << 22) + 5,), None)],
                                                              ("asym", "sym"), (False, True)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if backend == "native" else ()):
            x = _rand(shape, rng, dtype, "cuda")
            seed = 4242 if stochastic else None
            got = fake_quant(x, 5, scheme=scheme, axis=axis, stochastic=stochastic, seed=seed, backend=backend)
            ref = fake_quant_reference(x.cpu(), 5, scheme, None if axis is None else axis % x.dim(), seed)
            torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=0)


def test_minmax_kernel_on_any_layout(rng):
    # the per-tensor range reads a dense tensor in memory order (channels_last without a copy);
    # per-channel ranges and non-dense views still see the logical layout
    x = torch.randn(3, 5, 6, 7, generator=rng)
    views = [x.contiguous(memory_format=torch.channels_last), x[:, 1:4, ::2], x.permute(0, 2, 3, 1), x]
    for v in views:
        for dtype in (torch.float32, torch.float64):
            t = v.to(dtype)
            got = torch.ops.pyeff.fake_quant_minmax(t, None)
            lo, hi = torch.aminmax(t)
            assert got.view(-1).tolist() == [lo.item(), hi.item()]
            got = torch.ops.pyeff.fake_quant_minmax(t, 1)
            want = torch.stack([t.transpose(0, 1).flatten(1).amin(1), t.transpose(0, 1).flatten(1).amax(1)])
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_channels_last_input_keeps_its_layout_per_tensor(rng):
    # one deterministic per-tensor quantiser reads and writes a channels_last tensor in place order;
    # per-channel and stochastic quantisers return contiguous outputs; values never change
    from pyeff.ops.fake_quant import _backend as fq_backend

    x = torch.randn(3, 6, 5, 4, generator=rng)
    xc = x.contiguous(memory_format=torch.channels_last)
    backends = ["reference"] + (["native"] if fq_backend.available("native", torch.device("cpu"))[0] else [])
    for backend in backends:
        y = fake_quant(xc, 5, backend=backend)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, fake_quant(x, 5, backend=backend), rtol=0, atol=0)
        for kw in (dict(axis=1), dict(stochastic=True, seed=7)):
            y = fake_quant(xc, 5, backend=backend, **kw)
            assert y.is_contiguous()
            torch.testing.assert_close(y, fake_quant(x, 5, backend=backend, **kw), rtol=0, atol=0)
        torch.library.opcheck(torch.ops.pyeff.fake_quant.default, (xc, 5, "asym", None, None, backend))
