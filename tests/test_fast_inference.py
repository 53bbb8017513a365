"""The inference shortcuts of the dynamic networks give the same answers as the plain paths: the
recurrent gate's decisions-only path, a single sample routed without grouping; the dense
baselines every benchmark compares against (micro-batches included) compute the dense network;
the time breakdown's scopes leave nothing patched."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyeff.ddi
import pyeff.dfs
from pyeff.dynamic import RecurrentGate, route
from pyeff.dynamic import router
from pyeff.experiments.measure import dense_baselines, micro_batched
from pyeff.models import create_model
from conftest import randomise_bn

torch.set_num_threads(1)


def _net(method, rng):
    base = randomise_bn(create_model("resnet20", num_classes=5), rng)
    net = getattr(pyeff, method).convert(base).eval()
    if method == "dfs":
        net.calibrate([torch.randn(8, 3, 16, 16, generator=rng)])
    return net


def test_micro_batched_splits_only_larger_batches(rng):
    calls = []

    def fn(t):
        calls.append(t.shape[0])
        return t * 2
    x = torch.randn(10, 3, generator=rng)
    torch.testing.assert_close(micro_batched(fn, x, 4)(), x * 2)
    assert calls == [4, 4, 2]
    calls.clear()
    micro_batched(fn, x, None)(), micro_batched(fn, x, 10)()
    assert calls == [10, 10]


def test_gate_inference_path_matches_the_training_path(rng):
    """Under no_grad in eval the gate computes only its decisions; they, the carried state, and the
    probs / weights computed on demand equal the full path's (eval with autograd on)."""
    gate = RecurrentGate([8, 16], num_choices=3).eval()
    feats = [torch.randn(6, 8, 5, 5, generator=rng), torch.randn(6, 16, 3, 3, generator=rng)]
    full, lean = [], []
    gate.reset()
    for i, f in enumerate(feats):
        full.append(gate(f, i))
    gate.reset()
    with torch.no_grad():
        for i, f in enumerate(feats):
            lean.append(gate(f, i))
    for a, b in zip(full, lean):
        assert torch.equal(a.decisions, b.decisions)
        torch.testing.assert_close(b.probs, a.probs.detach())
        torch.testing.assert_close(b.weights, a.weights.detach())
        assert (b.weights.sum(1) == 1).all()
    # the probabilities' argmax is the logits' argmax
    assert torch.equal(lean[1].decisions, lean[1].probs.argmax(1))


def test_route_serves_one_sample_without_grouping(rng, monkeypatch):
    x = torch.randn(1, 4, generator=rng)
    paths = [lambda t: t + 1, lambda t: t * 3]
    monkeypatch.setattr(router, "group_indices", lambda *a: pytest.fail("grouped a single sample"))
    torch.testing.assert_close(route(x, torch.tensor([1]), paths), x * 3)
    with pytest.raises(ValueError, match="num_choices"):
        route(x, torch.tensor([2]), paths)
    with pytest.raises(ValueError, match="num_choices"):
        route(x, torch.tensor([-1]), paths)


def test_single_requests_equal_the_batch(rng):
    """A DFS net serving one image at a time gives each image the answer it gets in the batch.
    (Skip and full precision only: at low bit widths a float rounding difference between oneDNN's
    batch-1 and batch-n kernels can move a value across a quantisation step.)"""
    net = _net("dfs", rng)
    x = torch.randn(5, 3, 16, 16, generator=rng)
    full = len(net.bits) - 1
    d = torch.randint(0, 2, (5, len(net.blocks)), generator=rng) * full
    with torch.no_grad():
        with net.fixed_decisions(d):
            batch = net(x)[0]
        for i in range(5):
            with net.fixed_decisions(d[i:i + 1]):
                torch.testing.assert_close(net(x[i:i + 1])[0], batch[i:i + 1], rtol=1e-4, atol=1e-4)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("compile", [False, True])
def test_dense_baselines_all_compute_the_dense_network(compile, rng):
    """Every deployment variant (layouts, BN folded, compiled with and without freezing, micro-
    batches) returns the network's output; the micro-batched rows appear only for larger batches."""
    m = randomise_bn(_Tiny(), rng).eval()
    x = torch.randn(10, 3, 8, 8, generator=rng)
    fns = dense_baselines(m, x, "tiny", compile=compile, micro_batch=4)
    names = list(fns)
    assert "NCHW eager" in names[0] and any("micro-batches of 4" in n for n in names)
    assert any("freezing" in n for n in names) == compile
    with torch.no_grad():
        want = m(x)
        for name, fn in fns.items():
            torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4, msg=name)
    assert not any("micro" in n for n in dense_baselines(m, x[:4], "tiny", compile=False, micro_batch=4))


def test_breakdown_accounts_for_the_wall_time_and_restores_the_router(rng):
    from pyeff.bench.breakdown import CATEGORIES, breakdown

    net = _net("dfs", rng)
    x = torch.randn(16, 3, 16, 16, generator=rng)
    d = torch.randint(0, len(net.bits), (16, len(net.blocks)), generator=rng)
    saved = (router.group_indices, router.gather_rows, router.scatter_rows_)

    def fn():
        with net.fixed_decisions(d):
            return net(x)
    b = breakdown(fn, net, rounds=2)
    assert (router.group_indices, router.gather_rows, router.scatter_rows_) == saved
    assert not net.gate._forward_hooks and not net.gate._forward_pre_hooks
    assert set(CATEGORIES) <= set(b) and b["wall"] > 0
    # decisions over every bit width: float and integer convs, gates and grouping all ran and count
    assert b["gate"] > 0 and b["float conv"] > 0 and b["integer conv"] > 0 and b["grouping"] > 0
