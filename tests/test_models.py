"""Tests of pyeff.models: the registry, CIFAR ResNets, VGG, torchvision models."""
import math

import pytest
import torch
import torch.nn as nn

from pyeff.models import BasicBlock, CifarResNet, PreActBlock, create_model, list_models, register_model
from pyeff.models.cifar_resnet import RESNET_DEPTHS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is as fast, and it does not stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_the_cifar_models():
    names = list_models()
    for d in RESNET_DEPTHS:
        assert f"resnet{d}" in names and f"preresnet{d}" in names
    assert "vgg16" in names
    assert list_models("preresnet*") == sorted(f"preresnet{d}" for d in RESNET_DEPTHS)


@pytest.mark.parametrize("name", list_models())
def test_every_model_forward(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_resnet_parameter_counts():
    assert 0.26e6 < n_params(create_model("resnet20")) < 0.28e6  # 0.27M as in He et al.
    assert 0.84e6 < n_params(create_model("resnet56")) < 0.87e6
    assert 1.7e6 < n_params(create_model("resnet110")) < 1.75e6
    assert 14.5e6 < n_params(create_model("vgg16")) < 15.1e6


@pytest.mark.parametrize("name", ["resnet20", "preresnet20", "vgg16"])
def test_in_channels_one(name):
    model = create_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
        if name != "vgg16":  # four 2x2 max-pools need >= 16x16; the ResNets take digits' 8x8 as is
            assert model(torch.randn(1, 1, 8, 8)).shape == (1, 10)


def test_unknown_model():
    with pytest.raises(ValueError, match="known models: .*resnet20"):
        create_model("resnet21")
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


@pytest.mark.parametrize("depth", [20, 38, 74])
def test_resnet_structure(depth):
    m = create_model(f"resnet{depth}")
    n = (depth - 2) // 6
    assert isinstance(m.stem, nn.Sequential) and hasattr(m.head, "fc") and m.head.fc.out_features == 10
    for i, width in enumerate((16, 32, 64), start=1):
        stage = getattr(m, f"layer{i}")
        assert isinstance(stage, nn.Sequential) and len(stage) == n
        assert all(isinstance(b, BasicBlock) for b in stage)
        assert stage[0].conv2.out_channels == width
    assert len(m.blocks()) == 3 * n
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) + 1 == depth  # 3x3 convs + the fc layer
    # identity shortcuts inside a stage, 1x1 conv + BN where the shape changes
    assert isinstance(m.layer1[0].shortcut, nn.Identity) and isinstance(m.layer2[1].shortcut, nn.Identity)
    proj = m.layer2[0].shortcut
    assert isinstance(proj[0], nn.Conv2d) and proj[0].kernel_size == (1, 1) and isinstance(proj[1], nn.BatchNorm2d)


@pytest.mark.parametrize("stage,preact", [(1, False), (2, False), (3, False), (2, True)])
def test_block_forward_is_residual_plus_shortcut(stage, preact):
    m = create_model("preresnet20" if preact else "resnet20")
    m.train()
    for mod in m.modules():  # make BN non-trivial so a mix-up of branches would show
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    m.eval()
    block = getattr(m, f"layer{stage}")[0]
    assert isinstance(block, PreActBlock if preact else BasicBlock)
    x = torch.randn(2, block.in_planes, 16, 16)
    with torch.no_grad():
        out = block(x)
        ref = block.residual(x) + block.shortcut(x)
        if not preact:
            ref = torch.relu(ref)
    torch.testing.assert_close(out, ref)
    assert out.shape == (2, block.planes, 16 // block.stride, 16 // block.stride)


def test_kaiming_init():
    m = create_model("resnet56")
    conv = m.layer3[2].conv1
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() / math.sqrt(2 / fan_out) - 1) < 0.05
    bn = m.layer3[2].bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    z = create_model("resnet20", zero_init_residual=True)
    assert all(torch.all(b.bn2.weight == 0) for b in z.blocks())


def test_vgg_custom_cfg():
    m = create_model("vgg16", cfg=[8, "M", 16, "M", 32], num_classes=3)
    assert m.classifier.in_features == 32
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_register_model():
    @register_model(name="_test_tiny")
    def tiny(num_classes=10, in_channels=3):
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    try:
        assert "_test_tiny" in list_models()
        assert create_model("_test_tiny", num_classes=4)(torch.randn(2, 3, 4, 4)).shape == (2, 4)
        with pytest.raises(ValueError, match="already registered"):
            register_model(lambda **kw: None, name="_test_tiny")
    finally:
        from pyeff.models import registry
        registry._MODELS.pop("_test_tiny", None)


def test_torchvision_models():
    pytest.importorskip("torchvision")
    m = create_model("torchvision.resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    m1 = create_model("torchvision.resnet18", num_classes=5, in_channels=1).eval()
    assert m1.conv1.in_channels == 1
    with torch.no_grad():
        assert m1(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    m2 = create_model("torchvision.mobilenet_v2", num_classes=5, in_channels=1).eval()
    with torch.no_grad():
        assert m2(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    assert "torchvision.resnet18" in list_models(include_torchvision=True)
    with pytest.raises(ValueError, match="unknown torchvision model"):
        create_model("torchvision.resnet19")
