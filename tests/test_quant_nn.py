"""pyeff.nn.QuantConv2d / QuantLinear: drop-in replacements whose widths change per call."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyeff.nn import QuantConv2d, QuantLinear
from pyeff.ops import fake_quant, quant_conv2d, quant_linear


def test_conv_from_float_and_per_call_bits(rng):
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, groups=1)
    q = QuantConv2d.from_float(conv, w_bits=8, a_bits=8)
    assert q.weight is conv.weight and q.bias is conv.bias
    x = torch.randn(2, 5, 9, 9, generator=rng)
    torch.testing.assert_close(q(x), quant_conv2d(x, conv.weight, conv.bias, 2, 1, w_bits=8, a_bits=8))
    torch.testing.assert_close(q(x, w_bits=4, a_bits=12),
                               quant_conv2d(x, conv.weight, conv.bias, 2, 1, w_bits=4, a_bits=12))
    torch.testing.assert_close(q(x, w_bits=32, a_bits=32), conv(x))
    # one operand at full precision: the float conv of the other, fake-quantised
    torch.testing.assert_close(q(x, w_bits=32, a_bits=6), conv(fake_quant(x, 6)))
    assert q.w_bits == 8 and q.a_bits == 8  # per-call widths do not stick
    assert "w_bits=8" in repr(q)


def test_conv_constructor_padding_modes_and_training(rng):
    q = QuantConv2d(4, 6, 3, padding="same", padding_mode="reflect", bias=False, w_bits=6, a_bits=6)
    x = torch.randn(3, 4, 8, 8, generator=rng, requires_grad=True)
    y = q(x)
    assert y.shape == (3, 6, 8, 8)
    ref = F.conv2d(fake_quant(F.pad(x, (1, 1, 1, 1), mode="reflect"), 6),
                   fake_quant(q.weight, 6, scheme="sym", axis=0))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert q.weight.grad is not None and x.grad is not None and x.grad.abs().sum() > 0


def test_linear(rng):
    lin = nn.Linear(13, 6)
    q = QuantLinear.from_float(lin, w_bits=9, a_bits=9)
    x = torch.randn(4, 2, 13, generator=rng)
    torch.testing.assert_close(q(x), quant_linear(x, lin.weight, lin.bias, w_bits=9, a_bits=9))
    torch.testing.assert_close(q(x, w_bits=32, a_bits=32), lin(x))
    q2 = QuantLinear(13, 6, w_bits=4, a_bits=4)
    assert q2(x).shape == (4, 2, 6)


def test_bits_checked():
    with pytest.raises(ValueError, match="w_bits=17"):
        QuantConv2d(3, 3, 3, w_bits=17)
    with pytest.raises(ValueError, match="a_bits=0"):
        QuantLinear(3, 3, a_bits=0)
    with pytest.raises(TypeError, match="integer"):
        QuantLinear(3, 3)(torch.randn(2, 3), w_bits=8.0)
    with pytest.raises(TypeError, match="nn.Conv2d"):
        QuantConv2d.from_float(nn.Linear(3, 3))


def test_compile_module(rng):
    q = QuantConv2d(3, 4, 3, padding=1, w_bits=4, a_bits=4)
    x = torch.randn(2, 3, 6, 6, generator=rng)
    torch.testing.assert_close(torch.compile(q, fullgraph=True, backend="aot_eager")(x), q(x), rtol=0, atol=0)
