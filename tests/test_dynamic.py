"""The dynamic-execution core: routing equals the all-paths-then-mask execution, gradients reach
the gates, empty groups cost nothing, and the cost meter and hinge behave."""
import pytest
import torch
from torch import nn

from pyeff.dynamic import (ChannelGate, CostMeter, RecurrentGate, bit_cost, group_indices,
                           hinge_cost_loss, masked_all_paths, route, straight_through)


def _paths(c, rng):
    convs = [nn.Conv2d(c, c, 3, padding=1) for _ in range(3)]
    for conv in convs:
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng) * 0.1)
    return [lambda x: x * 0, convs[0], lambda x: convs[1](x).relu(), convs[2]]


def test_group_indices(rng):
    d = torch.randint(0, 4, (37,), generator=rng)
    groups = group_indices(d, 6)
    assert len(groups) == 6 and groups[4] is None and groups[5] is None
    seen = torch.cat([g for g in groups if g is not None]).sort().values
    assert torch.equal(seen, torch.arange(37))
    for k, g in enumerate(groups):
        if g is not None:
            assert (d[g] == k).all()


@pytest.mark.parametrize("n", [1, 5, 33])
def test_route_equals_all_paths_then_mask(n, rng):
    paths = _paths(6, rng)
    x = torch.randn(n, 6, 7, 5, generator=rng)
    d = torch.randint(0, len(paths), (n,), generator=rng)
    torch.testing.assert_close(route(x, d, paths), masked_all_paths(x, d, paths))


def test_route_single_group_runs_on_the_batch_itself(rng):
    x = torch.randn(8, 3, generator=rng)
    seen = []

    def path(t):
        seen.append(t)
        return t * 2

    out = route(x, torch.full((8,), 1), [lambda t: pytest.fail("empty group ran"), path])
    assert seen[0] is x  # no gather
    torch.testing.assert_close(out, x * 2)


def test_gradients_flow_to_inputs_paths_and_gate(rng):
    paths = _paths(4, rng)
    x = torch.randn(9, 4, 6, 6, generator=rng, requires_grad=True)
    logits = torch.randn(9, 4, generator=rng, requires_grad=True)
    decisions = torch.randperm(9, generator=rng) % 4  # every path is taken by someone
    weights = straight_through(torch.nn.functional.one_hot(decisions, 4).float(), logits.softmax(1))
    out = route(x, decisions, paths, weights=weights)
    torch.testing.assert_close(out, masked_all_paths(x, decisions, paths, weights=weights))
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0
    for k in (1, 3):
        assert paths[k].weight.grad.abs().sum() > 0


