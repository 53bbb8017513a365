"""pyeff.nn.QuantConv2d / QuantLinear: drop-in replacements whose widths change per call, and
quant_conv2d_of; their packed weights follow every change of the weight."""
import copy as copy_module
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyeff.nn import QuantConv2d, QuantLinear, quant_conv2d_of
from pyeff.ops import fake_quant, quant_conv2d, quant_conv2d_reference, quant_linear
from pyeff.ops.packs import WeightPacks, clear_packs, packs_of


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


# ---- the packed weights live on the layer and follow every change of the weight ------------------

def _conv_layer(rng):
    q = QuantConv2d(4, 6, 3, padding=1, w_bits=8, a_bits=8)
    return q, torch.randn(2, 4, 7, 7, generator=rng)


def _want_conv(q, x):
    return quant_conv2d_reference(x, q.weight.detach(), q.bias.detach(), padding=1, w_bits=q.w_bits, a_bits=q.a_bits)


def _want_linear(q, x):
    w, b = q.weight.detach(), q.bias.detach()
    return quant_conv2d_reference(x[:, :, None, None], w[:, :, None, None], b, w_bits=q.w_bits,
                                  a_bits=q.a_bits).reshape(x.shape[0], -1)


EDITS = {"data_mul": lambda p: p.data.mul_(2), "data_row": lambda p: p.data.__setitem__(0, 0.0),
         "no_grad_add": lambda p: torch.no_grad()(p.add_)(1.0), "data_assign": lambda p: setattr(p, "data", -p.data)}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("grad", [False, True])
def test_layers_follow_weight_edits(edit, grad, rng):
    conv, x = _conv_layer(rng)
    lin, xl = QuantLinear(9, 5), torch.randn(3, 9, generator=rng)
    for layer, inp, want in ((conv, x, _want_conv), (lin, xl, _want_linear)):
        with torch.set_grad_enabled(grad):
            # float32 kernels against the float64 reference; a stale form would be off by far more
            torch.testing.assert_close(layer(inp), want(layer, inp), rtol=1e-4, atol=1e-4)
            EDITS[edit](layer.weight)
            torch.testing.assert_close(layer(inp), want(layer, inp), rtol=1e-4, atol=1e-4)


def test_layers_follow_optimizer_steps_and_load_state_dict(rng):
    conv, x = _conv_layer(rng)
    lin, xl = QuantLinear(9, 5), torch.randn(3, 9, generator=rng)
    # float32 kernels against the float64 reference; a stale form would be off by far more
    close = dict(rtol=1e-4, atol=1e-4)
    for layer, inp, want in ((conv, x, _want_conv), (lin, xl, _want_linear)):
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(2):
            with torch.no_grad():
                before = layer(inp)
                torch.testing.assert_close(before, want(layer, inp), **close)
            layer(inp).sum().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                assert not torch.allclose(layer(inp), before, **close)
        with torch.no_grad():
            torch.testing.assert_close(layer(inp), want(layer, inp), **close)
        other = type(layer)(*((4, 6, 3) if layer is conv else (9, 5)), **({"padding": 1} if layer is conv else {}))
        layer.load_state_dict(other.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(layer(inp), want(other, inp), **close)


def test_copies_of_a_layer_carry_no_packs(rng, tmp_path):
    q, x = _conv_layer(rng)
    with torch.no_grad():
        q(x)
    assert len(packs_of(q)) > 0
    for copy in (copy_module.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert len(packs_of(copy)) == 0
        torch.testing.assert_close(copy(x), q(x))
    torch.save(q, tmp_path / "q.pt")
    loaded = torch.load(tmp_path / "q.pt", weights_only=False)
    assert len(packs_of(loaded)) == 0
    with torch.no_grad():
        loaded.weight.mul_(3)  # the copy's weight is its own: the original's forms are untouched
    torch.testing.assert_close(q(x), _want_conv(q, x))
    torch.testing.assert_close(loaded(x), _want_conv(loaded, x))
    assert "_pyeff_packs" not in q.state_dict()


def test_quant_conv2d_of(rng):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
    x = torch.randn(2, 4, 9, 9, generator=rng)
    want = quant_conv2d(x, conv.weight, conv.bias, 2, 1, 1, 2, w_bits=6, a_bits=7)
    with torch.no_grad():
        torch.testing.assert_close(quant_conv2d_of(conv, x, w_bits=6, a_bits=7), want)
        assert len(packs_of(conv)) > 0
        torch.testing.assert_close(quant_conv2d_of(conv, x, w_bits=6, a_bits=7, bias=None),
                                   quant_conv2d(x, conv.weight, None, 2, 1, 1, 2, w_bits=6, a_bits=7))
        s = torch.rand(6, generator=rng)
        torch.testing.assert_close(
            quant_conv2d_of(conv, x, w_bits=8, a_bits=8, a_range=(-1.0, 2.0), out_scale=s, relu=True),
            quant_conv2d(x, conv.weight, conv.bias, 2, 1, 1, 2, w_bits=8, a_bits=8, a_range=(-1.0, 2.0),
                         out_scale=s, relu=True))
        conv.weight.data.mul_(-1)
        torch.testing.assert_close(quant_conv2d_of(conv, x, w_bits=6, a_bits=7),
                                   quant_conv2d(x, conv.weight, conv.bias, 2, 1, 1, 2, w_bits=6, a_bits=7))
    same = nn.Conv2d(4, 6, 3, padding="same", padding_mode="circular")
    torch.testing.assert_close(quant_conv2d_of(same, x, w_bits=8, a_bits=8),
                               quant_conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), same.weight, same.bias,
                                            w_bits=8, a_bits=8))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        quant_conv2d_of(nn.Linear(3, 3), x, w_bits=8, a_bits=8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_outputs_take_in_place_ops(dtype, rng):
    # regression: torch.relu_ on the output raised "Output 0 of View is a view and is being modified inplace"
    lin = QuantLinear(8, 4).to(dtype)
    x = torch.randn(2, 8, generator=rng, dtype=dtype, requires_grad=True)
    torch.relu_(lin(x)).sum().backward()
    conv = QuantConv2d(3, 4, 3).to(dtype)
    xc = torch.randn(2, 3, 5, 5, generator=rng, dtype=dtype, requires_grad=True)
    torch.relu_(conv(xc)).sum().backward()
    assert x.grad is not None and xc.grad is not None


def test_weight_packs_rebuild_exactly_when_a_source_changes(rng):
    w, v = torch.randn(4, 3, generator=rng), torch.randn(4, generator=rng)
    packs, built = WeightPacks(), []

    def get(key=("k",), sources=(w, v, None)):
        return packs.get(key, sources, lambda: built.append(1) or len(built))

    assert get() == 1 and get() == 1  # unchanged: built once
    w.data[1, 2] += 1  # through .data: the version counter does not move, the contents do
    assert get() == 2
    with torch.no_grad():
        v.mul_(1.0)  # a new version with the same contents: the form is still valid
    assert get() == 2
    assert get(("other",)) == 3 and get() == 2  # keys are independent
    assert get(sources=(v, w, None)) == 4  # other sources under the same key
    other = w.clone()
    assert get(sources=(other, v, None)) == 5  # another tensor with equal contents
    assert len(packs) == 2
    holder = nn.Linear(3, 4)
    packs_of(holder).get(("k",), (holder.weight,), lambda: 0)
    clear_packs(nn.Sequential(holder))
    assert len(packs_of(holder)) == 0
    assert len(copy_module.deepcopy(packs)) == 0 and len(pickle.loads(pickle.dumps(packs))) == 0
