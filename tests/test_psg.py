"""pyeff.ops.psg_conv2d_weight_grad (E2-Train's predictive sign gradient): the native backend against
the reference on fresh random inputs (mask and values), the predictor against pyeff's quantiser, the
threshold limits, the exact gradient computed only for uncertain rows (and not at all when nothing is
uncertain), the CUDA operand padding and the int32 chunking run on the CPU, opcheck, torch.compile
and bad input.

Tolerances. `uncertain` is compared exactly and the predictor entries bit for bit: both backends
form the same exact integer sum and scale it by the same float64 product. The exact entries are
conv2d_weight sums of the same n = N*OH*OW products in another order (the native backend runs on a
subset of output channels); each differs from the true sum by at most gamma_n * sum|terms| with
gamma_n = n*eps/(1 - n*eps) (the standard bound for any summation order, products included), so
the two differ by at most 2 * gamma_n * sum|terms| per entry: a rigorous bound, never flaky."""
import math

import pytest
import torch
import torch.nn.functional as F

from pyeff.ops import fake_quant, psg_conv2d_weight_grad, psg_conv2d_weight_grad_reference
from pyeff.ops import psg
from pyeff.ops.quant_conv.api import _pair
from conftest import requires_cuda

# (N, C, K, H, W, kernel, stride, padding, dilation, groups)
SHAPES = [(2, 3, 5, 9, 7, 3, 1, 1, 1, 1), (3, 6, 9, 11, 10, 3, 2, 1, 1, 3), (2, 5, 7, 9, 9, 3, 1, 2, 2, 1),
          (1, 16, 16, 8, 8, 3, 1, 1, 1, 1), (2, 4, 6, 6, 5, (1, 3), (2, 1), (0, 1), 1, 2),
          (4, 8, 8, 5, 5, 3, 1, 1, 1, 8), (5, 7, 3, 5, 5, 1, 1, 0, 1, 1)]
BITS = [(4, 16), (8, 8), (2, 12), (16, 16), (9, 3)]


