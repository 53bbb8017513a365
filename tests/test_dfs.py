"""pyeff.dfs: grouped execution == masked execution, the extreme decisions, gate gradients, the
converter on pyeff and torchvision ResNets, the cost percentage, input errors, the recipe hook."""
import pytest
import torch
import torch.nn as nn

from pyeff.dfs import DFSBlock, check_bits, convert
from pyeff.dynamic import masked_all_paths, route
from pyeff.models import create_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    m = create_model("resnet20", num_classes=5).eval()
    with torch.no_grad():  # non-trivial BN statistics, so BN is not the identity
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m


def _x(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g)


@pytest.mark.parametrize("bits", [(0, 8, 12, 16, 32), (0, 4, 8, 16, 32)])
def test_grouped_equals_masked_per_block(r20, bits):
    net = convert(r20, bits=bits).eval()
    x = _x(7)
    net.calibrate([x])
    torch.manual_seed(3)
    with torch.no_grad():
        feats = r20.layer1[0](r20.stem(x))  # the input of the first gated block
        for blk in net.blocks[:4]:
            d = torch.randint(0, len(bits), (x.shape[0],))
            d[:len(bits)] = torch.arange(len(bits))  # every path at least once
            routed = route(feats, d, blk.paths("engine"))
            masked = masked_all_paths(feats, d, blk.paths("engine"))
            torch.testing.assert_close(routed, masked, rtol=1e-5, atol=1e-5)
            feats = routed


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_inference_fusion_matches_modules_as_written(r20, bits):
    # inference folds BN (and the ReLU after it) into the engine's epilogue and the float convs;
    # with gradients on, the block runs conv -> BN -> ReLU as written. Same values up to float
    # rounding (which may move a value across a quantiser's rounding boundary: one level at most)
    net = convert(r20, bits=(0, bits, 32)).eval()
    x = _x(5)
    net.calibrate([x])
    with torch.no_grad():
        feats = r20.layer1[0](r20.stem(x))
    blk = net.blocks[0]
    for b in (bits, 32):
        with torch.no_grad():
            fused = blk.residual(feats, b)
        with torch.enable_grad():
            plain = blk.residual(feats, b).detach()
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=2e-3 * float(plain.abs().max()))


def test_whole_net_torch_save_round_trip(r20, tmp_path):
    # torch.save(net) pickles the controller, the block kinds and FusedInference (protocol 2)
    net = convert(r20, bits=(0, 8, 32)).eval()
    x = _x(4)
    net.calibrate([x])
    with torch.no_grad():
        want = net(x)[0]
    torch.save(net, tmp_path / "net.pt")
    again = torch.load(tmp_path / "net.pt", weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], want, rtol=0, atol=0)


def test_routed_net_equals_masked_net(r20):
    net = convert(r20, bits=(0, 8, 10, 16, 32)).eval()
    x = _x(9)
    net.calibrate([x])
    G = len(net.blocks)
    d = torch.randint(0, 5, (9, G), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), net.fixed_decisions(d):
        a, aux_a = net(x)
        with net.execution("masked"):
            b, aux_b = net(x)
    # through 8 quantised blocks a last-bit float difference (BN on a group vs the batch) can move a
    # value across a rounding boundary of a later quantiser: one level, well under 1e-3 here
    torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)
    assert torch.equal(aux_a["decisions"], d)


def test_all_full_equals_base_and_all_skip_equals_shortcuts(r20):
    net = convert(r20, bits=(0, 8, 32)).eval()
    x = _x()
    G = len(net.blocks)
    with torch.no_grad():
        ref = r20(x)
        with net.fixed_decisions([2] * G):
            out, aux = net(x)
        # float rounding only: inference folds BN into the convs and runs channels_last
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert torch.allclose(aux["cost"], torch.ones(x.shape[0]))
        with net.fixed_decisions([0] * G):
            out, aux = net(x)
        h = r20.layer1[0](r20.stem(x))
        for blk in r20.blocks()[1:]:
            h = blk.shortcut(h)
        torch.testing.assert_close(out, r20.head(h))
        assert torch.equal(aux["cost"], torch.zeros(x.shape[0]))


def test_eval_deterministic_and_outputs(r20):
    net = convert(r20, bits=(0, 8, 32)).eval()
    x = _x()
    with torch.no_grad():
        a, aux = net(x)
        b, aux2 = net(x)
    assert torch.equal(a, b) and torch.equal(aux["decisions"], aux2["decisions"])
    assert aux["decisions"].shape == (x.shape[0], 8) and aux["cost"].shape == (x.shape[0],)


@pytest.mark.parametrize("mode", ["all", "routed"])
def test_gate_gradients_flow(r20, mode):
    net = convert(r20, bits=(0, 8, 32), train_mode=mode, gate_bias=[0.0, 0.0, 0.1]).train()
    x = _x(8)
    logits, aux = net(x)
    loss = nn.functional.cross_entropy(logits, torch.arange(8) % 5)  # no cost term: CE alone
    loss.backward()
    g = net.gate.head.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert net.gate.proj[3].weight.grad.abs().sum() > 0
    if mode == "all":  # every choice's logit gets a gradient from its own path
        assert (net.gate.head.bias.grad.abs() > 0).all()
    assert r20.layer2[1].conv1.weight.grad is None  # convert() worked on a copy


