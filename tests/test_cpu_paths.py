"""Every CPU path this machine can run, forced one by one through the public switches
(PYEFF_QUANT_CONV_CPU_PATH, PYEFF_MASKED_CONV_STRATEGY) and checked against the reference, with
the path confirmed by the public route functions (cpu_route, cpu_strategy; quant_conv's measured
route choice is off here, PYEFF_QUANT_CONV_AUTOTUNE=0, so that the fixed rules are what is tested,
and each route is also forced by name). What
tests/test_quant_conv.py and test_masked_conv.py already cover is not repeated: here are the
`onednn` switch value, each quant_conv route on quant_linear, strided and grouped convs and
float64, each masked_conv strategy with its gradients, and the no-AVX-512 strategy choice.
fake_quant has no switch: its ISA version (target_clones) is chosen by the loader (`pyeff info`)."""
import os
import subprocess
import sys

import pytest
import torch

from pyeff.ops import masked_conv as mc
from pyeff.ops import masked_conv2d, masked_conv2d_reference, quant_conv2d, quant_conv2d_reference, quant_linear
from pyeff.ops import quant_conv as qc


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def fixed_rules(monkeypatch):
    monkeypatch.setenv(qc.AUTOTUNE_ENV, "0")


def _routes_here():
    return ("direct", "sliced", "gemm", "depthwise", "float") if qc.cpu_has_int8_dot() else ("gemm", "depthwise", "float")


# (x shape, weight shape, conv kwargs): a long reduction with 16-bit weights needs the int32 GEMM
CONVS = {
    "direct": [((2, 6, 9, 7), (8, 6, 3, 3), dict(padding=1)), ((3, 6, 11, 10), (9, 2, 3, 3), dict(stride=2, groups=3))],
    # more than routes._SMALL_M output positions: below that the rules put gemm first
    "sliced": [((2, 6, 33, 32), (8, 6, 3, 3), dict(padding=1)), ((3, 6, 41, 40), (9, 2, 3, 3), dict(stride=2, groups=3))],
    "gemm": [((2, 256, 4, 4), (8, 256, 3, 3), dict(padding=1)),
             ((2, 512, 5, 4), (8, 256, 3, 3), dict(padding=1, dilation=2, groups=2))],
    # depthwise (one input channel per group), with a channel multiplier, strided and dilated
    "depthwise": [((2, 6, 9, 7), (6, 1, 3, 3), dict(padding=1, groups=6)),
                  ((3, 4, 11, 10), (8, 1, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=4))],
    # never first under the fixed rules: reached by name (depthwise, strided, a long reduction)
    "float": [((2, 6, 9, 7), (6, 1, 3, 3), dict(padding=1, groups=6)), ((3, 6, 11, 10), (9, 2, 3, 3), dict(stride=2, groups=3)),
              ((2, 256, 4, 4), (8, 256, 3, 3), dict(padding=1))],
}
BITS = {"direct": [(8, 8), (4, 6), (2, 3)], "sliced": [(16, 16), (12, 9), (8, 16)], "gemm": [(16, 16)],
        "depthwise": [(16, 16), (12, 9), (8, 16)],
        "float": [(8, 8), (16, 16), (12, 9), (2, 3)]}


# the fixed rules (auto, onednn) never put the float route first: it is reached by name only; the
# depthwise route is first for depthwise convolutions above 8 bits
@pytest.mark.parametrize("route, switch", [(r, s) for r in ("direct", "sliced", "gemm", "depthwise")
                                           for s in ("auto", "onednn", "by name")]
                         + [("float", "by name")])
def test_quant_conv2d_each_route_matches_reference(route, switch, gen, monkeypatch):
    if route not in _routes_here():
        pytest.skip(f"route {route} needs VNNI/AMX and oneDNN")
    monkeypatch.setenv(qc.CPU_PATH_ENV, route if switch == "by name" else switch)
    for xs, ws, kw in CONVS[route]:
        x = torch.randn(*xs, generator=gen) * 2 + 0.3
        w = torch.randn(*ws, generator=gen)
        b = torch.randn(ws[0], generator=gen)
        for wb, ab in BITS[route]:
            assert qc.cpu_route(x, w, w_bits=wb, a_bits=ab, groups=kw.get("groups", 1)) == route
            torch.testing.assert_close(quant_conv2d(x, w, b, **kw, w_bits=wb, a_bits=ab),
                                       quant_conv2d_reference(x, w, b, **kw, w_bits=wb, a_bits=ab))
            # a fixed range takes the same route (the levels differ, not the path)
            torch.testing.assert_close(quant_conv2d(x, w, b, **kw, w_bits=wb, a_bits=ab, a_range=(-2.0, 3.0)),
                                       quant_conv2d_reference(x, w, b, **kw, w_bits=wb, a_bits=ab, a_range=(-2.0, 3.0)))