def _case(shape, rng, dtype=torch.float32, device="cpu"):
    """x, grad_out (from a real forward shape), weight_shape, conv kwargs."""
    N, C, K, H, W, k, s, p, d, g = shape
    kh, kw = (k, k) if isinstance(k, int) else k
    scale = float(torch.empty(()).uniform_(0.1, 10, generator=rng))
    x = (torch.randn(N, C, H, W, generator=rng, dtype=torch.float64) * scale + 0.3).to(device, dtype)
    kwargs = dict(stride=s, padding=p, dilation=d, groups=g)
    OH, OW = F.conv2d(x, torch.zeros(K, C // g, kh, kw, dtype=dtype, device=device), **kwargs).shape[-2:]
    gscale = float(torch.empty(()).uniform_(1e-4, 1e-1, generator=rng))
    grad_out = (torch.randn(N, K, OH, OW, generator=rng, dtype=torch.float64) * gscale).to(device, dtype)
    return x, grad_out, (K, C // g, kh, kw), kwargs


def _levels_pred(x, g, ws, kw, xb, gb):
    """g_pred in float64 as the reference forms it."""
    qx, sx = psg.sym_levels(x, xb, "x")
    qg, sg = psg.sym_levels(g, gb, "grad_out")
    acc = torch.nn.grad.conv2d_weight(qx.double(), ws, qg.double(), **kw)
    return acc * psg.predictor_scale(sx, sg)


def _exact_bound(x, g, ws, kw):
    """2 * gamma_n * sum |x * g| per entry (see the module docstring)."""
    n = g.shape[0] * g.shape[2] * g.shape[3]
    eps = torch.finfo(x.dtype).eps / 2  # unit roundoff
    gamma = n * eps / (1 - n * eps)
    absum = torch.nn.grad.conv2d_weight(x.abs().double(), ws, g.abs().double(), **kw)
    return 2 * gamma * absum


def _check_against_reference(got, ref, x, g, ws, kw):
    (gw, unc), (rw, runc) = got, ref
    assert gw.dtype == x.dtype and gw.shape == tuple(ws) and unc.dtype == torch.bool and unc.shape == tuple(ws)
    assert torch.equal(unc, runc), "uncertain masks differ"
    assert torch.equal(gw[~unc], rw[~unc]), "predictor entries differ"
    bound = _exact_bound(x, g, ws, kw)
    diff = (gw.double() - rw.double()).abs()
    assert bool((diff[unc] <= bound[unc]).all()), float((diff - bound)[unc].max())
    # and the exact entries are the gradient (against float64 within the same bound)
    truth = torch.nn.grad.conv2d_weight(x.double(), ws, g.double(), **kw)
    assert bool(((gw.double() - truth).abs()[unc] <= bound[unc]).all())


def _quantile_threshold(gp, q):
    return float(gp.abs().flatten().kthvalue(max(1, int(q * gp.numel()))).values)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_reference(shape, dtype, rng):
    for xb, gb in BITS:
        x, g, ws, kw = _case(shape, rng, dtype)
        gp = _levels_pred(x, g, ws, kw, xb, gb)
        q = float(torch.rand((), generator=rng)) * 0.6 + 0.05
        for thr in (_quantile_threshold(gp, q), 5e-5):
            args = (x, g, ws, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
            got = psg_conv2d_weight_grad(*args, x_bits=xb, g_bits=gb, threshold=thr, backend="native")
            ref = psg_conv2d_weight_grad(*args, x_bits=xb, g_bits=gb, threshold=thr, backend="reference")
            _check_against_reference(got, ref, x, g, ws, kw)
        # some output channels with gradients far below the rest: their predictor is 0, so at
        # threshold 0 they (and rare exact zeros elsewhere) take the exact values, a subset of rows
        small = torch.randperm(ws[0], generator=rng)[:max(1, ws[0] // 3)]
        g[:, small] *= 1e-6
        with psg.tracing() as trace:
            got = psg_conv2d_weight_grad(x, g, ws, **kw, x_bits=xb, g_bits=gb, threshold=0.0, backend="native")
        ref = psg_conv2d_weight_grad(x, g, ws, **kw, x_bits=xb, g_bits=gb, threshold=0.0, backend="reference")
        _check_against_reference(got, ref, x, g, ws, kw)
        assert bool(got[1][small].all()) and trace[0]["exact_rows"] >= len(small)


@pytest.mark.parametrize("xb, gb", BITS)
def test_predictor_is_conv_of_fake_quantised_operands(xb, gb, rng):
    """The predictor is bit for bit the reference's, and the weight gradient of pyeff's symmetric
    fake_quant of both operands (per tensor) up to float64 rounding."""
    for shape in SHAPES[:3]:
        x, g, ws, kw = _case(shape, rng, torch.float64)
        conv = [_pair("t", n, kw[n], 0) for n in ("stride", "padding", "dilation")]
        native = psg.predictor(x, g, list(ws), *conv, kw["groups"], xb, gb)
        assert torch.equal(native, _levels_pred(x, g, ws, kw, xb, gb))
        fq = torch.nn.grad.conv2d_weight(fake_quant(x, xb, scheme="sym"), ws, fake_quant(g, gb, scheme="sym"), **kw)
        torch.testing.assert_close(native, fq, rtol=1e-10, atol=1e-14)


def test_threshold_limits(rng):
    x, g, ws, kw = _case(SHAPES[0], rng)
    gp = _levels_pred(x, g, ws, kw, 4, 16)
    # 0: the predictor everywhere except its exact zeros
    gw, unc = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=0.0)
    assert torch.equal(unc, gp == 0)
    assert torch.equal(gw[~unc], gp.float()[~unc])
    # inf: the exact gradient everywhere (the same call as conv2d_weight: bit for bit), no predictor
    with psg.tracing() as calls:
        gw, unc = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=math.inf)
    assert bool(unc.all()) and not calls[0]["predictor"] and calls[0]["exact_rows"] == ws[0]
    assert torch.equal(gw, torch.nn.grad.conv2d_weight(x, ws, g, **kw))
    ref = psg_conv2d_weight_grad_reference(x, g, ws, **kw, threshold=math.inf)
    assert torch.equal(gw, ref[0]) and torch.equal(unc, ref[1])


def test_uncertain_fraction_falls_with_threshold(rng):
    x, g, ws, kw = _case((4, 8, 12, 9, 9, 3, 1, 1, 1, 1), rng)
    gp = _levels_pred(x, g, ws, kw, 4, 16).abs()
    top = float(gp.max())
    fractions = []
    for thr in [top * 2 ** -k for k in range(0, 30, 3)]:
        fractions.append(float(psg_conv2d_weight_grad(x, g, ws, **kw, threshold=thr)[1].float().mean()))
    assert fractions[0] == 1.0
    assert all(a >= b for a, b in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] < 0.05 and fractions[2] < fractions[0], fractions


def _counting_exact(monkeypatch):
    calls = []
    real = psg.exact_weight_grad

    def counted(x, weight_shape, grad_out, *rest):
        calls.append(tuple(weight_shape))
        return real(x, weight_shape, grad_out, *rest)

    monkeypatch.setattr(psg, "exact_weight_grad", counted)
    return calls


def test_nothing_uncertain_skips_the_exact_gradient(rng, monkeypatch):
    calls = _counting_exact(monkeypatch)
    ran = 0
    for shape in (SHAPES[0], SHAPES[1], SHAPES[2]):
        x, g, ws, kw = _case(shape, rng)
        gp = _levels_pred(x, g, ws, kw, 8, 16)
        if bool((gp == 0).any()):  # an exact zero of the predictor is uncertain at any threshold
            continue
        thr = float(gp.abs().min()) / 2
        with psg.tracing() as trace:
            gw, unc = psg_conv2d_weight_grad(x, g, ws, **kw, x_bits=8, threshold=thr, backend="native")
        assert not bool(unc.any()) and trace[0]["exact_rows"] == 0 and trace[0]["uncertain"] == 0
        assert torch.equal(gw, gp.float())
        ran += 1
    assert ran and calls == [], "the exact conv2d_weight ran although nothing was uncertain"


@pytest.mark.parametrize("groups", [1, 3])
def test_exact_gradient_only_for_uncertain_rows(groups, rng, monkeypatch):
    """Output channels whose gradient is far below the threshold are the only rows computed exactly
    (padded per group to the same count); the result still equals the reference."""
    monkeypatch.setenv("PYEFF_PSG_EXACT", "rows")
    calls = _counting_exact(monkeypatch)
    N, C, K = 3, 6, 9
    x = torch.randn(N, C, 7, 7, generator=rng)
    g = torch.randn(N, K, 7, 7, generator=rng)
    small = [1, 4, 5] if groups == 3 else [2, 7]  # groups of 3 rows: 1 | 4, 5 | none
    g[:, small] *= 1e-7
    ws, kw = (K, C // groups, 3, 3), dict(stride=1, padding=1, dilation=1, groups=groups)
    with psg.tracing() as trace:
        got = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=1e-6, backend="native")
    unc_rows = got[1].flatten(1).any(1).nonzero().flatten().tolist()
    assert unc_rows == small
    if groups == 1:
        assert calls == [(2, C, 3, 3)] and trace[0]["exact_rows"] == 2
    else:  # groups 0 and 1 hold uncertain rows (1 and 2 of them): one call, 2 rows each
        assert calls == [(4, 2, 3, 3)] and trace[0]["exact_rows"] == 4
    ref = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=1e-6, backend="reference")
    _check_against_reference(got, ref, x, g, ws, kw)


@pytest.mark.parametrize("xb, gb", [(4, 16), (12, 16), (8, 7)])
def test_predictor_variants_on_the_cpu(xb, gb, rng, monkeypatch):
    """The same predictor, bit for bit, from: the padded operands of CUDA's int8 GEMM (more than 16
    rows, reduction and columns multiples of 8), a reduction split into several int32 chunks, the
    batch in steps of one or two samples, and the PyTorch quantiser instead of the compiled one."""
    cases = [_case(s, rng) for s in (SHAPES[0], SHAPES[1], SHAPES[4])]
    want = [_levels_pred(x, g, ws, kw, xb, gb) for x, g, ws, kw in cases]
    compiled = psg._compiled_quantiser
    for align, chunk, step, quantiser in ((True, psg.CHUNK, psg.STEP, True), (False, 40, psg.STEP, True),
                                          (True, 48, 1, False), (False, psg.CHUNK, 60, False)):
        monkeypatch.setattr(psg, "gemm_alignment", lambda device: align)
        monkeypatch.setattr(psg, "CHUNK", chunk)
        monkeypatch.setattr(psg, "STEP", step)
        monkeypatch.setattr(psg, "_compiled_quantiser", compiled if quantiser else lambda device: False)
        for (x, g, ws, kw), w in zip(cases, want):
            got = psg_conv2d_weight_grad(x, g, ws, **kw, x_bits=xb, g_bits=gb, threshold=0.0)
            assert torch.equal(got[1], w == 0) and torch.equal(got[0][w != 0], w.float()[w != 0]), \
                (align, chunk, step, quantiser)


# ---- the exact step: whole rows or single entries ------------------------------------------------


def _entries_backends():
    backends = [("native", torch.ops.pyeff.psg_exact_entries)]
    if psg._backend.available("triton", torch.device("cpu"))[0]:
        from pyeff.kernels.psg import psg_exact_entries
        backends.append(("triton", psg_exact_entries))
    return backends


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_entries_kernels_match_reference(shape, dtype, rng):
    """psg_exact_entries (C++, and Triton where it runs) at random subsets of entries, all of them
    and none, against the float64 gradient within the summation-order bound."""
    x, g, ws, kw = _case(shape, rng, dtype)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    args = (list(ws), pair(kw["stride"]), pair(kw["padding"]), pair(kw["dilation"]), kw["groups"])
    truth = torch.nn.grad.conv2d_weight(x.double(), ws, g.double(), **kw).flatten()
    bound = _exact_bound(x, g, ws, kw).flatten()
    total = truth.numel()
    subsets = [torch.randperm(total, generator=rng)[:int(total * f)].sort().values for f in (0.05, 0.4)]
    subsets += [torch.arange(total), torch.zeros(0, dtype=torch.long)]
    for name, fn in _entries_backends():
        for idx in subsets:
            got = fn(x, g, idx, *args)
            assert got.dtype == dtype and got.shape == idx.shape, name
            assert bool(((got.double() - truth[idx]).abs() <= bound[idx]).all()), (name, idx.numel())
    torch.library.opcheck(torch.ops.pyeff.psg_exact_entries.default, (x, g, subsets[0], *args))
    ref = psg.psg_exact_entries_reference(x, g, subsets[0], *args)
    assert torch.equal(ref, torch.nn.grad.conv2d_weight(x, ws, g, **kw).flatten()[subsets[0]])


@pytest.mark.parametrize("mode", ["entries", "rows"])
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_exact_modes_match_reference(mode, backend, rng, monkeypatch):
    """Whichever exact step runs (forced), the result is the reference's; the trace says which."""
    ok, why = psg._backend.available(backend, torch.device("cpu"))
    if not ok:  # only "triton", where triton is not installed (conftest sets TRITON_INTERPRET=1)
        pytest.skip(f"backend {backend!r} cannot run here: {why}")
    monkeypatch.setenv("PYEFF_PSG_EXACT", mode)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.float64):
            x, g, ws, kw = _case(shape, rng, dtype)
            thr = _quantile_threshold(_levels_pred(x, g, ws, kw, 4, 16), 0.1)
            with psg.tracing() as trace:
                got = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=thr, backend=backend)
            ref = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=thr, backend="reference")
            _check_against_reference(got, ref, x, g, ws, kw)
            u = trace[0]["uncertain"]
            assert u > 0
            if mode == "entries":
                assert trace[0]["exact_entries"] == u and trace[0]["exact_rows"] == 0
            else:
                assert trace[0]["exact_entries"] == 0 and trace[0]["exact_rows"] > 0


