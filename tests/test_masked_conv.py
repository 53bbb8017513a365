"""pyeff.ops.masked_conv2d: every backend against the reference on fresh random inputs (forward and
backward), the reference against an independent per-sample definition, opcheck, torch.compile and
bad input."""
import pytest
import torch
import torch.nn.functional as F

from pyeff.ops import masked_conv2d, masked_conv2d_reference
from pyeff.ops import _backend
from pyeff.ops import masked_conv as mc
from conftest import requires_cuda

# (N, C, K, H, W, kernel, stride, padding, dilation, groups)
CASES = [
    (3, 5, 7, 9, 11, (3, 3), 1, 1, 1, 1),
    (2, 3, 17, 7, 13, (3, 3), 1, 1, 1, 1),
    (4, 17, 5, 8, 8, (3, 3), 1, 1, 1, 1),
    (2, 5, 3, 11, 9, (3, 3), 1, (0, 2), (2, 1), 1),
    (3, 3, 5, 13, 7, (3, 2), (2, 1), (1, 0), 1, 1),
    (2, 5, 5, 9, 9, (1, 1), 1, 0, 1, 1),
    (2, 5, 3, 10, 9, (5, 5), 1, 2, 1, 1),
    (3, 6, 9, 7, 9, (3, 3), 1, 1, 1, 3),
    (2, 4, 4, 9, 8, (3, 3), 2, 3, 1, 2),
    (2, 16, 16, 33, 31, (3, 3), 1, 1, 1, 1),
]
MASKS = ["per_sample_both", "per_sample_out", "per_sample_in", "shared_both", "shared_out", "all_on", "all_off",
         "row_1d"]


def _cpu_backends():
    return [b for b in ("native", "triton") if _backend.available(b, torch.device("cpu"))[0]]


def _masks(kind, n, c, k, rng, device="cpu"):
    def m(rows, ch, p=0.5):
        return torch.rand(rows, ch, generator=rng) < p

    table = {
        "per_sample_both": (m(n, c, 0.6), m(n, k)),
        "per_sample_out": (None, m(n, k, 0.4)),
        "per_sample_in": (m(n, c, 0.5), None),
        "shared_both": (m(1, c, 0.7), m(1, k, 0.5)),
        "shared_out": (None, m(1, k, 0.5)),
        "all_on": (torch.ones(n, c, dtype=torch.bool), torch.ones(n, k, dtype=torch.bool)),
        "all_off": (torch.zeros(n, c, dtype=torch.bool), torch.zeros(n, k, dtype=torch.bool)),
        "row_1d": (m(1, c)[0], m(1, k)[0]),
    }
    return tuple(None if t is None else t.to(device) for t in table[kind])


def _inputs(case, rng, dtype=torch.float32, device="cpu"):
    n, c, k, h, w, ks, stride, padding, dilation, groups = case
    scale = float(torch.empty(()).uniform_(0.5, 3, generator=rng))
    x = (torch.randn(n, c, h, w, generator=rng, dtype=torch.float64) * scale).to(device, dtype)
    wt = torch.randn(k, c // groups, *ks, generator=rng, dtype=torch.float64).to(device, dtype)
    b = torch.randn(k, generator=rng, dtype=torch.float64).to(device, dtype)
    return x, wt, b, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _ref(x, w, b, conf, im, om):
    n, c, k = x.shape[0], x.shape[1], w.shape[0]
    im = torch.ones(1, c, dtype=torch.bool, device=x.device) if im is None else im.view(-1, c)
    om = torch.ones(1, k, dtype=torch.bool, device=x.device) if om is None else om.view(-1, k)
    return masked_conv2d_reference(x, w, b, im, om, **conf)


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def test_native_and_triton_available_on_cpu():
    assert "native" in _cpu_backends()
    assert _backend.triton_available()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["native", "reference"])