def test_torchvision_resnet18_forward_backward():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = tv.models.resnet18(num_classes=4)
    net = convert(m, bits=(0, 4, 8, 16, 32), train_mode="routed")
    assert len(net.blocks) == 7
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        out, aux = net(x)
        with net.fixed_decisions([4] * 7):
            full, _ = net(x)
        torch.testing.assert_close(full, m.eval()(x))
    assert out.shape == (2, 4)
    net.train()  # (updates the copy's BN statistics)
    logits, aux = net(x)
    (logits.sum() + aux["cost"].sum()).backward()
    assert net.gate.head.weight.grad is not None
    assert net.model.layer4[1].block.conv2.weight.grad is not None


def test_torchvision_bottleneck():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.resnet import Bottleneck, ResNet

    m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=3)
    net = convert(m, bits=(0, 8, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    net.calibrate([x])
    d = torch.tensor([[1, 0, 2], [2, 1, 1]])
    with torch.no_grad(), net.fixed_decisions(d):
        a, _ = net(x)
        with net.execution("masked"):
            b, _ = net(x)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)


def test_cost_percentage_hand_computed(r20):
    net = convert(r20, bits=(0, 8, 16, 32)).eval()
    G = len(net.blocks)
    assert G == 8
    # per block: 0 bits -> 0, 8 -> 1/16, 16 -> 1/4, 32 -> 1
    d = torch.tensor([[0, 1, 2, 3, 3, 3, 0, 0], [1] * 8])
    with torch.no_grad(), net.fixed_decisions(d):
        _, aux = net(_x(2))
    expect = torch.tensor([(0 + 1 / 16 + 1 / 4 + 3) / 8, 1 / 16])
    torch.testing.assert_close(aux["cost"], expect)
    stats = net.decision_stats([(_x(2), torch.zeros(2, dtype=torch.int64))])
    assert stats["samples"] == 2 and len(stats["counts"]) == 8
    assert all(sum(row) == 2 for row in stats["counts"])


def test_bad_bits_and_models(r20):
    with pytest.raises(ValueError, match="at least two"):
        check_bits([0])
    with pytest.raises(ValueError, match="17"):
        convert(r20, bits=(0, 17, 32))
    with pytest.raises(TypeError, match="integer"):
        convert(r20, bits=(0, 8.5, 32))
    with pytest.raises(ValueError, match="duplicate"):
        convert(r20, bits=(0, 8, 8, 32))
    with pytest.raises(ValueError, match="not supported"):
        check_bits((0, 1, 32))
    with pytest.raises(TypeError, match="residual block"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), bits=(0, 32))
    with pytest.raises(TypeError, match="residual block"):
        convert(create_model("vgg11") if _has("vgg11") else nn.Linear(3, 3), bits=(0, 32))
    with pytest.raises(TypeError, match="supported residual"):
        DFSBlock(nn.Conv2d(3, 3, 1), (0, 32))


def _has(name):
    from pyeff.models import list_models
    try:
        return name in list_models()
    except Exception:  # noqa: BLE001
        return False


def test_recipe_hook_moves_cost_toward_target():
    from pyeff.data import load_dataset
    from pyeff.dfs.recipe import DFSHook
    from pyeff.train import TrainConfig, run_training

    train = load_dataset("shapes", "train", seed=0).subset(128, seed=0)
    test = load_dataset("shapes", "test", seed=0).subset(32, seed=0)
    torch.manual_seed(0)
    base = create_model("resnet20", num_classes=train.num_classes, in_channels=train.images.shape[1])
    net = convert(base, bits=(0, 8, 32), train_mode="routed")
    x = torch.randn(4, train.images.shape[1], *train.images.shape[2:])
    net.eval()
    with torch.no_grad():
        _, aux = net(x)
    start = 100 * float(aux["cost"].mean())
    assert start > 90  # the default gate bias starts at full execution
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(model="resnet20", dataset="shapes", epochs=2, batch_size=16, lr=0.05,
                          weight_decay=1e-4, out_dir=tmp, overwrite=True, device="cpu", augment=False)
        tr = run_training(cfg, hooks=[DFSHook(target=10.0, beta=50.0)], model=net, data=(train, test),
                          verbose=False, optimizer=torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    h = tr.history
    assert "computation_pct" in h[-1] and "train_computation_pct" in h[-1]
    # a few steps from a random network: the training batches' computation falls from ~100%
    assert max(r["train_computation_pct"] for r in h) < start - 10


def test_save_load_roundtrip(tmp_path, r20):
    from pyeff.dfs.recipe import load_dfs, save_dfs

    net = convert(r20, bits=(0, 8, 32)).eval()
    x = _x(4)
    net.calibrate([x])
    path = str(tmp_path / "dfs.pt")
    save_dfs(net, path, model="resnet20", dataset="shapes", num_classes=5, in_channels=3)
    net2, meta = load_dfs(path)
    with torch.no_grad():
        a, aux_a = net(x)
        b, aux_b = net2(x)
    torch.testing.assert_close(a, b)
    assert torch.equal(aux_a["decisions"], aux_b["decisions"]) and meta["model"] == "resnet20"
    with pytest.raises(FileNotFoundError):
        load_dfs(str(tmp_path / "missing.pt"))