def test_exact_step_rule(rng, monkeypatch):
    """auto takes single entries when few are uncertain and whole rows when many are; a bad
    PYEFF_PSG_EXACT is an error naming the variable."""
    x, g, ws, kw = _case((4, 16, 16, 8, 8, 3, 1, 1, 1, 1), rng)
    gp = _levels_pred(x, g, ws, kw, 4, 16)
    for q, want in ((0.005, "entries"), (0.5, "rows")):
        with psg.tracing() as trace:
            _, unc = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=_quantile_threshold(gp, q), backend="native")
        t = trace[0]
        assert (t["exact_entries"] > 0) == (want == "entries") and (t["exact_rows"] > 0) == (want == "rows"), t
        rows = int(unc.flatten(1).any(1).sum())  # groups=1: the rows the GEMM would compute
        assert (t["uncertain"] * psg.ENTRY_COST <= rows * math.prod(ws[1:])) == (want == "entries")
    monkeypatch.setenv("PYEFF_PSG_EXACT", "some")
    with pytest.raises(ValueError, match="PYEFF_PSG_EXACT='some'"):
        psg_conv2d_weight_grad(x, g, ws, **kw, threshold=1e-3)


def test_layouts_and_empty_batch(rng):
    x, g, ws, kw = _case(SHAPES[3], rng)
    thr = _quantile_threshold(_levels_pred(x, g, ws, kw, 4, 16), 0.3)
    ref = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=thr, backend="reference")
    for xi, gi in ((x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)),
                   (x.transpose(2, 3).contiguous().transpose(2, 3), g.transpose(0, 1).contiguous().transpose(0, 1))):
        _check_against_reference(psg_conv2d_weight_grad(xi, gi, ws, **kw, threshold=thr), ref, x, g, ws, kw)
    for backend in ("native", "reference"):
        gw, unc = psg_conv2d_weight_grad(torch.empty(0, 16, 8, 8), torch.empty(0, 16, 8, 8), ws, **kw, backend=backend)
        assert gw.shape == ws and bool((gw == 0).all()) and bool(unc.all())