@pytest.mark.parametrize("route", ["direct", "sliced", "gemm", "forced gemm"])
def test_quant_linear_each_route_matches_reference(route, gen, monkeypatch):
    name = route.split()[-1]
    if name not in _routes_here():
        pytest.skip(f"route {name} needs VNNI/AMX and oneDNN")
    monkeypatch.setenv(qc.CPU_PATH_ENV, "gemm" if route == "forced gemm" else "auto")
    features = 4000 if name == "gemm" and route != "forced gemm" else 37
    rows = 400 if name == "sliced" else 5  # sliced needs more than routes._SMALL_M rows (else gemm is first)
    x, w, b = torch.randn(3, rows, features, generator=gen), torch.randn(11, features, generator=gen), torch.randn(11)
    wb, ab = (8, 8) if name == "direct" or route == "forced gemm" else (16, 16)
    assert qc.cpu_route(x.reshape(-1, features)[:, :, None, None], w, w_bits=wb, a_bits=ab) == name
    got = quant_linear(x, w, b, w_bits=wb, a_bits=ab)
    ref = quant_conv2d_reference(x.reshape(-1, features, 1, 1), w[:, :, None, None], b, w_bits=wb, a_bits=ab)
    torch.testing.assert_close(got, ref.reshape(3, rows, 11))


@pytest.mark.parametrize("switch", ["auto", "onednn", "gemm", "float"])
def test_quant_conv2d_float64_and_half_under_each_switch(switch, gen, monkeypatch):
    monkeypatch.setenv(qc.CPU_PATH_ENV, switch)
    x, w = torch.randn(2, 6, 9, 7, generator=gen), torch.randn(8, 6, 3, 3, generator=gen)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        xd, wd = x.to(dtype), w.to(dtype)
        route = qc.cpu_route(xd, wd, w_bits=8, a_bits=8)
        if switch == "float":
            assert route == "float"
        elif switch == "gemm" or not qc.cpu_has_int8_dot():
            assert route == "gemm"
        elif dtype == torch.float64:  # the direct route's float32 epilogue is not exact enough
            assert route != "direct"
        torch.testing.assert_close(quant_conv2d(xd, wd, padding=1), quant_conv2d_reference(xd, wd, padding=1))


# ------------------------------------------------------------------------------------------------
# masked_conv2d: every strategy, forward and gradients


def _strategies_here():
    """(strategy, switch, conv kwargs, dtype, mask kind) reaching each strategy on this CPU."""
    out = [("dense", "auto", {}, torch.float32, "none"),
           ("masked_dense", "auto", dict(stride=2), torch.float32, "per_sample"),
           ("masked_dense", "masked_dense", {}, torch.float32, "per_sample"),
           ("masked_dense", "masked_dense", {}, torch.float32, "shared_wide"),
           ("kernel", "kernel", dict(stride=2), torch.float32, "per_sample"),      # portable loop nest
           ("kernel", "kernel", dict(groups=2), torch.float64, "per_sample")]      # portable loop nest
    x = torch.randn(2, 16, 8, 8)
    if mc.cpu_strategy(x, torch.randn(16, 16, 3, 3), out_mask=torch.rand(2, 16) < 0.3) == "kernel":  # AVX-512
        out += [("kernel", "auto", {}, torch.float32, "per_sample"),
                ("kernel", "kernel", {}, torch.float32, "shared_wide"),
                ("slice", "auto", {}, torch.float32, "shared_wide")]
    return out


