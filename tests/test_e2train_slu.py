"""pyeff.e2train SLU (selective layer update): routed training equals the all-paths masked
execution (outputs and gradients) for the same decisions, skipped samples reach no conv of a
skipped block forward or backward, the hinge is the paper's formula and moves the executed
fraction toward the target, checkpoints round-trip, pyeff's and torchvision's ResNets train and
evaluate, and bad settings are clear errors."""
import pytest
import torch
import torch.nn as nn

from pyeff.e2train import slu
from pyeff.e2train.slu import SLUConfig, SLUHook, SLUNet, convert
from pyeff.models import create_model
from pyeff.train.hooks import Outputs
from conftest import randomise_bn

torch.set_num_threads(1)

FAMILIES = ["resnet20", "torchvision.resnet18"]


def _model(name, g):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    if name == "torchvision.resnet18":
        torchvision = pytest.importorskip("torchvision")
        return randomise_bn(torchvision.models.resnet18(num_classes=5), g), (3, 32, 32)
    return randomise_bn(create_model(name, num_classes=5), g), (3, 16, 16)


def _decisions(net, n, g):
    """Random decisions [n, G] with the extremes: a block every sample runs, one none runs."""
    ex = torch.rand(n, len(net.blocks), generator=g) < 0.5
    ex[:, 0], ex[:, 1] = True, False
    ex[0, 2], ex[1, 2] = True, False  # block 2 mixed for sure
    return ex


def _freeze_bn(net):
    """Training-mode execution with BatchNorm on running statistics: routed BN would otherwise
    normalise with the executing samples' statistics, the masked one with the whole batch's."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


def _chain(d):
    """The convs and BNs of a gated block's residual chain (not its shortcut)."""
    spec, b = d.spec, d.block
    mods = [spec.conv(b, i) for i in range(len(spec.convs))]
    return mods + [m for m in (spec.bn(b, i) for i in range(len(spec.convs))) if m is not None]


class ConvRows:
    """Per chain conv of each gated block: calls, input rows in the forward pass, and rows of the
    output gradient in the backward pass (a tensor hook on the conv's output)."""

    def __init__(self, net):
        self.rec, self.handles = {}, []
        for g, d in enumerate(net.blocks):
            for i in range(len(d.spec.convs)):
                self.rec[g, i] = {"calls": 0, "fwd": 0, "bwd": 0}
                self.handles.append(d.spec.conv(d.block, i).register_forward_hook(self._hook(self.rec[g, i])))

    @staticmethod
    def _hook(r):
        def fwd(module, inputs, out):
            r["calls"] += 1
            r["fwd"] += inputs[0].shape[0]
            if out.requires_grad:
                out.register_hook(lambda grad: r.__setitem__("bwd", r["bwd"] + grad.shape[0]))
        return fwd

    def reset(self):
        for r in self.rec.values():
            r.update(calls=0, fwd=0, bwd=0)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_routed_training_equals_all_paths_masked(name, rng):
    base, size = _model(name, rng)
    net = convert(base).train()
    assert net.train_mode == "routed"
    _freeze_bn(net)
    n = 6
    x = torch.randn(n, *size, generator=rng)
    ex = _decisions(net, n, rng)
    w = torch.randn(n, 5, generator=rng)  # every logit matters to the loss

    def step(mode):
        net.train_mode = mode
        net.zero_grad(set_to_none=True)
        with net.forced(execute=ex):
            logits, aux = net(x)
        (logits * w).sum().backward()
        return logits.detach(), aux, {k: p.grad for k, p in net.named_parameters()}

    lr, aux_r, gr = step("routed")
    lm, aux_m, gm = step("all")
    torch.testing.assert_close(lr, lm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux_r["cost"].double(), ex.double().mean(1))
    assert torch.equal(aux_r["execute"], ex)
    for k in gr:
        a = gr[k] if gr[k] is not None else torch.zeros_like(dict(net.named_parameters())[k])
        b = gm[k] if gm[k] is not None else torch.zeros_like(a)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"gradient of {k}")
    # the block no sample executes got no backward work at all in routed training (masked: zeros)
    name = {id(p): k for k, p in net.named_parameters()}
    skipped = [name[id(p)] for m in _chain(net.blocks[1]) for p in m.parameters()]
    assert skipped and all(gr[k] is None for k in skipped), skipped
    ran = [name[id(p)] for m in _chain(net.blocks[0]) for p in m.parameters()]
    assert all(gr[k] is not None and gr[k].abs().sum() > 0 for k in ran)


