"""Property-based fuzzing of pyeff.ops.quant_conv2d and quant_linear: the native CPU backend (every
route it takes) and the reference backend against quant_conv2d_reference (docs/quant_conv.md: equal
to the float64 reference up to the final rounding to the output dtype), over conv geometry (tiny
inputs, stride / padding / dilation mixed per axis, padding wider than the kernel, groups,
depthwise), channel counts around the vector widths, bit widths, a_range, out_scale, bias, ReLU,
dtypes, memory layouts, thread counts (1 and 2), value classes and the CPU route (the measured
choice, or each route forced by name where it is exact for the operands).
Failing examples found by the fuzzer are kept below as explicit regression cases."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fuzzing as fz
from pyeff.ops import quant_conv2d, quant_conv2d_reference, quant_linear
from pyeff.ops.quant_conv import CPU_PATH_ENV

# the output's rounding: float32 through oneDNN's float32 epilogue (direct route) or from float64
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ATOL = RTOL
KINDS = fz.VALUE_KINDS  # finite extremes would overflow the convolution's float output itself


@st.composite
def conv_cases(draw):
    g = draw(fz.conv_geometry())
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    return dict(g=g, dtype=dtype, xv=draw(fz.values(KINDS)),
                wv=draw(fz.values(("normal", "uniform", "integers", "outlier", "constant", "one_value", "zeros"))),
                w_bits=draw(st.integers(2, 16)), a_bits=draw(st.integers(1, 16)),
                a_range=draw(st.one_of(st.none(), st.tuples(st.floats(-4, 0), st.floats(0, 4)))),
                bias=draw(st.booleans()), out_scale=draw(st.booleans()), relu=draw(st.booleans()),
                layout=draw(fz.layouts), threads=draw(fz.threads), route=draw(ROUTE_CHOICES))


ROUTE_CHOICES = st.sampled_from(["auto", "direct", "sliced", "gemm", "depthwise", "float"])


def check_conv(c, backends=None):
    g, dtype = c["g"], c["dtype"]
    x = fz.with_layout(fz.make_values((g["N"], g["C"], g["H"], g["W"]), dtype, *c["xv"]), c["layout"])
    w = fz.make_values((g["K"], g["C"] // g["groups"], *g["kernel"]), dtype, *c["wv"])
    b = torch.linspace(-1, 1, g["K"], dtype=torch.float64).to(dtype) if c["bias"] else None
    s = torch.linspace(0.5, 2, g["K"], dtype=torch.float64).to(dtype) if c["out_scale"] else None
    kw = dict(**fz.conv_kwargs(g), w_bits=c["w_bits"], a_bits=c["a_bits"], a_range=c["a_range"], out_scale=s,
              relu=c["relu"])
    fz.log_case(c)
    with fz.num_threads(c["threads"]), fz.env(CPU_PATH_ENV, c.get("route", "auto")):
        ref = quant_conv2d_reference(x, w, b, **kw)
        bound = F.conv2d(x.double().abs(), w.double().abs(), None, g["stride"], g["padding"], g["dilation"],
                         g["groups"])
        mag = float(bound.max()) * (2.0 if s is not None else 1.0) + 1.0
        for backend in backends or fz.cpu_backends():
            got = quant_conv2d(x, w, b, **kw, backend=backend)
            assert got.shape == ref.shape and got.dtype == ref.dtype
            torch.testing.assert_close(got, ref, **fz.close_tol(ref, mag, RTOL[dtype], ATOL[dtype]),
                                       msg=lambda m: f"{backend} {c}: {m}")


def G(N, C, K, groups, kernel, stride, padding, dilation, H, W):
    return dict(N=N, C=C, K=K, groups=groups, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                H=H, W=W)


def case(g, dtype=torch.float32, xv=("normal", 0, 0), wv=("normal", 0, 0), w_bits=8, a_bits=8, a_range=None,
         bias=False, out_scale=False, relu=False, layout="contiguous", threads=2):
    return dict(g=g, dtype=dtype, xv=xv, wv=wv, w_bits=w_bits, a_bits=a_bits, a_range=a_range, bias=bias,
                out_scale=out_scale, relu=relu, layout=layout, threads=threads)


# the fuzzer's findings, kept (each failed before its fix: routes.onednn_geometry_ok, routes.sliced_ok,
# routes.onednn_groups_ok)
REGRESSIONS = [
    # segfault in oneDNN's int8 conv: tiny input, stride / padding / dilation mixed per axis, padding
    # as wide as the dilated kernel (outputs that see only padding)
    case(G(2, 8, 22, 2, (2, 1), (2, 2), (0, 3), (3, 3), 6, 1), xv=("zeros", 353815, 1), wv=("zeros", 1550490907, -3),
         w_bits=7, a_bits=7, a_range=(-0.0, 2.020834566990889), bias=True, layout="channels_last", threads=1),
    case(G(1, 1, 1, 1, (2, 1), (2, 2), (0, 3), (3, 3), 6, 1), threads=1),
    case(G(1, 13, 9, 1, (4, 2), (3, 2), (3, 3), (1, 2), 6, 1), xv=("normal", 9275, 1), wv=("uniform", 163121, -1),
         w_bits=6, a_bits=8, a_range=(-2.0651490140235462, 2.0), layout="channels_last", threads=1),
    case(G(1, 1, 2, 1, (1, 1), (1, 2), (1, 1), (3, 2), 5, 1), threads=1),
    # segfault in the sliced route: a one-row input that a dilated kernel steps over (every window
    # along the height sees only padding, though the padding is narrower than the kernel)
    case(G(3, 13, 8, 1, (3, 3), (2, 1), (4, 4), (3, 3), 1, 6), dtype=torch.bfloat16, xv=("huge_range", 2147483647, 2),
         wv=("outlier", 294, -1), w_bits=14, a_bits=13, a_range=(-1.0, 2.6592229094012585), threads=1),
    case(G(1, 4, 4, 1, (3, 3), (2, 1), (4, 4), (3, 3), 1, 6), threads=1),
    # depthwise, 9-16 bits, strided width, one thread: oneDNN's sliced convolutions (input zero point)
    # returned wrong accumulators
    case(G(1, 5, 5, 5, (1, 2), (1, 2), (0, 0), (1, 1), 2, 2), w_bits=9, a_bits=1, threads=1),
    case(G(1, 5, 5, 5, (1, 2), (1, 2), (0, 0), (1, 1), 2, 2), w_bits=16, a_bits=1, threads=1),
    # one output along a strided axis with a kernel of 3+ taps there: oneDNN returned garbage
    # (uninitialised values, different from run to run), on any channel count
    case(G(1, 1, 1, 1, (2, 4), (1, 2), (0, 0), (1, 2), 6, 7), w_bits=2, a_bits=1, threads=1),
    case(G(1, 16, 4, 1, (2, 3), (1, 3), (0, 0), (1, 2), 6, 7), threads=1),
    # the same with two taps along the strided axis (a 4x2 kernel)
    case(G(1, 1, 1, 1, (4, 2), (1, 2), (0, 0), (1, 2), 8, 3), w_bits=2, a_bits=1, threads=1),
    case(G(1, 1, 1, 1, (4, 2), (1, 3), (0, 0), (1, 3), 8, 5), w_bits=2, a_bits=1, threads=1),
    # groups with a channel count not a multiple of 4 and more than 16 outputs each
    # (routes.onednn_groups_ok): the sliced route's two stacked weight digits of 9 filters, and 17-18
    # filters direct
    dict(case(G(1, 2, 18, 2, (1, 2), (2, 1), (0, 0), (1, 1), 4, 2), w_bits=9, a_bits=1), route="sliced"),
    dict(case(G(1, 4, 18, 2, (1, 2), (1, 1), (0, 1), (1, 1), 2, 2), w_bits=9, a_bits=1), route="sliced"),
    case(G(1, 2, 36, 2, (1, 2), (1, 2), (0, 0), (1, 1), 4, 5)),
    case(G(1, 2, 34, 2, (1, 2), (1, 2), (0, 0), (1, 1), 2, 5)),
]


@pytest.mark.parametrize("c", REGRESSIONS)
def test_fuzz_conv_regressions(c):
    check_conv(c)


@fz.fuzz_settings()
@given(conv_cases())
def test_fuzz_quant_conv2d(c):
    check_conv(c)


@st.composite
def linear_cases(draw):
    return dict(lead=draw(st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple)),
                fin=draw(fz.CHANNELS), fout=draw(fz.CHANNELS), dtype=draw(fz.dtypes), xv=draw(fz.values(KINDS)),
                wv=draw(fz.values(("normal", "integers", "outlier", "one_value"))), w_bits=draw(st.integers(2, 16)),
                a_bits=draw(st.integers(1, 16)), bias=draw(st.booleans()), layout=draw(fz.layouts),
                threads=draw(fz.threads), route=draw(ROUTE_CHOICES))


def check_linear(c):
    dtype = c["dtype"]
    x = fz.with_layout(fz.make_values((*c["lead"], c["fin"]), dtype, *c["xv"]), c["layout"])
    w = fz.make_values((c["fout"], c["fin"]), dtype, *c["wv"])
    b = torch.linspace(-1, 1, c["fout"], dtype=torch.float64).to(dtype) if c["bias"] else None
    fz.log_case(c)
    with fz.num_threads(c["threads"]), fz.env(CPU_PATH_ENV, c.get("route", "auto")):
        ref = quant_conv2d_reference(x.reshape(-1, c["fin"], 1, 1), w[:, :, None, None], b, w_bits=c["w_bits"],
                                     a_bits=c["a_bits"]).reshape(*c["lead"], c["fout"])
        mag = float((x.double().abs().reshape(-1, c["fin"]) @ w.double().abs().t()).max()) + 1.0
        for backend in fz.cpu_backends():
            got = quant_linear(x, w, b, w_bits=c["w_bits"], a_bits=c["a_bits"], backend=backend)
            assert got.shape == ref.shape and got.dtype == dtype
            torch.testing.assert_close(got, ref, **fz.close_tol(ref, mag, RTOL[dtype], ATOL[dtype]),
                                       msg=lambda m: f"{backend} {c}: {m}")


@fz.fuzz_settings()
@given(linear_cases())
def test_fuzz_quant_linear(c):
    check_linear(c)
