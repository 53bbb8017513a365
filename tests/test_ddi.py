"""pyeff.ddi: open gates == the base model, routed == masked == training-mode execution for the
same decisions on every supported block type, gate gradients, cost tables, budgets (no sample over
budget on random inputs), static pruning, the recipe hook, save/load and input errors."""
import pytest
import torch
import torch.nn as nn

from pyeff.ddi import convert
from pyeff.ddi.prune import prune_inner_channels, prune_to_flops
from pyeff.dynamic import module_flops, route
from pyeff.models import create_model
from conftest import randomise_bn

torch.set_num_threads(1)


def _model(name, g):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    if name.startswith("torchvision."):
        import torchvision
        m = getattr(torchvision.models, name.split(".", 1)[1])(num_classes=5)
        return randomise_bn(m, g), (3, 32, 32)
    kw = {"depth": 16, "growth": 6} if name == "densenet" else {}
    if name == "densenet":
        from pyeff.models import CifarDenseNet
        return randomise_bn(CifarDenseNet(num_classes=5, **kw), g), (3, 16, 16)
    return randomise_bn(create_model(name, num_classes=5), g), (3, 16, 16)


MODELS = ["resnet20", "preresnet20", "densenet", "torchvision.resnet18", "torchvision.resnet50"]


def _random_decisions(net, n, g, p_exec=0.5, p_ch=0.5):
    G = len(net.blocks)
    ex = torch.rand(n, G, generator=g) < p_exec
    if net.channel_mode == "width":
        return ex, [torch.randint(0, len(b.counts), (n,), generator=g) for b in net.blocks]
    ch = [torch.rand(n, b.width, generator=g) < p_ch for b in net.blocks]
    if n > 1:  # the extremes too: a sample with every channel off, one with every channel on
        for c in ch:
            c[0] = False
            c[-1] = True
    return ex, ch