def test_forward_backward_matches_reference(case, backend, rng):
    for kind in MASKS:
        for with_bias in (True, False):
            x, w, b, conf = _inputs(case, rng)
            im, om = _masks(kind, x.shape[0], x.shape[1], w.shape[0], rng)
            b = b if with_bias else None
            leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
            got = masked_conv2d(leaves[0], leaves[1], leaves[2] if with_bias else None, in_mask=im, out_mask=om,
                                backend=backend, **conf)
            rleaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if with_bias else ())]
            ref = _ref(rleaves[0], rleaves[1], rleaves[2] if with_bias else None, conf, im, om)
            torch.testing.assert_close(got, ref, **_tol(x.dtype), msg=lambda m: f"{kind}: {m}")
            if om is not None:  # inactive outputs are exact zeros
                assert (got.detach()[~om.view(-1, w.shape[0]).expand(x.shape[0], -1)] == 0).all()
            g = torch.randn(got.shape, generator=rng)
            got.backward(g)
            ref.backward(g)
            for a, r, name in zip(leaves, rleaves, ("x", "weight", "bias")):
                torch.testing.assert_close(a.grad, r.grad, rtol=1e-4, atol=1e-3, msg=lambda m: f"{kind} grad {name}: {m}")
            if im is not None:  # inactive inputs get exact zero gradients
                assert (leaves[0].grad[~im.view(-1, x.shape[1]).expand(x.shape[0], -1)] == 0).all()


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[7], CASES[8]])
def test_native_float64_and_half(case, rng):
    for dtype in (torch.float64, torch.bfloat16):
        x, w, b, conf = _inputs(case, rng, dtype)
        im, om = _masks("per_sample_both", x.shape[0], x.shape[1], w.shape[0], rng)
        got = masked_conv2d(x, w, b, in_mask=im, out_mask=om, backend="native", **conf)
        ref = _ref(x.double(), w.double(), b.double(), conf, im, om).to(dtype)
        tol = _tol(dtype) if dtype == torch.float64 else dict(rtol=2e-2, atol=5e-2)
        assert got.dtype == dtype
        torch.testing.assert_close(got, ref, **tol)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[4], CASES[7]])
def test_triton_interpreted_matches_reference(case, rng):
    if "triton" not in _cpu_backends():
        pytest.skip("with a GPU present the interpreter is off and test_cuda_matches_reference covers the Triton kernels")
    for kind in ("per_sample_both", "shared_out", "all_off"):
        x, w, b, conf = _inputs(case, rng)
        im, om = _masks(kind, x.shape[0], x.shape[1], w.shape[0], rng)
        xg = x.clone().requires_grad_()
        got = masked_conv2d(xg, w, b, in_mask=im, out_mask=om, backend="triton", **conf)
        xr = x.clone().requires_grad_()
        ref = _ref(xr, w, b, conf, im, om)
        torch.testing.assert_close(got, ref, **_tol(x.dtype))
        g = torch.randn(got.shape, generator=rng)
        got.backward(g)
        ref.backward(g)
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[7], CASES[8]])
def test_portable_loop_nest_matches_reference(case, rng, monkeypatch):
    # strides, groups, float64: the CPU op runs oneDNN on the masked input by default; pyeff's
    # portable C++ kernel, which runs these when the kernel strategy is forced, is checked here
    monkeypatch.setenv(mc.STRATEGY_ENV, "kernel")
    for dtype in (torch.float32, torch.float64):
        x, w, b, conf = _inputs(case, rng, dtype)
        for kind in ("per_sample_both", "shared_out", "all_off"):
            im, om = _masks(kind, x.shape[0], x.shape[1], w.shape[0], rng)
            every = (im is None or bool(im.all())) and bool(om.all())  # nothing to skip: the dense conv
            assert mc.cpu_strategy(x, w, in_mask=im, out_mask=om, stride=conf["stride"],
                                   groups=conf["groups"]) == ("dense" if every else "kernel")
            got = masked_conv2d(x, w, b, in_mask=im, out_mask=om, backend="native", **conf)
            torch.testing.assert_close(got, _ref(x, w, b, conf, im, om), **_tol(dtype))


