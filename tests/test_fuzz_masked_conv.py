"""Property-based fuzzing of pyeff.ops.masked_conv2d: the native CPU backend under every strategy it
can take (auto, forced masked_dense, forced kernel) and the reference backend against
masked_conv2d_reference (tests/test_masked_conv.py tolerances: 1e-4 in float32, 1e-10 in float64,
2e-2 / 5e-2 in float16 / bfloat16, absolute error scaled by the size of the summed terms), over conv
geometry (stride / padding / dilation mixed per axis, groups, depthwise), masks (none, all on, all
off, one on, random, per sample, one shared row), dtypes, layouts, thread counts and value classes.
Failing examples found by the fuzzer are kept below as explicit regression cases."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import fuzzing as fz
from pyeff.ops import masked_conv2d, masked_conv2d_reference
from pyeff.ops.masked_conv import STRATEGY_ENV

TOL = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-10, 1e-10), torch.float16: (2e-2, 5e-2),
       torch.bfloat16: (2e-2, 5e-2)}


def strategy(name: str):
    return fz.env(STRATEGY_ENV, name)


@st.composite
def cases(draw):
    g = draw(fz.conv_geometry(max_group_channels=9))
    return dict(g=g, dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.float16,
                                                  torch.bfloat16])),
                xv=draw(fz.values()), wv=draw(fz.values(("normal", "integers", "outlier", "one_value"))),
                in_mask=draw(fz.mask_kinds), out_mask=draw(fz.mask_kinds), mseed=draw(st.integers(0, 2 ** 31 - 1)),
                bias=draw(st.booleans()), layout=draw(fz.layouts), threads=draw(fz.threads),
                strategy=draw(st.sampled_from(["auto", "masked_dense", "kernel"])))


def _ref_mask(m, channels):
    if m is None:
        return torch.ones(1, channels, dtype=torch.bool)
    return m.view(1, -1) if m.dim() == 1 else m


def check(c, backends=None):
    g, dtype = c["g"], c["dtype"]
    x = fz.with_layout(fz.make_values((g["N"], g["C"], g["H"], g["W"]), dtype, *c["xv"]), c["layout"])
    w = fz.make_values((g["K"], g["C"] // g["groups"], *g["kernel"]), dtype, *c["wv"])
    b = torch.linspace(-1, 1, g["K"], dtype=torch.float64).to(dtype) if c["bias"] else None
    im = fz.make_mask(c["in_mask"], g["N"], g["C"], c["mseed"])
    om = fz.make_mask(c["out_mask"], g["N"], g["K"], c["mseed"] + 1)
    kw = fz.conv_kwargs(g)
    fz.log_case(c)
    with fz.num_threads(c["threads"]), strategy(c["strategy"]):
        ref = masked_conv2d_reference(x, w, b, _ref_mask(im, g["C"]), _ref_mask(om, g["K"]), **kw)
        mag = float(F.conv2d(x.double().abs(), w.double().abs(), None, g["stride"], g["padding"], g["dilation"],
                             g["groups"]).max()) + 1.0
        rtol, atol = TOL[dtype]
        for backend in backends or fz.cpu_backends():
            got = masked_conv2d(x, w, b, in_mask=im, out_mask=om, **kw, backend=backend)
            assert got.shape == ref.shape and got.dtype == ref.dtype
            torch.testing.assert_close(got, ref, **fz.close_tol(ref, mag, rtol, atol),
                                       msg=lambda m: f"{backend} {c}: {m}")


# the fuzzer's findings, kept (each failed before its fix)
def G(N, C, K, groups, kernel, stride, padding, dilation, H, W):
    return dict(N=N, C=C, K=K, groups=groups, kernel=kernel, stride=stride, padding=padding, dilation=dilation,
                H=H, W=W)


def case(g, dtype, xv, wv, in_mask="none", out_mask="none", mseed=0, bias=False, layout="contiguous", threads=1,
         strategy="auto"):
    return dict(g=g, dtype=dtype, xv=xv, wv=wv, in_mask=in_mask, out_mask=out_mask, mseed=mseed, bias=bias,
                layout=layout, threads=threads, strategy=strategy)


REGRESSIONS = [
    # oneDNN's bfloat16 / float16 F.conv2d (the reference and the dense paths) segfaulted: a dilated
    # 1-tap axis with padding on a 1-pixel-wide channels_last input ...
    case(G(1, 9, 7, 1, (3, 1), (3, 2), (0, 1), (3, 3), 7, 1), torch.bfloat16, ("uniform", 4283871, 0),
         ("normal", 2978024, -1), layout="channels_last", strategy="kernel"),
    case(G(1, 9, 7, 1, (3, 1), (3, 2), (0, 1), (3, 3), 7, 1), torch.float16, ("uniform", 1, 0), ("normal", 2, 0),
         layout="channels_last"),
    # ... and a single output along a strided axis
    case(G(1, 2, 1, 1, (4, 3), (3, 1), (4, 2), (3, 2), 2, 6), torch.bfloat16, ("one_value", 21525320, 1),
         ("outlier", 472687, 0), in_mask="all_off", out_mask="random", mseed=128, bias=True, layout="strided",
         threads=2, strategy="kernel"),
    # ... and (after other convolutions ran: this one is kept for the sequence) padding beyond a tiny input
    case(G(1, 2, 1, 1, (4, 3), (1, 1), (4, 2), (3, 2), 2, 6), torch.bfloat16, ("one_value", 21525320, 1),
         ("outlier", 472687, 0), in_mask="all_off", out_mask="random", mseed=65535, bias=True,
         layout="channels_last", threads=2, strategy="kernel"),
]


@pytest.mark.parametrize("c", REGRESSIONS)
def test_fuzz_masked_regressions(c):
    check(c)


@fz.fuzz_settings()
@given(cases())
def test_fuzz_masked_conv2d(c):
    check(c)