@pytest.mark.parametrize("mode", ["mask", "width"])
@pytest.mark.parametrize("name", MODELS)
def test_open_gates_equal_base_model(name, mode, rng):
    base, size = _model(name, rng)
    net = convert(base, input_size=size, channel_mode=mode).eval()
    x = torch.randn(5, *size, generator=rng)
    G = len(net.blocks)
    with torch.no_grad():
        ref = base(x)
        with net.all_open():
            a, aux_a = net(x)
        full = [torch.full((5,), len(b.counts) - 1) if mode == "width" else torch.ones(5, b.width, dtype=torch.bool)
                for b in net.blocks]
        with net.forced(execute=torch.ones(G, dtype=torch.bool), channels=full):
            b, aux_b = net(x)
    tol = 1e-4  # another summation order: the stem runs channels_last, width mode reorders inner channels
    torch.testing.assert_close(a, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(b, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(aux_b["cost"], torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["mask", "width"])
@pytest.mark.parametrize("name", MODELS)
def test_routed_equals_masked_and_training_execution(name, mode, rng):
    base, size = _model(name, rng)
    net = convert(base, input_size=size, channel_mode=mode).eval()
    n = 6
    x = torch.randn(n, *size, generator=rng)
    ex, ch = _random_decisions(net, n, rng)
    with torch.no_grad(), net.forced(execute=ex, channels=ch):
        routed, aux_r = net(x)
        with net.execution("masked"):
            masked, aux_m = net(x)
        net.train()
        for m in net.modules():  # training-mode execution (dense convs, masks as multiplies), BN frozen
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        trained, aux_t = net(x)
        net.eval()
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(routed, trained, rtol=1e-4, atol=1e-4)
    assert torch.equal(aux_r["execute"], ex)
    torch.testing.assert_close(aux_r["cost"].float(), aux_t["cost"].float())
    # a sample's output does not depend on the other samples' decisions
    with torch.no_grad(), net.forced(execute=ex[2:3], channels=[c[2:3] for c in ch]):
        alone, _ = net(x[2:3])
    torch.testing.assert_close(alone, routed[2:3], rtol=1e-4, atol=1e-4)


def test_cost_matches_hand_computation(rng):
    base, size = _model("resnet20", rng)
    net = convert(base, input_size=size).eval()
    t = net.table
    x1 = torch.zeros(1, *size)
    assert t.dense == pytest.approx(module_flops(base, x1), rel=1e-9)  # FLOPs of every conv and linear
    G = len(net.blocks)
    ex, ch = _random_decisions(net, 4, rng)
    with torch.no_grad(), net.forced(execute=ex, channels=ch):
        _, aux = net(torch.randn(4, *size, generator=rng))
    expect = torch.full((4,), sum(t.ungated) + t.head, dtype=torch.float64)
    for j, (blk, cb) in enumerate(zip(net.blocks, t.blocks)):
        r = ch[j].double().mean(1)
        expect += cb.fixed + ex[:, j].double() * (cb.c0 + cb.c1 * r + cb.c2 * r * r)
    torch.testing.assert_close(aux["cost"], expect / t.dense)
    # a skipped 2-conv block saves exactly its two convs' FLOPs
    blk = net.blocks[0].block
    convs = module_flops(blk.conv1, torch.zeros(1, blk.conv1.in_channels, 16, 16)) + \
        module_flops(blk.conv2, torch.zeros(1, blk.conv2.in_channels, 16, 16))
    assert t.blocks[0].c1 == pytest.approx(convs) and t.blocks[0].c0 == 0 and G == 8


@pytest.mark.parametrize("unit,mode", [("flops", "mask"), ("energy", "mask"), ("latency", "mask"),
                                       ("flops", "width"), ("latency", "width")])
@pytest.mark.parametrize("name", ["resnet20", "densenet"])
def test_no_sample_exceeds_the_budget(name, unit, mode, rng):
    base, size = _model(name, rng)
    net = convert(base, cost=unit, input_size=size, channel_mode=mode).eval()
    # gates that execute and keep almost everything, so the budget has to do the work
    with torch.no_grad():
        net.gate.head.bias.copy_(torch.tensor([-3.0, 3.0]))
    lo = net.min_budget()
    for budget in (lo + 0.01, 0.3, 0.5, 0.8, 1.0):
        if budget < lo:
            continue
        net.set_budget(budget)
        for _ in range(2):
            x = torch.randn(9, *size, generator=rng) * float(torch.rand(1, generator=rng) * 3 + 0.1)
            with torch.no_grad():
                logits, aux = net(x)
            assert logits.shape == (9, 5) and torch.isfinite(logits).all()
            assert float(aux["cost"].max()) <= budget * (1 + 1e-9), (budget, aux["cost"])
        assert aux["halted_at"] == net.halt_stage
    net.set_budget(None)
    with pytest.raises(ValueError, match="below the cheapest exit"):
        net.set_budget(lo * 0.5)


def test_budget_halting_and_tightening(rng):
    base, size = _model("resnet20", rng)
    net = convert(base, input_size=size, channel_gates=False, layer_gates=False).eval()
    t = net.table
    x = torch.randn(4, *size, generator=rng)
    # halting alone: the deepest exit whose full cost fits, every block in full before it
    b = (t.full_to(1) + 1.0) / t.dense
    net.set_budget(b, tighten=False)
    assert net.halt_stage == 1
    with torch.no_grad():
        _, aux = net(x)
    torch.testing.assert_close(aux["cost"], torch.full((4,), t.full_to(1) / t.dense, dtype=torch.float64))
    assert aux["execute"][:, :5].all() and len(aux["exits"]) == 1  # only the exit that answered ran
    # with tightening the same budget reaches the final classifier by skipping late blocks
    net.set_budget(b)
    assert net.halt_stage == 2
    with torch.no_grad():
        _, aux = net(x)
    assert not aux["execute"].all() and float(aux["cost"].max()) <= b
    with pytest.raises(ValueError, match="exit must be"):
        net.set_budget(0.9, exit=5)
    with pytest.raises(ValueError, match="budget is a fraction"):
        net.set_budget(-0.5)


def test_tune_budget_picks_best_exit(rng):
    base, size = _model("resnet20", rng)
    net = convert(base, input_size=size).eval()
    xs = [(torch.randn(8, *size, generator=rng), torch.randint(0, 5, (8,), generator=rng)) for _ in range(2)]
    res = net.tune_budget(xs, [0.4, 1.0])
    for b, r in res.items():
        assert r["accuracy"] == max(r["per_exit"].values())
        net.set_budget(b)
        assert net.halt_stage == r["exit"]


@pytest.mark.parametrize("name", ["resnet20", "densenet", "torchvision.resnet50"])
def test_gate_gradients_flow(name, rng):
    base, size = _model(name, rng)
    net = convert(base, input_size=size).train()
    logits, aux = net(torch.randn(4, *size, generator=rng))
    loss = logits.logsumexp(1).mean() + aux["cost"].mean() + sum(e.logsumexp(1).mean() for e in aux["exits"])
    loss.backward()
    assert net.gate.head.weight.grad is not None and net.gate.head.weight.grad.abs().sum() > 0
    cg = [b.channel_gate.fc2.weight.grad for b in net.blocks]
    assert all(g is not None for g in cg) and sum(float(g.abs().sum()) for g in cg) > 0
    assert all(e.fc.weight.grad.abs().sum() > 0 for e in net.exits)


def test_route_identity_inplace(rng):
    x = torch.randn(6, 3, generator=rng)
    d = torch.tensor([0, 1, 0, 1, 1, 0])
    paths = [lambda t: t, lambda t: t * 2 + 1]
    expect = route(x, d, paths)
    y = x.clone()
    with torch.no_grad():
        out = route(y, d, paths, identity_inplace=0)
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(out, expect)
    # with gradients recorded the input is left alone
    z = x.clone().requires_grad_()
    out = route(z, d, paths, identity_inplace=0)
    assert out.data_ptr() != z.data_ptr()
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("name", ["resnet20", "preresnet20", "densenet", "torchvision.resnet50"])
def test_static_pruning(name, rng):
    base, size = _model(name, rng)
    x = torch.randn(3, *size, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(prune_inner_channels(base, 1.0)(x), base(x))
        slim = prune_inner_channels(base, 0.5).eval()
        assert slim(x).shape == base(x).shape
    slim, keep = prune_to_flops(base, 0.5, size)
    f = module_flops(slim, x[:1]) / module_flops(base, x[:1])
    assert 0.4 < f <= 0.5 and 0 < keep < 1
    net = convert(slim, input_size=size)  # a pruned network can be gated
    assert net.blocks[0].width == net.blocks[0].block.conv1.out_channels < base.get_submodule(
        net.block_names[0]).conv1.out_channels
    with pytest.raises(ValueError, match="keep"):
        prune_inner_channels(base, 0.0)


def test_sort_inner_channels_keeps_the_function(rng):
    from pyeff.ddi.prune import sort_inner_channels
    from pyeff.dynamic import block_spec

    for name in ("resnet20", "densenet", "torchvision.resnet50"):
        base, size = _model(name, rng)
        x = torch.randn(2, *size, generator=rng)
        import copy
        sorted_ = sort_inner_channels(copy.deepcopy(base))
        with torch.no_grad():
            torch.testing.assert_close(sorted_(x), base(x), rtol=1e-4, atol=1e-4)  # summation order changes
        blk = next(m for m in sorted_.modules() if block_spec(m) is not None)
        norms = blk.conv1.weight.abs().flatten(1).sum(1)
        assert torch.all(norms[:-1] >= norms[1:])


def test_errors(rng):
    base, size = _model("resnet20", rng)
    net = convert(base, input_size=size)
    G = len(net.blocks)
    with pytest.raises(ValueError, match="bool tensor"):
        with net.forced(execute=torch.ones(G)):
            pass
    with pytest.raises(ValueError, match="one entry per gated block"):
        with net.forced(channels=[None]):
            pass
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        net(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="cost must be"):
        convert(base, cost="watts")
    with pytest.raises(TypeError, match="not supported"):
        convert(create_model("vgg11"))
    with pytest.raises(TypeError, match="already a DDINet"):
        convert(net)
    with pytest.raises(ValueError, match="execution"):
        with net.execution("simulate"):
            pass
    wnet = convert(base, input_size=size, channel_mode="width")
    with pytest.raises(ValueError, match="width indices"):
        with wnet.forced(channels=[torch.ones(2, b.width, dtype=torch.bool) for b in wnet.blocks]):
            pass
    with pytest.raises(ValueError, match="channel_mode"):
        convert(base, channel_mode="slices")
    with pytest.raises(ValueError, match="widths"):
        convert(base, channel_mode="width", widths=(0.0, 1.0))


def test_hook_trains_exits_and_moves_cost(tmp_path):
    from pyeff.data import load_dataset
    from pyeff.ddi.recipe import DDIHook, load_ddi, save_ddi
    from pyeff.train import TrainConfig, run_training

    train = load_dataset("shapes", "train", seed=0).subset(128, seed=0)
    test = load_dataset("shapes", "test", seed=0).subset(32, seed=0)
    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=train.num_classes, in_channels=train.images.shape[1])
    net = convert(base, input_size=tuple(train.images.shape[1:]))
    cfg = TrainConfig(model="resnet20", dataset="shapes", epochs=2, batch_size=16, lr=0.05, weight_decay=1e-4,
                      out_dir=str(tmp_path / "run"), overwrite=True, device="cpu", augment=False)
    tr = run_training(cfg, hooks=[DDIHook(target=20.0, beta=20.0)], model=net, data=(train, test), verbose=False,
                      optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    h = tr.history
    assert {"computation_pct", "train_computation_pct", "exit0_acc", "exit1_acc"} <= set(h[-1])
    assert min(r["train_computation_pct"] for r in h) < 90  # the gates start at ~100%
    net = tr.model.eval()
    path = str(tmp_path / "ddi.pt")
    save_ddi(net, path, model="resnet20", dataset="shapes", num_classes=train.num_classes,
             in_channels=train.images.shape[1])
    net2, meta = load_ddi(path)
    x = torch.randn(4, *train.images.shape[1:])
    with torch.no_grad():
        a, aux_a = net(x)
        b, aux_b = net2(x)
    torch.testing.assert_close(a, b)
    assert torch.equal(aux_a["execute"], aux_b["execute"]) and meta["model"] == "resnet20"
    with pytest.raises(FileNotFoundError):
        load_ddi(str(tmp_path / "missing.pt"))


def test_densenet_model():
    m = create_model("densenet40", num_classes=7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="6n\\+4"):
        create_model("densenet40").__class__(depth=41)


def test_downsampling_blocks_run_unless_asked(rng):
    base, size = _model("resnet20", rng)
    net = convert(base, input_size=size).eval()
    gated = [b.layer_gated for b in net.blocks]
    assert gated == [b.identity_skip for b in net.blocks] and not all(gated)
    with torch.no_grad():
        net.gate.head.bias.copy_(torch.tensor([5.0, -5.0]))  # the gate wants to skip everything
        _, aux = net(torch.randn(3, *size, generator=rng))
    assert torch.equal(aux["execute"], torch.tensor([not g for g in gated]).expand(3, -1))
    assert all(b.layer_gated for b in convert(base, input_size=size, skip_downsampling=True).blocks)


def test_cli_train_and_eval(tmp_path, capsys):
    import json

    from pyeff.cli import main

    out = str(tmp_path / "run")
    rc = main(["ddi", "train", "--model", "resnet20", "--train-subset", "64", "--test-subset", "32", "--base-epochs",
               "1", "--ddi-epochs", "1", "--batch-size", "32", "--device", "cpu", "--target", "50", "--out", out])
    assert rc == 0 and "saved" in capsys.readouterr().out
    js = str(tmp_path / "eval.json")
    rc = main(["ddi", "eval", "--checkpoint", f"{out}/ddi.pt", "--test-subset", "32", "--batch-size", "16",
               "--budgets", "0.6,1", "--time", "0.05", "--json", js])
    assert rc == 0
    res = json.load(open(js))
    assert [r["budget"] for r in res["runs"]] == [None, 0.6, 1.0]
    assert res["runs"][1]["max_cost_pct"] <= 60 + 1e-6
    assert main(["ddi", "eval", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