@pytest.mark.parametrize("name", FAMILIES)
def test_skipped_samples_reach_no_conv_forward_or_backward(name, rng):
    base, size = _model(name, rng)
    net = convert(base).train()
    n = 6
    x = torch.randn(n, *size, generator=rng)
    ex = _decisions(net, n, rng)
    rows = ConvRows(net)
    try:
        with net.forced(execute=ex):
            logits, _ = net(x)
        logits.sum().backward()
        for (g, i), r in rows.rec.items():
            k = int(ex[:, g].sum())
            assert r == {"calls": int(k > 0), "fwd": k, "bwd": k}, (g, i, r, k)

        # the gate's own (sampled) decisions: the same bookkeeping holds
        rows.reset()
        logits, aux = net(x)
        logits.sum().backward()
        for (g, i), r in rows.rec.items():
            k = int(aux["execute"][:, g].sum())
            assert (r["fwd"], r["bwd"]) == (k, k), (g, i, r, k)

        # inference (convs as modules under unfused(), so the hooks see them)
        rows.reset()
        with torch.no_grad(), net.probing(), net.unfused(), net.forced(execute=ex):
            net(x)
        for (g, i), r in rows.rec.items():
            assert r["fwd"] == int(ex[:, g].sum()), (g, i, r)

        # the reference's execution, for contrast: every sample through every conv
        rows.reset()
        net.train_mode = "all"
        with net.forced(execute=ex):
            logits, _ = net(x)
        logits.sum().backward()
        assert all(r["fwd"] == n and r["bwd"] == n for r in rows.rec.values())
    finally:
        rows.remove()


@pytest.mark.parametrize("name", FAMILIES)
def test_inference_routed_equals_masked_and_open_equals_the_model(name, rng):
    base, size = _model(name, rng)
    net = convert(base).eval()
    n = 5
    x = torch.randn(n, *size, generator=rng)
    ex = _decisions(net, n, rng)
    with torch.no_grad():
        with net.forced(execute=ex):
            routed, aux = net(x)
            with net.execution("masked"):
                masked, _ = net(x)
        with net.forced(execute=torch.ones(len(net.blocks), dtype=torch.bool)):
            dense, aux_d = net(x)
        ref = base(x)
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux["cost"], ex.double().mean(1))
    torch.testing.assert_close(aux_d["cost"], torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("name", FAMILIES)
def test_trains_and_evaluates_with_the_gate(name, rng):
    base, size = _model(name, rng)
    net = convert(base.train(), target=0.5)
    assert net.training and net.config.gate_mode == "sample"
    x = torch.randn(8, *size, generator=rng)
    y = torch.randint(0, 5, (8,), generator=rng)
    hook = SLUHook(beta=1e-3)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    trainer = type("T", (), {"model": net})()
    logits, aux = net(x)
    loss = hook.loss(trainer, Outputs(logits, aux, None), y, nn.functional.cross_entropy(logits, y))
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gate_parameters())
    opt.step()
    stats = net.evaluate([(x, y)])
    assert 0 <= stats["cost_pct"] <= 100 and len(stats["execute_rate"]) == len(net.blocks)
    assert stats["unit"] == "blocks"


def test_hinge_is_the_papers_formula(rng):
    """loss += beta * sign * (executed (sample, block) pairs), sign = + above the target."""
    net = convert(create_model("resnet20", num_classes=5), target=0.5, beta=1e-5)
    trainer = type("T", (), {"model": net})()
    G = net.num_gated
    ex = torch.zeros(4, G)
    ex[0] = 1
    ex[1, :3] = 1  # 11 executed pairs of 32: 34% < 50%
    for pairs, sign in ((ex, -1.0), (1 - ex, 1.0)):
        cost = (pairs.sum(1) / G).requires_grad_()
        hook = SLUHook()
        out = hook.loss(trainer, Outputs(None, {"cost": cost}, None), None, torch.zeros(()))
        torch.testing.assert_close(out, torch.tensor(sign * 1e-5 * float(pairs.sum())))
        out.backward()  # each sample's fraction gets beta * sign * G: one beta per pair of it
        torch.testing.assert_close(cost.grad, torch.full((4,), sign * 1e-5 * G))
    hook = SLUHook(target=0.25, beta=2e-5)
    out = hook.loss(trainer, Outputs(None, {"cost": ex.sum(1) / G}, None), None, torch.zeros(()))
    torch.testing.assert_close(out, torch.tensor(2e-5 * float(ex.sum())))  # 34% > 25%: pushed down


def test_hinge_moves_the_executed_fraction_toward_the_target(tmp_path):
    """Three short epochs on 128 digits from a gate that executes ~88%: toward a 20% target the
    executed fraction falls by tens of points; toward 100% it rises (the same seeds)."""
    from pyeff.data import load_dataset
    from pyeff.train import TrainConfig, Trainer

    tr = load_dataset("digits", "train").subset(128, seed=1)
    te = load_dataset("digits", "test").subset(64, seed=1)
    runs = {}
    for target in (0.2, 1.0):
        torch.manual_seed(0)
        # a beta far above the paper's 1e-5 so a dozen steps show the direction
        net = convert(create_model("resnet20", num_classes=10, in_channels=1), target=target, beta=2e-2,
                      gate_bias=(0.0, 2.0))
        cfg = TrainConfig(model="resnet20", dataset="digits", epochs=3, batch_size=32, lr=0.05, augment=False,
                          out_dir=str(tmp_path / f"t{target}"), progress=False, device="cpu", save_best=False)
        hist = Trainer(net, cfg, tr, te, hooks=[SLUHook()], verbose=False).fit()
        runs[target] = [h["train_executed_pct"] for h in hist]
        assert all(0 <= h["executed_pct"] <= 100 for h in hist)
    down, up = runs[0.2], runs[1.0]
    assert down[0] > 80 and up[0] > 80, runs          # both start where the gate bias puts them
    assert down[-1] < down[0] - 20, runs               # measured: 88 -> 54
    assert up[-1] > up[0] - 2, runs                    # measured: 91 -> 96
    assert down[-1] < up[-1] - 30, runs


