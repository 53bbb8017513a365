"""Bad input to every op, one row per class (the table "Bad input" in docs/ops.md lists the same
rows): the error type, and a message that names the argument. Rows whose input is legal but unusual
(NaN in a bias, infinity with a_range, ...) check the documented result instead."""
import math
from typing import Callable, NamedTuple

import pytest
import torch

from pyeff.ops import fake_quant, masked_conv2d, masked_conv2d_reference, quant_conv2d, quant_conv2d_reference, \
    quant_linear

NAN, INF = float("nan"), float("inf")


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _with(t, value, index=(0, 0, 0, 0)):
    t = t.clone()
    t[index] = value
    return t


X, W = _x(2, 4, 6, 6), _x(8, 4, 3, 3)
HALF = torch.tensor([True, False] * 4)
META = "meta"  # a second device on every machine: device mixing fails before any kernel runs


class Row(NamedTuple):
    op: str
    what: str                 # the bad-input class, as in docs/ops.md
    call: Callable
    exc: type
    names: str                # the message must contain this (the argument it is about)


ROWS = [
    # ---------------------------------------------------------------- fake_quant
    Row("fake_quant", "x not a tensor", lambda: fake_quant([1.0, 2.0], 8), TypeError, "x must be a torch.Tensor"),
    Row("fake_quant", "x integer dtype", lambda: fake_quant(torch.ones(3, dtype=torch.int32), 8), TypeError, "x has dtype int32"),
    Row("fake_quant", "bits out of range (0)", lambda: fake_quant(X, 0), ValueError, "bits=0"),
    Row("fake_quant", "bits out of range (17)", lambda: fake_quant(X, 17), ValueError, "bits=17"),
    Row("fake_quant", "bits not an int (8.0)", lambda: fake_quant(X, 8.0), TypeError, "bits"),
    Row("fake_quant", "bits a bool", lambda: fake_quant(X, True), TypeError, "bits"),
    Row("fake_quant", "scheme unknown", lambda: fake_quant(X, 8, scheme="foo"), ValueError, "scheme"),
    Row("fake_quant", "scheme sym with 1 bit", lambda: fake_quant(X, 1, scheme="sym"), ValueError, "bits >= 2"),
    Row("fake_quant", "axis out of range", lambda: fake_quant(X, 8, axis=4), ValueError, "axis=4"),
    Row("fake_quant", "axis not an int", lambda: fake_quant(X, 8, axis=1.0), TypeError, "axis"),
    Row("fake_quant", "axis on a 0-d tensor", lambda: fake_quant(torch.tensor(1.0), 8, axis=0), ValueError, "axis"),
    Row("fake_quant", "NaN in x", lambda: fake_quant(_with(X, NAN), 8), ValueError, "x contains NaN"),
    Row("fake_quant", "inf in x", lambda: fake_quant(_with(X, INF), 8), ValueError, "x contains NaN or infinity"),
    Row("fake_quant", "NaN in x, per channel", lambda: fake_quant(_with(X, NAN), 8, axis=1), ValueError, "x contains NaN"),
    Row("fake_quant", "NaN in x, reference backend", lambda: fake_quant(_with(X, NAN), 8, backend="reference"),
        ValueError, "x contains NaN"),
    Row("fake_quant", "seed out of range", lambda: fake_quant(X, 8, stochastic=True, seed=1 << 32), ValueError, "seed"),
    Row("fake_quant", "seed negative", lambda: fake_quant(X, 8, stochastic=True, seed=-1), ValueError, "seed"),
    Row("fake_quant", "seed not an int", lambda: fake_quant(X, 8, stochastic=True, seed=1.5), TypeError, "seed"),
    Row("fake_quant", "generator not a Generator", lambda: fake_quant(X, 8, stochastic=True, generator=5), TypeError,
        "generator"),
    Row("fake_quant", "backend unknown", lambda: fake_quant(X, 8, backend="foo"), ValueError, "backend 'foo'"),
    Row("fake_quant", "backend not a string", lambda: fake_quant(X, 8, backend=3), TypeError, "backend"),
    # ---------------------------------------------------------------- quant_conv2d
    Row("quant_conv2d", "x not a tensor", lambda: quant_conv2d(X.tolist(), W), TypeError, "x must be a torch.Tensor"),
    Row("quant_conv2d", "x integer dtype", lambda: quant_conv2d(X.int(), W), TypeError, "x has dtype int32"),
    Row("quant_conv2d", "weight integer dtype", lambda: quant_conv2d(X, W.int()), TypeError, "weight has dtype"),
    Row("quant_conv2d", "weight dtype != x dtype", lambda: quant_conv2d(X, W.double()), TypeError, "weight has dtype"),
    Row("quant_conv2d", "x 3-D (unbatched)", lambda: quant_conv2d(X[0], W), ValueError, "unsqueeze(0)"),
    Row("quant_conv2d", "x 5-D", lambda: quant_conv2d(X[None], W), ValueError, "x must be 4-D"),
    Row("quant_conv2d", "weight 3-D", lambda: quant_conv2d(X, W[0]), ValueError, "weight must be 4-D"),
    Row("quant_conv2d", "device mix (weight)", lambda: quant_conv2d(X, W.to(META)), ValueError, "weight on meta"),
    Row("quant_conv2d", "device mix (bias)", lambda: quant_conv2d(X, W, torch.ones(8, device=META)), ValueError,
        "bias on meta"),
    Row("quant_conv2d", "device mix (out_scale)", lambda: quant_conv2d(X, W, out_scale=torch.ones(8, device=META)),
        ValueError, "out_scale on meta"),
    Row("quant_conv2d", "channel mismatch", lambda: quant_conv2d(X, _x(8, 3, 3, 3)), ValueError, "x has 4 channels"),
    Row("quant_conv2d", "x with 0 channels", lambda: quant_conv2d(_x(2, 0, 6, 6), _x(8, 0, 3, 3)), ValueError,
        "x has 0 channels"),
    Row("quant_conv2d", "weight with 0 outputs", lambda: quant_conv2d(X, _x(0, 4, 3, 3)), ValueError,
        "weight has 0 output channels"),
    Row("quant_conv2d", "empty kernel", lambda: quant_conv2d(X, _x(8, 4, 0, 3)), ValueError, "weight has an empty kernel"),
    Row("quant_conv2d", "x with no pixels", lambda: quant_conv2d(_x(2, 4, 0, 6), _x(8, 4, 1, 1), padding=1),
        ValueError, "x has no pixels"),
    Row("quant_conv2d", "groups 0", lambda: quant_conv2d(X, W, groups=0), ValueError, "groups"),
    Row("quant_conv2d", "groups not an int", lambda: quant_conv2d(X, W, groups=2.0), ValueError, "groups"),
    Row("quant_conv2d", "groups not dividing K", lambda: quant_conv2d(X, _x(6, 1, 3, 3), groups=4), ValueError,
        "groups=4"),
    Row("quant_conv2d", "groups not dividing C", lambda: quant_conv2d(X, _x(9, 1, 3, 3), groups=3), ValueError,
        "groups=3"),
    Row("quant_conv2d", "stride 0", lambda: quant_conv2d(X, W, stride=0), ValueError, "stride must be >= 1"),
    Row("quant_conv2d", "stride > 2**30", lambda: quant_conv2d(X, W, stride=2 ** 31 - 1), ValueError, "stride must be <="),
    Row("quant_conv2d", "stride a float", lambda: quant_conv2d(X, W, stride=1.5), TypeError, "stride"),
    Row("quant_conv2d", "stride a triple", lambda: quant_conv2d(X, W, stride=(1, 1, 1)), TypeError, "stride"),
    Row("quant_conv2d", "padding negative", lambda: quant_conv2d(X, W, padding=-1), ValueError, "padding must be >= 0"),
    Row("quant_conv2d", "padding a string ('same')", lambda: quant_conv2d(X, W, padding="same"), ValueError,
        "padding='same'"),
    Row("quant_conv2d", "dilation 0", lambda: quant_conv2d(X, W, dilation=0), ValueError, "dilation must be >= 1"),
    Row("quant_conv2d", "dilation > 2**30", lambda: quant_conv2d(X, W, dilation=2 ** 62), ValueError,
        "dilation must be <="),
    Row("quant_conv2d", "input smaller than the kernel", lambda: quant_conv2d(X[:, :, :2, :2], W), ValueError,
        "smaller than the dilated kernel"),
    Row("quant_conv2d", "bias of the wrong length", lambda: quant_conv2d(X, W, _x(7)), ValueError, "bias has 7 values"),
    Row("quant_conv2d", "bias 2-D", lambda: quant_conv2d(X, W, _x(8, 1)), ValueError, "bias must have 1 dimensions"),
    Row("quant_conv2d", "bias dtype != x dtype", lambda: quant_conv2d(X, W, _x(8).double()), TypeError, "bias has dtype"),
    Row("quant_conv2d", "bias not a tensor", lambda: quant_conv2d(X, W, [0.0] * 8), TypeError, "bias must be a torch.Tensor"),
    Row("quant_conv2d", "w_bits 1", lambda: quant_conv2d(X, W, w_bits=1), ValueError, "w_bits=1"),
    Row("quant_conv2d", "w_bits 17", lambda: quant_conv2d(X, W, w_bits=17), ValueError, "w_bits=17"),
    Row("quant_conv2d", "a_bits 0", lambda: quant_conv2d(X, W, a_bits=0), ValueError, "a_bits=0"),
    Row("quant_conv2d", "a_bits not an int", lambda: quant_conv2d(X, W, a_bits=8.0), TypeError, "a_bits"),
    Row("quant_conv2d", "a_bits None", lambda: quant_conv2d(X, W, a_bits=None), TypeError, "a_bits"),
    Row("quant_conv2d", "NaN in x", lambda: quant_conv2d(_with(X, NAN), W), ValueError, "x contains NaN"),
    Row("quant_conv2d", "inf in x", lambda: quant_conv2d(_with(X, INF), W), ValueError, "x contains NaN or infinity"),
    Row("quant_conv2d", "NaN in x with a_range", lambda: quant_conv2d(_with(X, NAN), W, a_range=(-3, 3)), ValueError,
        "x contains NaN"),
    Row("quant_conv2d", "NaN in x with a_range, 16 bits", lambda: quant_conv2d(_with(X, NAN), W, a_range=(-3, 3),
                                                                                w_bits=16, a_bits=16),
        ValueError, "x contains NaN"),
    Row("quant_conv2d", "NaN in x with a_range, reference backend",
        lambda: quant_conv2d(_with(X, NAN), W, a_range=(-3, 3), backend="reference"), ValueError, "x contains NaN"),
    Row("quant_conv2d", "NaN in x with a_range, gradient recorded",
        lambda: quant_conv2d(_with(X, NAN).requires_grad_(), W, a_range=(-3, 3)), ValueError, "x contains NaN"),
    Row("quant_conv2d", "NaN in weight", lambda: quant_conv2d(X, _with(W, NAN)), ValueError, "weight contains NaN"),
    Row("quant_conv2d", "inf in weight", lambda: quant_conv2d(X, _with(W, INF)), ValueError, "weight contains NaN"),
    Row("quant_conv2d", "a_range lo > hi", lambda: quant_conv2d(X, W, a_range=(3, -3)), ValueError, "a_range"),
    Row("quant_conv2d", "a_range with NaN", lambda: quant_conv2d(X, W, a_range=(NAN, 3)), ValueError, "a_range"),
    Row("quant_conv2d", "a_range with inf", lambda: quant_conv2d(X, W, a_range=(-3, INF)), ValueError, "a_range"),
    Row("quant_conv2d", "a_range of 3 values", lambda: quant_conv2d(X, W, a_range=(-3, 0, 3)), TypeError, "a_range"),
    Row("quant_conv2d", "a_range a scalar", lambda: quant_conv2d(X, W, a_range=3.0), TypeError, "a_range"),
    Row("quant_conv2d", "a_range a string", lambda: quant_conv2d(X, W, a_range="ab"), TypeError, "a_range"),
    Row("quant_conv2d", "out_scale of the wrong length", lambda: quant_conv2d(X, W, out_scale=torch.ones(7)), ValueError,
        "out_scale must be [8]"),
    Row("quant_conv2d", "out_scale dtype != x dtype", lambda: quant_conv2d(X, W, out_scale=torch.ones(8).double()),
        ValueError, "out_scale must be [8]"),
    Row("quant_conv2d", "out_scale 2-D", lambda: quant_conv2d(X, W, out_scale=torch.ones(8, 1)), ValueError,
        "out_scale must have 1 dimensions"),
    Row("quant_conv2d", "out_scale integer dtype", lambda: quant_conv2d(X, W, out_scale=torch.ones(8, dtype=torch.int64)),
        TypeError, "out_scale has dtype"),
    Row("quant_conv2d", "out_scale not a tensor", lambda: quant_conv2d(X, W, out_scale=[1.0] * 8), TypeError,
        "out_scale must be a torch.Tensor"),
    Row("quant_conv2d", "packs not a WeightPacks", lambda: quant_conv2d(X, W, packs={}), TypeError, "packs"),
    Row("quant_conv2d", "backend unknown", lambda: quant_conv2d(X, W, backend="foo"), ValueError, "backend 'foo'"),
    Row("quant_conv2d", "backend not a string", lambda: quant_conv2d(X, W, backend=3), TypeError, "backend"),
    # ---------------------------------------------------------------- quant_linear
    Row("quant_linear", "x integer dtype", lambda: quant_linear(torch.ones(2, 4, dtype=torch.int64), _x(3, 4)),
        TypeError, "x has dtype int64"),
    Row("quant_linear", "x 0-d", lambda: quant_linear(torch.tensor(1.0), _x(3, 4)), ValueError, "x needs at least 1"),
    Row("quant_linear", "weight 1-D", lambda: quant_linear(_x(2, 4), _x(4)), ValueError, "weight must have 2"),
    Row("quant_linear", "feature mismatch", lambda: quant_linear(_x(2, 4), _x(3, 5)), ValueError, "x has 4 features"),
    Row("quant_linear", "0 features", lambda: quant_linear(_x(2, 0), _x(3, 0)), ValueError, "weight has shape (3, 0)"),
    Row("quant_linear", "weight dtype != x dtype", lambda: quant_linear(_x(2, 4), _x(3, 4).double()), TypeError,
        "weight has dtype"),
    Row("quant_linear", "device mix", lambda: quant_linear(_x(2, 4), _x(3, 4).to(META)), ValueError, "weight on meta"),
    Row("quant_linear", "bias of the wrong length", lambda: quant_linear(_x(2, 4), _x(3, 4), _x(4)), ValueError,
        "bias has 4 values"),
    Row("quant_linear", "w_bits out of range", lambda: quant_linear(_x(2, 4), _x(3, 4), w_bits=20), ValueError,
        "w_bits=20"),
    Row("quant_linear", "a_bits out of range", lambda: quant_linear(_x(2, 4), _x(3, 4), a_bits=0), ValueError,
        "a_bits=0"),
    Row("quant_linear", "NaN in x", lambda: quant_linear(_with(_x(2, 4), NAN, (0, 0)), _x(3, 4)), ValueError,
        "x contains NaN"),
    Row("quant_linear", "packs not a WeightPacks", lambda: quant_linear(_x(2, 4), _x(3, 4), packs=3), TypeError,
        "packs"),
    # ---------------------------------------------------------------- masked_conv2d
    Row("masked_conv2d", "x integer dtype", lambda: masked_conv2d(X.int(), W), TypeError, "x has dtype int32"),
    Row("masked_conv2d", "x 3-D (unbatched)", lambda: masked_conv2d(X[0], W), ValueError, "unsqueeze(0)"),
    Row("masked_conv2d", "weight 3-D", lambda: masked_conv2d(X, W[0]), ValueError, "weight must have 4 dimensions"),
    Row("masked_conv2d", "weight dtype != x dtype", lambda: masked_conv2d(X, W.double()), ValueError, "weight"),
    Row("masked_conv2d", "device mix (weight)", lambda: masked_conv2d(X, W.to(META)), ValueError, "weight"),
    Row("masked_conv2d", "device mix (bias)", lambda: masked_conv2d(X, W, torch.ones(8, device=META)), ValueError,
        "bias"),
    Row("masked_conv2d", "device mix (mask)",
        lambda: masked_conv2d(X, W, out_mask=torch.ones(8, dtype=torch.bool, device=META)), ValueError, "out_mask is on meta"),
    Row("masked_conv2d", "channel mismatch", lambda: masked_conv2d(X, _x(8, 3, 3, 3)), ValueError, "x has 4 channels"),
    Row("masked_conv2d", "x with 0 channels", lambda: masked_conv2d(_x(2, 0, 6, 6), _x(8, 0, 3, 3), out_mask=HALF),
        ValueError, "x has 0 channels"),
    Row("masked_conv2d", "weight with 0 outputs", lambda: masked_conv2d(X, _x(0, 4, 3, 3)), ValueError,
        "weight has 0 output channels"),
    Row("masked_conv2d", "empty kernel", lambda: masked_conv2d(X, _x(8, 4, 0, 3)), ValueError, "weight has an empty kernel"),
    Row("masked_conv2d", "groups 0", lambda: masked_conv2d(X, W, groups=0), ValueError, "groups"),
    Row("masked_conv2d", "groups not dividing", lambda: masked_conv2d(X, _x(6, 1, 3, 3), groups=4), ValueError, "groups=4"),
    Row("masked_conv2d", "stride 0", lambda: masked_conv2d(X, W, stride=0), ValueError, "stride must be >= 1"),
    Row("masked_conv2d", "stride > 2**30", lambda: masked_conv2d(X, W, stride=2 ** 63), ValueError, "stride must be <="),
    Row("masked_conv2d", "stride a float", lambda: masked_conv2d(X, W, stride=1.5), TypeError, "stride"),
    Row("masked_conv2d", "padding negative", lambda: masked_conv2d(X, W, padding=-1), ValueError, "padding must be >= 0"),
    Row("masked_conv2d", "padding a string ('same')", lambda: masked_conv2d(X, W, padding="same"), TypeError, "padding"),
    Row("masked_conv2d", "dilation 0", lambda: masked_conv2d(X, W, dilation=0), ValueError, "dilation must be >= 1"),
    Row("masked_conv2d", "input smaller than the kernel", lambda: masked_conv2d(X[:, :, :2, :2], W), ValueError,
        "smaller than the dilated kernel"),
    Row("masked_conv2d", "bias of the wrong length", lambda: masked_conv2d(X, W, _x(7)), ValueError, "bias must be [8]"),
    Row("masked_conv2d", "bias dtype != x dtype", lambda: masked_conv2d(X, W, _x(8).double()), ValueError,
        "bias must be [8]"),
    Row("masked_conv2d", "in_mask of the wrong length", lambda: masked_conv2d(X, W, in_mask=torch.ones(3, dtype=torch.bool)),
        ValueError, "in_mask has shape (1, 3)"),
    Row("masked_conv2d", "in_mask with the wrong row count",
        lambda: masked_conv2d(X, W, in_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "in_mask has shape (3, 4)"),
    Row("masked_conv2d", "in_mask 3-D", lambda: masked_conv2d(X, W, in_mask=torch.ones(1, 1, 4, dtype=torch.bool)),
        ValueError, "in_mask has shape"),
    Row("masked_conv2d", "in_mask float dtype", lambda: masked_conv2d(X, W, in_mask=torch.ones(4)), TypeError,
        "in_mask has dtype float32"),
    Row("masked_conv2d", "in_mask a list", lambda: masked_conv2d(X, W, in_mask=[True] * 4), TypeError,
        "in_mask must be a bool tensor"),
    Row("masked_conv2d", "out_mask of the wrong length", lambda: masked_conv2d(X, W, out_mask=torch.ones(7, dtype=torch.bool)),
        ValueError, "out_mask has shape (1, 7)"),
    Row("masked_conv2d", "out_mask uint8 dtype", lambda: masked_conv2d(X, W, out_mask=torch.ones(8, dtype=torch.uint8)),
        TypeError, "out_mask has dtype uint8"),
    Row("masked_conv2d", "backend unknown", lambda: masked_conv2d(X, W, backend="foo"), ValueError, "backend 'foo'"),
    Row("masked_conv2d", "backend not a string", lambda: masked_conv2d(X, W, backend=3), TypeError, "backend"),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.op}-{r.what}" for r in ROWS])
def test_bad_input_raises(row):
    with pytest.raises(row.exc) as info:
        row.call()
    msg = str(info.value)
    assert f"pyeff.ops.{row.op}" in msg, msg
    assert row.names in msg, msg


def test_rows_are_distinct():
    keys = [(r.op, r.what) for r in ROWS]
    assert len(keys) == len(set(keys))


def test_docs_table_lists_every_row():
    """docs/ops.md's table "Bad input" has one line per row here (op and class)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "ops.md").read_text()
    section = text.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    for r in ROWS:
        assert f"| `{r.op}` | {r.what} |" in section, (r.op, r.what)


# ------------------------------------------------------------------------------------------------
# legal but unusual input: the documented result, equal to the reference


def test_quant_conv2d_inf_with_a_range_saturates():
    xi = _with(_with(X, INF), -INF, (1, 1, 1, 1))
    y = quant_conv2d(xi, W, padding=1, a_range=(-3.0, 3.0))
    ref = quant_conv2d_reference(xi, W, padding=1, a_range=(-3.0, 3.0))
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, ref.to(y.dtype), rtol=1e-5, atol=1e-5)


def test_quant_conv2d_a_range_nan_check_finds_one_nan_among_infinities():
    # +inf and -inf make the cheap sum NaN: the exact pass decides, so no false alarm
    xi = _with(_with(X, INF), -INF, (1, 1, 1, 1))
    quant_conv2d(xi, W, a_range=(-1.0, 1.0))
    with pytest.raises(ValueError, match="x contains NaN"):
        quant_conv2d(_with(xi, NAN, (1, 3, 2, 2)), W, a_range=(-1.0, 1.0))


def test_quant_conv2d_a_range_huge_finite_values_pass():
    # the sum overflows to inf (not NaN): no NaN, no error
    xb = X.clone()
    xb[0] = 3e38
    quant_conv2d(xb, W, a_range=(-1.0, 1.0))


@pytest.mark.parametrize("where", ["bias", "out_scale"])
def test_quant_conv2d_nan_in_bias_or_out_scale_propagates(where):
    t = _with(torch.ones(8), NAN, (2,))
    kw = {"bias": t} if where == "bias" else {"out_scale": t}
    y = quant_conv2d(X, W, **kw)
    ref = quant_conv2d_reference(X, W, **kw)
    assert torch.isnan(y[:, 2]).all() and torch.isnan(ref[:, 2]).all()
    assert bool(torch.isfinite(y[:, 3:]).all())


def test_masked_conv2d_nan_in_x_propagates_like_the_reference():
    xn = _with(X, NAN)
    y = masked_conv2d(xn, W, out_mask=HALF)
    ref = masked_conv2d_reference(xn, W, None, torch.ones(1, 4, dtype=torch.bool), HALF[None])
    torch.testing.assert_close(y, ref, equal_nan=True)


def test_masked_conv2d_nan_in_an_inactive_input_channel_is_never_read():
    xn = _with(X, NAN, (0, 1, 0, 0))
    in_mask = torch.tensor([True, False, True, True])
    y = masked_conv2d(xn, W, in_mask=in_mask, out_mask=HALF)
    assert bool(torch.isfinite(y).all())
    assert not math.isnan(float(y.sum()))


# ------------------------------------------------------------------------------------------------
# the compiled kernels' own entry points (torch.ops.pyeff.*): internal, but reachable by anyone;
# bad arguments must raise, never crash (make sanitize runs this under ASan + UBSan)

_KERNEL_CALLS = r'''
import torch
import pyeff._extension
P = torch.ops.pyeff
x = torch.randn(2, 4, 6, 6)
u8 = torch.randint(0, 255, (1, 2, 4, 6, 6), dtype=torch.uint8)
acc = [torch.zeros(72, 8, dtype=torch.int32)]
corr = torch.zeros(1, 8, dtype=torch.float64)
t, f = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 8, dtype=torch.bool)
w = torch.randn(8, 4, 3, 3)
calls = {
    "minmax axis": lambda: P.fake_quant_minmax(x, 9),
    "minmax empty": lambda: P.fake_quant_minmax(torch.empty(0), None),
    "apply short scale": lambda: P.fake_quant_apply(x, torch.ones(1), torch.ones(1), torch.zeros(1), 0, 255, 1, None),
    "apply qmin > qmax": lambda: P.fake_quant_apply(x, torch.ones(1), torch.ones(1), torch.zeros(1), 255, 0, None, None),
    "quantize slices 0": lambda: P.quant_conv_quantize(x, torch.ones(1), torch.zeros(1), 255, 0),
    "quantize_auto a_range": lambda: P.quant_conv_quantize_auto(x, [1.0], 255, 1),
    "quantize_auto qmax": lambda: P.quant_conv_quantize_auto(x, None, -3, 1),
    "im2col pad_digits": lambda: P.quant_conv_im2col(u8, [], [3, 3], [1, 1], [1, 1], [1, 1], 1, 36),
    "im2col stride 0": lambda: P.quant_conv_im2col(u8, [0], [3, 3], [0, 0], [1, 1], [1, 1], 1, 36),
    "im2col kernel < 0": lambda: P.quant_conv_im2col(u8, [0], [-3, 3], [1, 1], [1, 1], [1, 1], 1, 36),
    "im2col k_pad": lambda: P.quant_conv_im2col(u8, [0], [3, 3], [1, 1], [1, 1], [1, 1], 1, 3),
    "window_sums stride 0": lambda: P.quant_conv_window_sums(u8, [0], 1, [3, 3], [0, 0], [1, 1], [1, 1]),
    "window_sums groups": lambda: P.quant_conv_window_sums(u8, [0], 3, [3, 3], [1, 1], [1, 1], [1, 1]),
    "epilogue no acc": lambda: P.quant_conv_epilogue([], corr, 1, None, 1.0, torch.ones(8), None, [2, 8, 6, 6], torch.float32),
    "epilogue short acc": lambda: P.quant_conv_epilogue([acc[0][:10]], corr, 1, None, 1.0, torch.ones(8), None, [2, 8, 6, 6], torch.float32),
    "epilogue w_scale": lambda: P.quant_conv_epilogue(acc, corr, 1, None, 1.0, torch.ones(2), None, [2, 8, 6, 6], torch.float32),
    "epilogue bias": lambda: P.quant_conv_epilogue(acc, corr, 1, None, 1.0, torch.ones(8), torch.ones(2), [2, 8, 6, 6], torch.float32),
    "epilogue slices_w 0": lambda: P.quant_conv_epilogue(acc, corr, 0, None, 1.0, torch.ones(8), None, [2, 8, 6, 6], torch.float32),
    "masked fwd in_mask": lambda: P.masked_conv2d_fwd(x, w, None, t[:, :2], f, [1, 1], [1, 1], [1, 1], 1),
    "masked fwd bias": lambda: P.masked_conv2d_fwd(x, w, torch.ones(2), t, f, [1, 1], [1, 1], [1, 1], 1),
    "masked fwd stride 0": lambda: P.masked_conv2d_fwd(x, w, None, t, f, [0, 0], [1, 1], [1, 1], 1),
    "masked fwd groups": lambda: P.masked_conv2d_fwd(x, w, None, t, f, [1, 1], [1, 1], [1, 1], 3),
    "masked wgrad grad_out": lambda: P.masked_conv2d_weight_grad(torch.randn(2, 8, 3, 3), x, t, f, [3, 3], [1, 1], [1, 1], [1, 1], 1),
    "masked wgrad in_mask": lambda: P.masked_conv2d_weight_grad(torch.randn(2, 8, 6, 6), x, t[:, :2], f, [3, 3], [1, 1], [1, 1], [1, 1], 1),
}
for name, call in calls.items():
    try:
        call()
    except RuntimeError:
        print("raised", name, flush=True)
    else:
        print("NO ERROR", name, flush=True)
'''


def test_kernel_entry_points_reject_bad_arguments():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from pyeff import _extension

    if not _extension.loaded():
        pytest.skip("pyeff._C is not built")
    so, root = Path(_extension._C.__file__), Path(__file__).resolve().parents[1]
    newest = max(p.stat().st_mtime for p in (root / "csrc").rglob("*.cpp"))
    if so.is_relative_to(root / "pyeff") and so.stat().st_mtime < newest:
        pytest.skip("pyeff._C is older than csrc/: rebuild it (pip install --no-build-isolation -e .)")
    out = subprocess.run([sys.executable, "-P", "-c", _KERNEL_CALLS], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert out.returncode == 0, f"the process died ({out.returncode}) after: {out.stdout[-300:]}\n{out.stderr[-3000:]}"
    assert "NO ERROR" not in out.stdout, out.stdout
    assert out.stdout.count("raised") == _KERNEL_CALLS.count("lambda:")