# ---- opcheck, compile --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_opcheck(backend, rng):
    x, g, ws, kw = _case(SHAPES[1], rng)
    op = torch.ops.pyeff.psg_conv2d_weight_grad.default
    torch.library.opcheck(op, (x, g, list(ws), [2, 2], [1, 1], [1, 1], 3, 4, 16, 1e-3, backend))
    x, g, ws, kw = _case(SHAPES[0], rng, torch.float64)
    torch.library.opcheck(op, (x, g, list(ws), [1, 1], [1, 1], [1, 1], 1, 8, 12, math.inf, backend))


def test_torch_compile_fullgraph(rng):
    x, g, ws, kw = _case(SHAPES[0], rng)

    def f(x, g):
        gw, unc = psg_conv2d_weight_grad(x * 2, g, ws, **kw, threshold=1e-3)
        return gw.sign(), unc

    want = f(x, g)
    for backend in ("aot_eager", "inductor"):
        got = torch.compile(f, fullgraph=True, backend=backend)(x, g)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@requires_cuda
def test_cuda_matches_cpu_reference(rng):
    for shape in SHAPES:
        x, g, ws, kw = _case(shape, rng)
        thr = _quantile_threshold(_levels_pred(x, g, ws, kw, 4, 16), 0.3)
        got = psg_conv2d_weight_grad(x.cuda(), g.cuda(), ws, **kw, threshold=thr, backend="native")
        ref = psg_conv2d_weight_grad(x, g, ws, **kw, threshold=thr, backend="reference")
        _check_against_reference(tuple(t.cpu() for t in got), ref, x, g, ws, kw)