def _masked_case(kind, conf, dtype, gen):
    c, k = (48, 40) if kind == "shared_wide" else (6, 8)
    groups = conf.get("groups", 1)
    x = torch.randn(3, c, 9, 8, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(k, c // groups, 3, 3, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(k, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "none":
        return x, w, b, None, None
    if kind == "shared_wide":  # >= SHARED_ONEDNN active, below DENSE_ABOVE
        im, om = torch.zeros(c, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)
        im[torch.randperm(c, generator=gen)[:36]] = True
        om[torch.randperm(k, generator=gen)[:33]] = True
        return x, w, b, im, om
    return x, w, b, torch.rand(3, c, generator=gen) < 0.6, torch.rand(3, k, generator=gen) < 0.5


@pytest.mark.parametrize("strategy,switch,conf,dtype,kind", _strategies_here(),
                         ids=lambda v: v if isinstance(v, str) else str(v).replace("torch.", "")
                         if not isinstance(v, dict) else "-".join(f"{a}{b}" for a, b in v.items()) or "plain")
def test_masked_conv2d_each_strategy_matches_reference(strategy, switch, conf, dtype, kind, gen, monkeypatch):
    monkeypatch.setenv(mc.STRATEGY_ENV, switch)
    x, w, b, im, om = _masked_case(kind, conf, dtype, gen)
    assert mc.cpu_strategy(x, w, in_mask=im, out_mask=om, stride=conf.get("stride", 1),
                           groups=conf.get("groups", 1)) == strategy
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    got = masked_conv2d(xg, wg, bg, padding=1, in_mask=im, out_mask=om, backend="native", **conf)
    c, k = x.shape[1], w.shape[0]
    imr = torch.ones(1, c, dtype=torch.bool) if im is None else im.view(-1, c)
    omr = torch.ones(1, k, dtype=torch.bool) if om is None else om.view(-1, k)
    ref = masked_conv2d_reference(xr, wr, br, imr, omr, conf.get("stride", 1), 1, 1, conf.get("groups", 1))
    torch.testing.assert_close(got, ref, **tol)
    g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    got.backward(g)
    ref.backward(g)
    for a, r in ((xg, xr), (wg, wr), (bg, br)):
        torch.testing.assert_close(a.grad, r.grad, **({"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else tol))


def test_masked_conv2d_without_avx512_takes_the_dense_fallback():
    """A CPU without AVX-512 as torch sees it (ATEN_CPU_CAPABILITY=avx2): the float32 stride-1 call
    that takes the direct kernel here takes masked_dense, and matches the reference."""
    code = (
        "import torch\n"
        "from pyeff.ops import masked_conv as mc, masked_conv2d, masked_conv2d_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w = torch.randn(3, 16, 8, 8, generator=g), torch.randn(16, 16, 3, 3, generator=g)\n"
        "om = torch.rand(3, 16, generator=g) < 0.3\n"
        "print(torch.backends.cpu.get_cpu_capability(), mc.cpu_strategy(x, w, out_mask=om))\n"
        "torch.testing.assert_close(masked_conv2d(x, w, padding=1, out_mask=om),\n"
        "    masked_conv2d_reference(x, w, None, torch.ones(1, 16, dtype=torch.bool), om, 1, 1))\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    env.pop(mc.STRATEGY_ENV, None)
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["AVX2", "masked_dense"], out.stdout


def test_info_states_each_ops_path(monkeypatch):
    from pyeff import info

    monkeypatch.delenv(qc.CPU_PATH_ENV, raising=False)
    monkeypatch.delenv(qc.AUTOTUNE_ENV, raising=False)
    monkeypatch.delenv(mc.STRATEGY_ENV, raising=False)
    got = info.collect()
    assert got["quant_conv2d route choice"].startswith("the fixed rules")
    x, w = torch.randn(2, 16, 8, 8), torch.randn(16, 16, 3, 3)
    assert got["quant_conv2d <= 8 bits"].startswith(qc.cpu_route(x, w, w_bits=8, a_bits=8, measured=False) + ":")
    assert got["masked_conv2d strides / groups / float64"].startswith("masked_dense")
    assert got["fake_quant kernel"].split()[0] in ("AVX-512", "AVX2", "baseline")
    assert got["forced from the environment"] == "nothing"
    monkeypatch.setenv(qc.CPU_PATH_ENV, "gemm")
    monkeypatch.setenv(mc.STRATEGY_ENV, "kernel")
    got = info.collect()
    assert all(got[k].startswith("gemm:") for k in ("quant_conv2d <= 8 bits", "quant_conv2d 9-16 bits",
                                                     "quant_conv2d float64"))
    assert got["masked_conv2d strides / groups / float64"] == "kernel: pyeff's portable C++ loop nest"
    assert "PYEFF_QUANT_CONV_CPU_PATH=gemm" in got["forced from the environment"]
    assert "fake_quant kernel" in info.render(got)


def test_epilogue_routes_give_identical_bits(gen, monkeypatch):
    """sliced, gemm and depthwise compute the same exact integer sums and share the float64
    epilogue's arithmetic, so their outputs are bitwise equal: the fixed rules may pick among them
    by the number of output positions (routes._SMALL_M), which depends on the batch, without a
    sample's output depending on its batch."""
    x = torch.randn(3, 8, 9, 10, generator=gen) * 3 - 1
    for w, groups in ((torch.randn(8, 8, 3, 3, generator=gen), 1), (torch.randn(16, 1, 3, 3, generator=gen), 8)):
        b, s = torch.randn(w.shape[0], generator=gen), torch.rand(w.shape[0], generator=gen) + 0.5
        for wb, ab in ((16, 16), (12, 9), (9, 16)):
            outs = {}
            for route in ("sliced", "gemm", "depthwise"):
                monkeypatch.setenv(qc.CPU_PATH_ENV, route)
                with qc.tracing() as calls:
                    y = quant_conv2d(x, w, b, padding=1, groups=groups, w_bits=wb, a_bits=ab, out_scale=s, relu=True)
                outs[calls[-1]["route"]] = y
            expected = {"gemm"} | ({"depthwise"} if groups > 1 else set()) \
                | ({"sliced"} if "sliced" in _routes_here() and groups == 1 else set())
            assert expected <= set(outs), outs.keys()
            first = outs["gemm"]
            for route, y in outs.items():
                assert torch.equal(y, first), f"{route} differs from gemm at {wb}/{ab} bits, groups={groups}"