def test_checkpoint_round_trip(tmp_path, rng):
    base = create_model("resnet20", num_classes=5)
    net = convert(base, target=0.4, beta=3e-5, gate_bias=(0.0, 1.0)).train()
    x = torch.randn(6, 3, 16, 16, generator=rng)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    logits, aux = net(x)
    (logits.logsumexp(1).mean() + aux["cost"].mean()).backward()
    opt.step()
    net.train()
    net(x)  # BN statistics moved
    path = tmp_path / "slu.pt"
    torch.save({"config": net.config.to_dict(), "state_dict": net.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    again = convert(create_model("resnet20", num_classes=5), SLUConfig.from_dict(ckpt["config"]))
    again.load_state_dict(ckpt["state_dict"])
    assert again.config == net.config
    with torch.no_grad():
        a, aux_a = net.eval()(x)
        b, aux_b = again.eval()(x)
    torch.testing.assert_close(a, b)
    assert torch.equal(aux_a["execute"], aux_b["execute"])
    torch.save(net, tmp_path / "whole.pt")  # the whole module pickles too
    whole = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(whole(x)[0], a)


def test_convert_keeps_the_model_and_its_mode(rng):
    base = create_model("resnet20", num_classes=5).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = convert(base, train_mode="all", gate_mode="argmax", skip_downsampling=False)
    assert isinstance(net, SLUNet) and not net.training and net.gate.mode == "argmax"
    net.gate_mode = "sample"
    assert net.gate.mode == "sample" and net.config.gate_mode == "sample"
    with pytest.raises(ValueError, match="gate_mode"):
        net.gate_mode = "soft"
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert net.num_gated == len(net.blocks) - 2  # the two projection blocks always run
    assert slu.convert is convert and SLUConfig().beta == 1e-5 and SLUConfig().embed_dim == 10
    x = torch.randn(3, 3, 8, 8, generator=rng)  # any input size: the costs count blocks
    with torch.no_grad():
        assert net(x)[0].shape == (3, 5)


@pytest.mark.parametrize("kw, word", [
    ({"target": 0}, "target"), ({"target": 1.5}, "target"), ({"target": 50}, "target"),
    ({"target": -0.1}, "target"), ({"target": float("nan")}, "target"), ({"target": True}, "target"),
    ({"target": "0.5"}, "target"), ({"beta": -1e-5}, "beta"), ({"beta": float("inf")}, "beta"),
    ({"beta": float("nan")}, "beta"), ({"beta": "1e-5"}, "beta"), ({"beta": True}, "beta"),
    ({"gate_mode": "soft"}, "gate_mode"), ({"train_mode": "masked"}, "train_mode"),
    ({"embed_dim": 0}, "embed_dim"), ({"gate_bias": (1.0,)}, "gate_bias"),
])
def test_bad_settings(kw, word):
    with pytest.raises(ValueError, match=word) as e:
        convert(create_model("resnet20", num_classes=5), **kw)
    if word in ("target", "beta"):
        assert "(0, 1]" in str(e.value) if word == "target" else ">= 0" in str(e.value)
        with pytest.raises(ValueError, match=word):
            SLUHook(**kw)


def test_bad_models():
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"model \(Sequential\) has no registered residual block"):
        convert(plain)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert("resnet20")
    with pytest.raises(TypeError, match="target=..."):
        convert(create_model("resnet20"), 0.5)
    with pytest.raises(TypeError, match="already"):
        convert(convert(create_model("resnet20")))
    hook = SLUHook()
    with pytest.raises(TypeError, match="SLUHook needs a net made by"):
        hook.on_fit_begin(type("T", (), {"model": nn.Linear(2, 2)})())


def test_doc_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "e2train.md").read_text()
    code = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "SLUHook" in b]
    assert len(code) == 1
    monkeypatch.chdir(tmp_path)  # the example writes runs/slu-example
    scope: dict = {}
    torch.manual_seed(0)
    exec(compile(code[0], "docs/e2train.md SLU example", "exec"), scope)  # noqa: S102 (our own docs)
    assert scope["aux"]["execute"].shape == (4, 8) and scope["forced"].shape == (4, 10)
    assert 0 <= scope["history"][-1]["train_executed_pct"] <= 100