# ---- bad input ---------------------------------------------------------------------------------

X, G, WS = torch.randn(2, 4, 6, 6), torch.randn(2, 6, 6, 6), (6, 4, 3, 3)
NAN_X = X.clone()
NAN_X[1, 2, 3, 3] = float("nan")
INF_G = G.clone()
INF_G[0, 0, 0, 0] = float("inf")

# (what, call kwargs overriding the good ones, error type, text the message must contain)
BAD = [
    ("x not a tensor", dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("x integer dtype", dict(x=X.int()), TypeError, "x has dtype int32"),
    ("x float16", dict(x=X.half()), TypeError, "x has dtype float16; expected one of float32, float64"),
    ("grad_out not a tensor", dict(grad_out=None), TypeError, "grad_out must be a torch.Tensor"),
    ("grad_out dtype != x dtype", dict(grad_out=G.double()), TypeError, "grad_out has dtype torch.float64"),
    ("x 3-D", dict(x=X[0]), ValueError, "x must be 4-D"),
    ("grad_out 3-D", dict(grad_out=G[0]), ValueError, "grad_out must be 4-D"),
    ("device mix", dict(grad_out=G.to("meta")), ValueError, "x on cpu, grad_out on meta"),
    ("weight_shape not a sequence", dict(weight_shape=6), TypeError, "weight_shape must be a tuple"),
    ("weight_shape length 3", dict(weight_shape=(6, 4, 3)), ValueError, "weight_shape must have 4 entries"),
    ("weight_shape floats", dict(weight_shape=(6, 4, 3.0, 3)), TypeError, "weight_shape must hold ints"),
    ("weight_shape zero", dict(weight_shape=(6, 4, 0, 3)), ValueError, "weight_shape entries must be >= 1"),
    ("channel mismatch", dict(weight_shape=(6, 3, 3, 3)), ValueError, "x has 4 channels but weight_shape expects 3"),
    ("groups not dividing K", dict(weight_shape=(6, 1, 3, 3), groups=4), ValueError,
     "weight_shape[0]=6 output channels are not divisible by groups=4"),
    ("groups not dividing C", dict(weight_shape=(6, 1, 3, 3), groups=3), ValueError,
     "x has 4 channels but weight_shape expects 1 x groups=3"),
    ("groups 0", dict(groups=0), ValueError, "groups must be a positive integer"),
    ("groups a float", dict(groups=2.0), ValueError, "groups must be a positive integer"),
    ("grad_out wrong spatial shape", dict(padding=0), ValueError, "grad_out has shape (2, 6, 6, 6)"),
    ("grad_out wrong channels", dict(grad_out=torch.randn(2, 5, 6, 6)), ValueError, "grad_out has shape (2, 5, 6, 6)"),
    ("grad_out wrong batch", dict(grad_out=torch.randn(3, 6, 6, 6)), ValueError, "grad_out has shape (3, 6, 6, 6)"),
    ("kernel larger than input", dict(x=torch.randn(2, 4, 2, 2), padding=0), ValueError, "dilated kernel"),
    ("stride 0", dict(stride=0), ValueError, "stride must be >= 1"),
    ("padding negative", dict(padding=-1), ValueError, "padding must be >= 0"),
    ("dilation a string", dict(dilation="same"), ValueError, "dilation='same' is not supported"),
    ("x_bits 1", dict(x_bits=1), ValueError, "x_bits=1 is out of range; expected an integer in [2, 16]"),
    ("x_bits 17", dict(x_bits=17), ValueError, "x_bits=17 is out of range"),
    ("g_bits 1", dict(g_bits=1), ValueError, "g_bits=1 is out of range; expected an integer in [2, 16]"),
    ("g_bits 32", dict(g_bits=32), ValueError, "g_bits=32 is out of range"),
    ("g_bits a float", dict(g_bits=8.0), TypeError, "g_bits must be an integer number of bits in [2, 16]"),
    ("x_bits a bool", dict(x_bits=True), TypeError, "x_bits must be an integer number of bits"),
    ("threshold negative", dict(threshold=-1e-5), ValueError, "threshold must be >= 0"),
    ("threshold NaN", dict(threshold=float("nan")), ValueError, "threshold must be >= 0 (inf allowed) and not NaN"),
    ("threshold a string", dict(threshold="5e-5"), TypeError, "threshold must be a real number"),
    ("threshold a bool", dict(threshold=True), TypeError, "threshold must be a real number"),
    ("NaN in x", dict(x=NAN_X), ValueError, "x contains NaN or infinity"),
    ("inf in grad_out", dict(grad_out=INF_G), ValueError, "grad_out contains NaN or infinity"),
    ("inf in grad_out, threshold inf", dict(grad_out=INF_G, threshold=math.inf), ValueError,
     "grad_out contains NaN or infinity"),
    ("backend unknown", dict(backend="foo"), ValueError, "unknown backend 'foo'"),
    ("backend not a string", dict(backend=3), TypeError, "backend must be a string"),
]


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("what, kwargs, error, text", BAD, ids=[b[0] for b in BAD])
def test_bad_input(what, kwargs, error, text, backend):
    call = dict(x=X, grad_out=G, weight_shape=WS, stride=1, padding=1, dilation=1, groups=1, backend=backend)
    call.update(kwargs)
    with pytest.raises(error) as info:
        psg_conv2d_weight_grad(**call)
    msg = str(info.value)
    assert msg.startswith("pyeff.ops.psg_conv2d_weight_grad: ") and text in msg, msg


def test_backend_from_environment(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("PYEFF_BACKEND", "triton")  # Triton cannot run on the CPU uninterpreted: auto
    assert psg.resolve(torch.device("cpu"), "auto") == "native"
    with pytest.raises(RuntimeError, match="backend 'triton' is not usable on cpu"):
        psg.resolve(torch.device("cpu"), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert psg.resolve(torch.device("cpu"), "auto") == "triton"
    monkeypatch.setenv("PYEFF_BACKEND_PSG_CONV2D_WEIGHT_GRAD", "reference")
    assert psg.resolve(torch.device("cpu"), None) == "reference"
    assert psg.resolve(torch.device("cpu"), "native") == "native"
    assert psg.resolve(torch.device("meta"), "reference") == "reference"
    with pytest.raises(RuntimeError, match="needs a CPU or CUDA tensor"):
        psg.resolve(torch.device("meta"), "native")


def test_docs_example_runs(capsys):
    """The example of docs/ops.md's section "psg_conv2d_weight_grad" runs as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ops.md").read_text()
    section = text.split("## psg_conv2d_weight_grad", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    torch.manual_seed(0)
    exec(compile(code, "docs/ops.md psg example", "exec"), {})  # noqa: S102 (our own docs)
    assert "sign agreement" in capsys.readouterr().out