def test_reference_against_per_sample_definition(rng):
    # independent definition: each sample's conv restricted to its active channels, then scattered
    x, w, b, conf = _inputs(CASES[0], rng, torch.float64)
    im, om = _masks("per_sample_both", x.shape[0], x.shape[1], w.shape[0], rng)
    ref = _ref(x, w, b, conf, im, om)
    for i in range(x.shape[0]):
        ci, ko = im[i].nonzero()[:, 0], om[i].nonzero()[:, 0]
        expected = torch.zeros_like(ref[i])
        if len(ko) and len(ci):
            expected[ko] = F.conv2d(x[i:i + 1, ci], w[ko][:, ci], b[ko], conf["stride"], conf["padding"],
                                    conf["dilation"])[0]
        elif len(ko):  # no active input: the bias alone (F.conv2d cannot take zero channels)
            expected[ko] = b[ko][:, None, None].expand(-1, *ref.shape[2:])
        torch.testing.assert_close(ref[i], expected)


def test_large_batch_thread_split_and_density_strategies(rng, monkeypatch):
    # ResNet-CIFAR-like shape, densities that take the direct kernel and the dense fallback
    x = torch.randn(37, 16, 16, 16, generator=rng)
    w = torch.randn(32, 16, 3, 3, generator=rng)
    picked = set()
    for p in (0.05, 0.25, 0.5, 0.95):
        om = torch.rand(37, 32, generator=rng) < p
        im = torch.rand(37, 16, generator=rng) < max(p, 0.5)
        picked.add(mc.cpu_strategy(x, w, in_mask=im, out_mask=om))
        got = masked_conv2d(x, w, padding=1, in_mask=im, out_mask=om, backend="native")
        torch.testing.assert_close(got, masked_conv2d_reference(x, w, None, im, om, 1, 1), rtol=1e-4, atol=1e-4)
    assert "masked_dense" in picked and (picked == {"masked_dense"} or "kernel" in picked)
    monkeypatch.setenv(mc.STRATEGY_ENV, "kernel")  # force the direct kernel on a full mask row
    om = torch.ones(37, 32, dtype=torch.bool)
    om[0, 0] = False
    assert mc.cpu_strategy(x, w, out_mask=om) == "kernel"
    got = masked_conv2d(x, w, padding=1, out_mask=om, backend="native")
    torch.testing.assert_close(got, masked_conv2d_reference(x, w, None, om[:, :16].new_ones(1, 16), om, 1, 1),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4], CASES[6], CASES[7], CASES[9]])
def test_weight_grad_kernel_matches_reference(case, rng):
    # the kernel directly (the autograd path picks it only where it is measured faster than oneDNN)
    for dtype in (torch.float32, torch.float64):
        x, w, _, conf = _inputs(case, rng, dtype)
        im, om = _masks("per_sample_both", x.shape[0], x.shape[1], w.shape[0], rng)
        y = masked_conv2d_reference(x, w, None, im, om, **conf)
        go = torch.where(om[:, :, None, None], torch.randn(y.shape, generator=rng, dtype=torch.float64).to(dtype), 0)
        s, p, d = ([v, v] if isinstance(v, int) else list(v) for v in (conf["stride"], conf["padding"], conf["dilation"]))
        got = torch.ops.pyeff.masked_conv2d_weight_grad(go, x, im, om, list(w.shape[2:]), s, p, d, conf["groups"])
        xm = torch.where(im[:, :, None, None], x, 0).double()
        ref = torch.nn.grad.conv2d_weight(xm, w.shape, go.double(), s, p, d, conf["groups"])
        # each element reduces over N * OH * OW products: rounding scales with the sum of their
        # magnitudes, not with the (possibly cancelled) result
        bound = torch.nn.grad.conv2d_weight(xm.abs(), w.shape, go.double().abs(), s, p, d, conf["groups"])
        eps = 1e-5 if dtype == torch.float32 else 1e-12
        err = (got.double() - ref).abs()
        assert got.dtype == dtype and bool((err <= eps * bound + eps).all()), \
            f"{dtype}: worst error {float((err - eps * bound).max()):.3g} above the bound"