def test_recurrent_gate_gradient_reaches_its_parameters(rng):
    gate = RecurrentGate([4, 4], num_choices=3)
    f = torch.randn(6, 4, 5, 5, generator=rng)
    gate.reset()
    gate(f, 0)
    out = gate(f, 1)
    (out.weights * torch.randn(6, 3, generator=rng)).sum().backward()
    for p in (gate.head.weight, gate.cell.weight_hh, gate.proj[0].weight, gate.proj[1].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_recurrent_gate_is_deterministic_in_eval_and_carries_state(rng):
    gate = RecurrentGate([8, 8, 16], num_choices=3, bias=[0.0, 0.0, 5.0]).eval()
    f1, f2 = torch.randn(4, 8, 5, 5, generator=rng), torch.randn(4, 16, 3, 3, generator=rng)
    outs = []
    for _ in range(2):
        gate.reset()
        a = gate(f1, 0)
        b = gate(f1, 1)
        c = gate(f2, 2)
        outs.append(torch.stack([a.decisions, b.decisions, c.decisions]))
        assert (a.weights.sum(1) == 1).all() and ((a.weights == 0) | (a.weights == 1)).all()
    assert torch.equal(outs[0], outs[1])
    assert (outs[0] == 2).float().mean() > 0.5  # the bias favours choice 2
    gate.reset()
    gate(f1, 0)
    with pytest.raises(RuntimeError, match="reset"):
        gate(f1[:2], 1)


def test_channel_gate_mask_and_gradient(rng):
    cg = ChannelGate(8, 12)
    f = torch.randn(5, 8, 4, 4, generator=rng)
    soft, keep = cg(f)
    assert soft.shape == keep.shape == (5, 12) and keep.dtype == torch.bool
    assert keep.all()  # opens everything at initialisation
    torch.testing.assert_close(soft, keep.float())
    with torch.no_grad():  # a hidden unit that ReLU zeroes for every sample would carry no gradient
        cg.fc1.bias.fill_(1.0)
    soft, _ = cg(f)
    soft.sum().backward()
    # straight-through: d(sum soft)/d fc2 = sigmoid'(z) (outer) hidden, exactly as for the soft scores
    hidden = torch.relu(cg.fc1(f.mean((2, 3))))
    z = cg.fc2(hidden)
    dz = (torch.sigmoid(z) * (1 - torch.sigmoid(z))).detach()
    torch.testing.assert_close(cg.fc2.bias.grad, dz.sum(0))
    torch.testing.assert_close(cg.fc2.weight.grad, dz.t() @ hidden.detach())
    assert cg.fc2.weight.grad.abs().sum() > 0 and cg.fc1.weight.grad.abs().sum() > 0


def test_cost_meter_and_hinge():
    assert bit_cost(None) == 0 and bit_cost(32) == 1 and bit_cost(8) == pytest.approx(1 / 16)
    m = CostMeter()
    w = torch.tensor([[0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    costs = torch.tensor([bit_cost(8), bit_cost(32)])
    m.add(w @ costs)
    m.add(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(m.fraction(), torch.tensor([(1 + 1) / 2, (1 / 16) / 2]))
    assert m.percentage() == pytest.approx(100 * (1 + 1 / 32) / 2)
    above = hinge_cost_loss(m.fraction(), 0.25, beta=1.0)
    below = hinge_cost_loss(m.fraction(), 0.9, beta=1.0)
    assert above.item() > 0 > below.item()
    above.backward()
    assert w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fraction"):
        hinge_cost_loss(m.fraction(), 25, beta=1.0)


def test_bad_decisions():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="shape"):
        route(x, torch.zeros(3, dtype=torch.long), [lambda t: t, lambda t: t])
    with pytest.raises(ValueError, match="num_choices"):
        route(x, torch.tensor([0, 1, 2, 1]), [lambda t: t, lambda t: t])


def test_route_keeps_channels_last_layout(rng):
    x = torch.randn(6, 4, 5, 5, generator=rng)
    d = torch.tensor([0, 1, 0, 1, 1, 0])
    paths = [lambda t: (t * 2).contiguous(memory_format=torch.channels_last),
             lambda t: (t - 1).contiguous(memory_format=torch.channels_last)]
    out = route(x, d, paths)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, masked_all_paths(x, d, paths))


def test_route_channels_last_batch_gather_scatter_and_in_place(rng):
    # a channels_last batch is gathered and scattered as NHWC row blocks: same values, layout kept
    x = torch.randn(9, 5, 4, 3, generator=rng).contiguous(memory_format=torch.channels_last)
    d = torch.randint(0, 3, (9,), generator=rng)
    d[:3] = torch.tensor([0, 1, 2])
    seen = []
    paths = [lambda t: t, lambda t: seen.append(t) or t * 3, lambda t: seen.append(t) or t.relu()]
    want = masked_all_paths(x, d, paths)
    out = route(x, d, paths)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in seen)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, want)
    x2 = x.clone()
    out = route(x2, d, paths, identity_inplace=0)
    assert out is x2
    torch.testing.assert_close(out, want)


def test_fused_sequential_folds_bn_and_keeps_the_module(rng):
    import copy
    import io

    from pyeff.dynamic.net import FusedSequential

    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 1), nn.ReLU(inplace=True))
    with torch.no_grad():
        bn = plain[1]
        bn.running_mean.copy_(torch.randn(6, generator=rng))
        bn.running_var.copy_(torch.rand(6, generator=rng) + 0.5)
        bn.weight.copy_(torch.randn(6, generator=rng))
        bn.bias.copy_(torch.randn(6, generator=rng))
    keys = list(plain.state_dict())
    seq = FusedSequential(*plain)
    assert list(seq.state_dict()) == keys and "forward" not in seq.__dict__
    x = torch.randn(2, 3, 8, 8, generator=rng)
    seq.eval()
    with torch.no_grad():
        want = nn.Sequential.forward(seq, x)
        torch.testing.assert_close(seq(x), want)
        bn.running_mean.add_(1.0)  # the folded weights follow a change of the BN statistics
        torch.testing.assert_close(seq(x), nn.Sequential.forward(seq, x))
    seq.train()  # training (and any forward recording gradients) runs the modules as written
    y = seq(x)
    assert y.requires_grad and bn.num_batches_tracked.item() == 1
    twin = copy.deepcopy(seq)
    assert type(twin) is FusedSequential
    buf = io.BytesIO()
    torch.save(twin, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), nn.Sequential.forward(twin.eval(), x))
