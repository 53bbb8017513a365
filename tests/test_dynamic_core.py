"""The one dynamic-network core: the block registry (a user's own block type works in DFS, DDI and
the pruner after one registration), the DynamicNet base (no patched forwards, conversion trains
nothing, pickling, old checkpoint keys), and derived weights that never go stale."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyeff.ddi
import pyeff.dfs
from pyeff.ddi.prune import prune_inner_channels, sort_inner_channels
from pyeff.dynamic import Conv, block_spec, register_block, unregister_block
from pyeff.models import create_model
from conftest import randomise_bn

torch.set_num_threads(1)


class MyBlock(nn.Module):
    """A user's residual block with its own attribute names: conv-BN-ReLU-conv-BN + projection."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm_a = nn.BatchNorm2d(cout)
        self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=True)
        self.norm_b = nn.BatchNorm2d(cout)
        self.proj = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        s = x if self.proj is None else self.proj(x)
        return F.relu(self.norm_b(self.conv_b(F.relu(self.norm_a(self.conv_a(x))))) + s)


class MyNet(nn.Module):
    """stem -> stages() -> head, the layout DDI's exits need."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(MyBlock(8, 8), MyBlock(8, 8))
        self.layer2 = nn.Sequential(MyBlock(8, 16, 2), MyBlock(16, 16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def stages(self):
        return [self.layer1, self.layer2]

    def forward(self, x):
        x = self.stem(x)
        for s in self.stages():
            x = s(x)
        return self.head(x)


def _randomised(m, g):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return randomise_bn(m, g)


@pytest.fixture
def my_block():
    register_block(MyBlock, convs=[Conv("conv_a", bn="norm_a", relu=True), Conv("conv_b", bn="norm_b")],
                   shortcut="proj", combine="add_relu")
    yield MyBlock
    unregister_block(MyBlock)


def test_unregistered_block_is_a_clear_error(rng):
    with pytest.raises(TypeError, match="register_block"):
        pyeff.dfs.convert(MyNet(), bits=(0, 32))


def test_registered_block_runs_in_dfs(my_block, rng):
    base = _randomised(MyNet(), rng)
    x = torch.randn(5, 3, 12, 12, generator=rng)
    net = pyeff.dfs.convert(base, bits=(0, 8, 32)).eval()
    assert len(net.blocks) == 3
    with torch.no_grad():
        want = base(x)
        with net.forced([2] * 3):  # full precision everywhere: the plain network
            torch.testing.assert_close(net(x)[0], want, rtol=1e-4, atol=1e-4)
        net.calibrate([x])
        d = torch.randint(0, 3, (5, 3), generator=rng)
        with net.forced(d):
            routed = net(x)[0]
            with net.execution("masked"):
                masked = net(x)[0]
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)


def test_registered_block_runs_in_ddi_and_the_pruner(my_block, rng):
    base = _randomised(MyNet(), rng)
    x = torch.randn(4, 3, 12, 12, generator=rng)
    net = pyeff.ddi.convert(base, input_size=(3, 12, 12)).eval()
    assert len(net.blocks) == 3 and len(net.exits) == 1
    with torch.no_grad(), net.all_open():
        torch.testing.assert_close(net(x)[0], base(x), rtol=1e-4, atol=1e-4)
    ex = torch.rand(4, 3, generator=rng) < 0.6
    ch = [torch.rand(4, b.width, generator=rng) < 0.5 for b in net.blocks]
    with torch.no_grad(), net.forced(execute=ex, channels=ch):
        routed = net(x)[0]
        with net.execution("masked"):
            masked = net(x)[0]
    torch.testing.assert_close(routed, masked, rtol=1e-4, atol=1e-4)
    slim = prune_inner_channels(base, 0.5)
    assert slim.layer1[1].conv_a.out_channels == 4 and slim.layer1[1].conv_b.in_channels == 4
    assert slim.layer1[1].norm_a.num_features == 4
    slim(x)
    with torch.no_grad():
        torch.testing.assert_close(sort_inner_channels(copy.deepcopy(base))(x), base(x), rtol=1e-4, atol=1e-4)


def test_register_block_checks_its_input():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_block(int, convs=[Conv("a")])
    with pytest.raises(TypeError, match="non-empty"):
        register_block(MyBlock, convs=[])
    with pytest.raises(ValueError, match="combine"):
        register_block(MyBlock, convs=[Conv("conv_a")], combine="mul")
    register_block(MyBlock, convs=[Conv("conv_a", bn="proj"), Conv("conv_b")], shortcut="proj")
    try:  # a description that does not fit the module is an error at conversion
        with pytest.raises(TypeError, match="BatchNorm2d"):
            pyeff.dfs.DFSBlock(MyBlock(4, 8), (0, 32))
    finally:
        unregister_block(MyBlock)
    assert block_spec(MyBlock(4, 4)) is None


@pytest.mark.parametrize("method", ["dfs", "ddi"])
def test_conversion_patches_no_forward_and_trains_nothing(method, rng):
    base = create_model("resnet20", num_classes=5).train()
    before = copy.deepcopy(base.state_dict())
    mod = getattr(pyeff, method)
    net = mod.convert(base, copy_model=False)
    assert net.training  # the model's mode is kept
    assert not any("forward" in m.__dict__ for m in net.modules())
    after = {k.replace(".block.", "."): v for k, v in net.model.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # no BatchNorm statistic moved


def test_ddi_converts_torchvision_resnet_in_train_mode(rng):
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18(num_classes=10).train()
    net = pyeff.ddi.convert(m, cost="energy")  # sizing the exits used to run a batch of 1 in train mode
    assert net.training and len(net.blocks) == 7
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 32, 32, generator=rng))[0].shape == (2, 10)


@pytest.mark.parametrize("method", ["dfs", "ddi"])
def test_whole_net_pickles_and_reloads_old_keys(method, rng):
    base = _randomised(create_model("resnet20", num_classes=5), rng)
    mod = getattr(pyeff, method)
    net = mod.convert(base).eval()
    x = torch.randn(3, 3, 16 if method == "dfs" else 32, 16 if method == "dfs" else 32, generator=rng)
    if method == "dfs":
        net.calibrate([x])
    with torch.no_grad():
        want = net(x)[0]
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], want)
    # a checkpoint written before the static first block was wrapped
    sd = {k.replace("model.layer1.0.block.", "model.layer1.0."): v for k, v in net.state_dict().items()}
    assert any(k.startswith("model.layer1.0.conv1") for k in sd)
    fresh = mod.convert(base)
    fresh.load_state_dict(sd)
    assert pickle.loads(pickle.dumps(net.config)) == net.config


def test_to_dense_is_the_plain_network(rng):
    base = _randomised(create_model("resnet20", num_classes=5), rng)
    net = pyeff.dfs.convert(base, bits=(0, 32))
    dense = net.to_dense()
    assert type(dense.layer2[1]) is type(base.layer2[1]) and type(dense.stem) is nn.Sequential
    x = torch.randn(2, 3, 16, 16, generator=rng)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), base(x))


@pytest.mark.parametrize("method", ["dfs", "ddi"])
@pytest.mark.parametrize("edit", ["data_mul", "data_index", "no_grad_copy"])
def test_inference_sees_weight_edits(method, edit, rng):
    """BN folding and packed integer weights are derived once, and rebuilt when the source changes,
    also through .data (which bypasses the version counter)."""
    base = _randomised(create_model("resnet20", num_classes=5), rng)
    mod = getattr(pyeff, method)
    net = mod.convert(base).eval()
    x = torch.randn(3, 3, 32, 32, generator=rng)
    d = torch.randint(1, len(net.bits), (3, len(net.blocks)), generator=rng) if method == "dfs" else None

    def force(n):
        return n.forced(d) if method == "dfs" else n.all_open()
    if method == "dfs":
        net.calibrate([x])
    with torch.no_grad(), force(net):
        net(x)  # derive and keep the folded / packed forms
        for blk in net.blocks:
            w = blk.block.conv1.weight
            if edit == "data_mul":
                w.data.mul_(3)
            elif edit == "data_index":
                w.data[0] = 0
            else:
                w.copy_(torch.randn_like(w))
            bn = blk.block.bn1
            bn.running_var.data.mul_(2)
        got = net(x)[0]
    fresh = mod.convert(net.to_dense()).eval()
    if method == "dfs":
        for b_new, b_old in zip(fresh.blocks, net.blocks):
            b_new.act_range.copy_(b_old.act_range)
            b_new.act_count.copy_(b_old.act_count)
    with torch.no_grad(), force(fresh):
        want = fresh(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dfs", "ddi"])
def test_routed_training_with_a_group_of_one_on_1x1_planes(method, rng):
    """torchvision ResNet-18 at 32x32 has 1x1 planes in its last stage; in routed training a path
    taken by one sample there used to fail in BatchNorm ("more than 1 value per channel")."""
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18(num_classes=4)
    x = torch.randn(4, 3, 32, 32, generator=rng)
    if method == "dfs":
        net = pyeff.dfs.convert(m, bits=(0, 8, 32), train_mode="routed").train()
        G = len(net.blocks)
        d = torch.zeros(4, G, dtype=torch.int64)
        d[0], d[1] = 2, 1   # one sample at 32 bits, one at 8 bits, two skip: every group of one
        force = net.forced(d)
    else:
        net = pyeff.ddi.convert(m, train_mode="routed", skip_downsampling=True).train()
        G = len(net.blocks)
        ex = torch.zeros(4, G, dtype=torch.bool)
        ex[0] = True        # one sample executes every block, projections included
        force = net.forced(execute=ex)
    stats = [(b.running_mean.clone(), b.num_batches_tracked.clone()) for b in net.modules()
             if isinstance(b, nn.BatchNorm2d)]
    with force:
        logits, aux = net(x)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gate_parameters())
    moved = [not torch.equal(b.running_mean, m0) for b, (m0, _) in
             zip([b for b in net.modules() if isinstance(b, nn.BatchNorm2d)], stats)]
    assert any(moved)  # groups larger than one value per channel still train their statistics


def test_ddi_budget_and_input_rules(rng):
    base = _randomised(create_model("resnet20", num_classes=5), rng)
    net = pyeff.ddi.convert(base, input_size=(3, 16, 16))
    x = torch.randn(3, 3, 16, 16, generator=rng)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        net.set_budget(1.5)
    with pytest.raises(ValueError, match="cost table is for inputs of size"):
        net.eval()(torch.randn(2, 3, 32, 32, generator=rng))
    net.set_budget(0.6)
    with pytest.warns(UserWarning, match="budget applies at inference"):
        _, aux = net.train()(x)
    assert aux["cost"].dtype == x.dtype and aux["cost"].requires_grad  # training: differentiable
    with torch.no_grad():
        _, aux = net.eval()(x)
    assert aux["cost"].dtype == torch.float64 and float(aux["cost"].max()) <= 0.6 * (1 + 1e-9)
    net.measure_costs(x=torch.randn(1, 3, 24, 24, generator=rng))  # re-costed for another size
    with torch.no_grad():
        assert net(torch.randn(2, 3, 24, 24, generator=rng))[0].shape == (2, 5)


def test_dfs_bits_must_be_ascending():
    with pytest.raises(ValueError, match="ascending"):
        pyeff.dfs.convert(create_model("resnet20"), bits=(32, 0))
    with pytest.raises(TypeError, match="DFSConfig"):
        pyeff.dfs.convert(create_model("resnet20"), (0, 32))
    cfg = pyeff.dfs.DFSConfig(bits=(0, 8, 32), train_mode="routed")
    net = pyeff.dfs.convert(create_model("resnet20"), cfg, gate_bias=(0.0, 0.0, 1.0))
    assert net.config.bits == (0, 8, 32) and net.config.gate_bias == (0.0, 0.0, 1.0)
    assert pyeff.dfs.DFSConfig.from_dict(net.config.to_dict()) == net.config
    with pytest.raises(TypeError, match="no field"):
        pyeff.dfs.convert(create_model("resnet20"), cfg, bitz=(0, 32))


@pytest.mark.parametrize("method", ["dfs", "ddi"])
def test_torch_compile_matches_eager_without_recompiling_per_group(method, rng):
    """The gated blocks run eagerly under torch.compile (data-dependent routing); the static parts
    compile once. ResNet-32 has 14 gated blocks, more than the recompile limit of 8 that per-group
    recompilation used to hit."""
    import torch._dynamo

    base = _randomised(create_model("resnet32", num_classes=5), rng)
    mod = getattr(pyeff, method)
    net = (mod.convert(base, bits=(0, 32)) if method == "dfs" else mod.convert(base)).eval()
    G = len(net.blocks)
    compiled = torch.compile(net)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=8):
        for _ in range(3):
            x = torch.randn(6, 3, 32, 32, generator=rng)
            d = torch.randint(0, 2, (6, G), generator=rng)
            force = net.forced(d) if method == "dfs" else net.forced(execute=d.bool())
            with torch.no_grad(), force:
                torch.testing.assert_close(compiled(x)[0], net(x)[0], rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("kw", [{}, {"layer_gates": False}, {"channel_mode": "width"}, {"train_mode": "routed"}])
def test_ddi_training_step_reaches_every_parameter(kw, rng):
    """DDP (torchrun) rejects parameters that get no gradient: the layer gate used to hold a
    projection for blocks it never decides (projection-shortcut blocks, or every block with
    layer_gates=False)."""
    base = create_model("resnet20", num_classes=5)
    net = pyeff.ddi.convert(base, input_size=(3, 16, 16), **kw).train()
    x = torch.randn(8, 3, 16, 16, generator=rng)
    logits, aux = net(x)
    loss = logits.logsumexp(1).mean() + aux["cost"].mean() + sum(e.logsumexp(1).mean() for e in aux["exits"])
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_ddi_loads_checkpoints_with_a_projection_per_block(rng):
    net = pyeff.ddi.convert(create_model("resnet20", num_classes=5), input_size=(3, 16, 16))
    sd = net.state_dict()
    step = net._gate_step
    assert len(step) < len(net.blocks)  # projection-shortcut blocks have no layer gate by default
    old = {k: v for k, v in sd.items() if not k.startswith("gate.proj.")}
    for blk in net.blocks:
        for name in ("weight", "bias"):
            if blk.index in step:
                old[f"gate.proj.{blk.index}.{name}"] = sd[f"gate.proj.{step[blk.index]}.{name}"]
            else:
                old[f"gate.proj.{blk.index}.{name}"] = torch.randn_like(sd[f"gate.proj.0.{name}"][:, :1].expand(
                    -1, blk.in_channels, *sd[f"gate.proj.0.{name}"].shape[2:]) if name == "weight"
                    else sd[f"gate.proj.0.{name}"])
    fresh = pyeff.ddi.convert(create_model("resnet20", num_classes=5), input_size=(3, 16, 16))
    fresh.load_state_dict(old)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