def test_shared_rows_wide_channels_use_onednn_slice(rng):
    x = torch.randn(3, 40, 6, 7, generator=rng)
    w, b = torch.randn(48, 40, 3, 3, generator=rng), torch.randn(48, generator=rng)
    im, om = torch.rand(40, generator=rng) < 0.9, torch.zeros(48, dtype=torch.bool)
    im[torch.randperm(40, generator=rng)[:34]] = True
    om[torch.randperm(48, generator=rng)[:34]] = True  # >= SHARED_ONEDNN active, below DENSE_ABOVE
    direct_applies = mc.cpu_strategy(x, w, out_mask=torch.rand(3, 48, generator=rng) < 0.1) == "kernel"
    for imask in (im, torch.ones(40, dtype=torch.bool)):
        assert mc.cpu_strategy(x, w, in_mask=imask, out_mask=om) == ("slice" if direct_applies else "masked_dense")
        got = masked_conv2d(x, w, b, padding=1, in_mask=imask, out_mask=om, backend="native")
        torch.testing.assert_close(got, masked_conv2d_reference(x, w, b, imask[None], om[None], 1, 1), rtol=1e-4, atol=1e-4)


def test_strategy_env_is_checked(rng, monkeypatch):
    x, w = torch.randn(2, 4, 6, 6, generator=rng), torch.randn(5, 4, 3, 3, generator=rng)
    om = torch.tensor([True, False] * 2 + [True])
    monkeypatch.setenv(mc.STRATEGY_ENV, "masked_dense")
    assert mc.cpu_strategy(x, w, out_mask=om) == "masked_dense"
    assert mc.cpu_strategy(x, w) == "dense"  # nothing to skip: the dense conv whatever is forced
    torch.testing.assert_close(masked_conv2d(x, w, padding=1, out_mask=om, backend="native"),
                               masked_conv2d_reference(x, w, None, om.new_ones(1, 4), om[None], 1, 1))
    monkeypatch.setenv(mc.STRATEGY_ENV, "fastest")
    with pytest.raises(ValueError, match="PYEFF_MASKED_CONV_STRATEGY must be one of"):
        masked_conv2d(x, w, out_mask=om, backend="native")


def test_channels_last_input_gives_contiguous_output(rng):
    x = torch.randn(3, 8, 7, 9, generator=rng).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8, 3, 3, generator=rng)
    for om in (None, torch.rand(3, 8, generator=rng) < 0.5):
        got = masked_conv2d(x, w, padding=1, out_mask=om, backend="native")
        assert got.is_contiguous()
        torch.testing.assert_close(got, _ref(x, w, None, dict(stride=1, padding=1, dilation=1, groups=1), None, om),
                                   rtol=1e-4, atol=1e-4)


def test_gradcheck_float64(rng):
    x, w, b, conf = _inputs((2, 3, 4, 5, 6, (3, 3), 1, 1, 1, 1), rng, torch.float64)
    im, om = _masks("per_sample_both", 2, 3, 4, rng)
    im[:, 0] = True
    om[:, 0] = True
    for backend in ("native", "reference"):
        args = [t.clone().requires_grad_() for t in (x, w, b)]
        assert torch.autograd.gradcheck(
            lambda x, w, b: masked_conv2d(x, w, b, in_mask=im, out_mask=om, backend=backend, **conf), args)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_opcheck(backend, rng):
    x, w, b, conf = _inputs(CASES[0], rng)
    im, om = _masks("per_sample_both", x.shape[0], x.shape[1], w.shape[0], rng)
    args = (x, w, b, im, om, [1, 1], [1, 1], [1, 1], 1, backend)
    torch.library.opcheck(torch.ops.pyeff.masked_conv2d.default, args)
    torch.library.opcheck(torch.ops.pyeff.masked_conv2d.default, (x, w, None, im[:1], om, [2, 1], [0, 1], [1, 2], 1, backend))
    torch.library.opcheck(torch.ops.pyeff.masked_conv2d_fwd.default, (x, w, b, im, om, [1, 1], [1, 1], [1, 1], 1))
    go = torch.randn(x.shape[0], w.shape[0], x.shape[2], x.shape[3], generator=rng)
    torch.library.opcheck(torch.ops.pyeff.masked_conv2d_weight_grad.default, (go, x, im, om, [3, 3], [1, 1], [1, 1], [1, 1], 1))


def test_torch_compile_fullgraph(rng):
    x, w, b, conf = _inputs(CASES[0], rng)
    im, om = _masks("per_sample_both", x.shape[0], x.shape[1], w.shape[0], rng)

    def f(x):
        return masked_conv2d(torch.relu(x), w, b, in_mask=im, out_mask=om, padding=1) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_bad_inputs():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    ok_in, ok_out = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="in_mask has shape"):
        masked_conv2d(x, w, in_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="out_mask has shape"):
        masked_conv2d(x, w, out_mask=torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="out_mask has shape"):
        masked_conv2d(x, w, out_mask=torch.ones(2, 6, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="expected bool"):
        masked_conv2d(x, w, in_mask=ok_in.float())
    with pytest.raises(TypeError, match="expected bool"):
        masked_conv2d(x, w, out_mask=ok_out.to(torch.uint8))
    with pytest.raises(ValueError, match="is on meta"):
        masked_conv2d(x, w, out_mask=ok_out.to("meta"))
    with pytest.raises(ValueError, match="must be 4-D.*unsqueeze"):
        masked_conv2d(x[0], w)
    with pytest.raises(ValueError, match="weight must be"):
        masked_conv2d(x, torch.randn(6, 3, 3, 3))
    with pytest.raises(ValueError, match="groups=3"):
        masked_conv2d(x, torch.randn(6, 2, 3, 3), groups=3)
    with pytest.raises(ValueError, match="bias must be"):
        masked_conv2d(x, w, torch.randn(5))
    with pytest.raises(ValueError, match="must match x"):
        masked_conv2d(x, w.double())
    with pytest.raises(ValueError, match="smaller than"):
        masked_conv2d(x, torch.randn(6, 4, 7, 7))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        masked_conv2d(x, w, padding=-1)
    with pytest.raises(TypeError, match="stride"):
        masked_conv2d(x, w, stride=(1, 2, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        masked_conv2d(x, w, backend="fpga")
    assert masked_conv2d(x[:0], w).shape == (0, 6, 3, 3)


@requires_cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_matches_reference(backend, rng):
    for case in CASES:
        for kind in MASKS:
            x, w, b, conf = _inputs(case, rng, device="cuda")
            im, om = _masks(kind, x.shape[0], x.shape[1], w.shape[0], rng, "cuda")
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            got = masked_conv2d(*leaves, in_mask=im, out_mask=om, backend=backend, **conf)
            rleaves = [t.cpu().double().requires_grad_() for t in (x, w, b)]
            ref = _ref(*rleaves, conf, None if im is None else im.cpu(), None if om is None else om.cpu())
            torch.testing.assert_close(got.cpu().double(), ref, rtol=1e-4, atol=1e-4)
            g = torch.randn(got.shape, generator=rng)
            got.backward(g.cuda())
            ref.backward(g.double())
            for a, r in zip(leaves, rleaves):
                torch.testing.assert_close(a.grad.cpu().double(), r.grad, rtol=1e-4, atol=1e-3)
