"""pyeff.prune: the slim network computes what the masked network computes, on every supported
architecture, with random BatchNorm statistics and random masks; the rules for tied channels; bad
masks; state_dict, torch.compile and ONNX of the result."""
import copy
import io

import pytest
import torch
from torch import nn

from conftest import randomise_bn
from pyeff.models import create_model
from pyeff.prune import bn_layers, channel_plan, masked, slim

ARCHS = ["resnet20", "preresnet20", "vgg11", "densenet40", "torchvision.resnet18", "torchvision.resnet50",
         "torchvision.mobilenet_v2"]


def randomised(name, gen, **kw):
    """A zoo model with random BatchNorm statistics (an untrained net's identity BatchNorms would hide
    a wrong channel mapping)."""
    return randomise_bn(create_model(name, **kw), gen)


def random_keep(model, gen, p=0.5):
    keep = {n: torch.rand(bn.num_features, generator=gen) > p for n, bn in bn_layers(model).items()}
    for k in keep.values():
        k[torch.randint(len(k), (1,), generator=gen)] = True
    return keep


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ARCHS)
def test_slim_equals_masked(name):
    gen = torch.Generator().manual_seed(hash(name) % 1000)
    model = randomised(name, gen)
    keep = random_keep(model, gen)
    before = copy.deepcopy(model.state_dict())
    small, plan = slim(model, keep, return_plan=True)
    assert plan.removed() > 0 and n_params(small) < n_params(model)
    x = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = masked(model, keep)(x)
        out = small.eval()(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k


def test_slim_keeps_everything_for_a_full_mask():
    gen = torch.Generator().manual_seed(0)
    model = randomised("resnet20", gen)
    keep = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bn_layers(model).items()}
    small = slim(model, keep)
    assert n_params(small) == n_params(model)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model(x))


def test_tied_channels_go_only_where_every_bn_masks_them():
    gen = torch.Generator().manual_seed(1)
    model = randomised("resnet20", gen)
    keep = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bn_layers(model).items()}
    stream = ["stem.1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]  # the BNs writing stage 1's stream
    for n in stream:
        keep[n][3] = False          # channel 3: masked by all of them -> removable
    keep["layer1.0.bn2"][5] = False  # channel 5: masked by one only -> stays, zeroed
    small, plan = slim(model, keep, return_plan=True)
    assert small.stem[0].out_channels == 15 and small.layer1[2].conv2.out_channels == 15
    z = plan.zeroed()
    assert list(z) == ["layer1.0.bn2"] and torch.equal(z["layer1.0.bn2"], torch.arange(16) == 5)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), masked(model, keep)(x), rtol=1e-4, atol=1e-6)


def test_preact_stream_read_raw_by_a_projection_stays_whole():
    gen = torch.Generator().manual_seed(2)
    model = randomised("preresnet20", gen)
    keep = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bn_layers(model).items()}
    for n, bn in bn_layers(model).items():
        if bn.num_features == 16:     # every BN reading or writing stage 1's stream masks channel 0
            keep[n][0] = False
    plan = channel_plan(model, keep)
    # stage 1's stream feeds layer2.0's projection shortcut raw: it must stay 16 wide
    assert plan.in_keep.get("layer2.0.shortcut.0") is None or len(plan.in_keep["layer2.0.shortcut.0"]) == 16
    small = slim(model, keep)
    assert small.layer2[0].shortcut[0].in_channels == 16
    assert small.layer1[0].conv1.out_channels == 15  # inner channels of a block are removable
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), masked(model, keep)(x), rtol=1e-4, atol=1e-6)


def test_densenet_concatenated_channels_go_when_every_reader_masks_them():
    gen = torch.Generator().manual_seed(3)
    model = randomised("densenet40", gen)
    keep = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bn_layers(model).items()}
    # the first dense layer's new channels sit at offset 24 of every later reader of stage 1
    readers = [n for n, bn in bn_layers(model).items() if n.startswith("stage1.") and n.endswith(("bn1", ".bn"))
               and bn.num_features > 24]
    for n in readers:
        keep[n][24] = False
    small = slim(model, keep)
    assert small.stage1[0].conv2.out_channels == model.stage1[0].conv2.out_channels - 1
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), masked(model, keep)(x), rtol=1e-4, atol=1e-6)


def test_state_dict_round_trips():
    gen = torch.Generator().manual_seed(4)
    model = randomised("vgg11", gen, width=0.25)
    keep = random_keep(model, gen)
    small = slim(model, keep).eval()
    buf = io.BytesIO()
    torch.save(small.state_dict(), buf)
    buf.seek(0)
    again = slim(randomised("vgg11", torch.Generator().manual_seed(9), width=0.25), keep).eval()
    again.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x))
    assert small.cfg[0] == small.features[0].out_channels  # the recorded widths follow the slimming


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter: no onnxscript needed
def test_compile_and_onnx_accept_the_result():
    ort = pytest.importorskip("onnxruntime")  # in requirements.txt: runs in make test
    gen = torch.Generator().manual_seed(5)
    model = randomised("resnet20", gen)
    small = slim(model, random_keep(model, gen)).eval()
    x = torch.randn(2, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ref = small(x)
        torch.testing.assert_close(torch.compile(small, fullgraph=True)(x), ref, rtol=1e-4, atol=1e-5)
    buf = io.BytesIO()
    torch.onnx.export(small, (x,), buf, input_names=["x"], dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5)


def test_bad_masks_are_clear_errors():
    model = create_model("resnet20")
    full = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bn_layers(model).items()}
    with pytest.raises(ValueError, match="removes every channel of layer1.0.bn1"):
        slim(model, {**full, "layer1.0.bn1": torch.zeros(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"bool tensor of shape \(16,\)"):
        slim(model, {"layer1.0.bn1": torch.ones(15, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool tensor"):
        slim(model, {"layer1.0.bn1": torch.ones(16)})
    with pytest.raises(ValueError, match="not BatchNorm2d layers"):
        slim(model, {"layer1.0.conv1": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(TypeError, match="keep must be a dict"):
        slim(model, torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        slim(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), {})


def test_an_op_the_rule_does_not_cover_is_caught():
    """sigmoid(0) = 0.5: a masked channel after a sigmoid is not zero, so removing it is not exact; the
    output check says so instead of returning a different network."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Sigmoid(), nn.Conv2d(8, 4, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    randomise_bn(net, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="does not compute what the masked network computes"):
        slim(net, {"1": torch.arange(8) < 4})
    slim(nn.Sequential(*[m if not isinstance(m, nn.Sigmoid) else nn.ReLU() for m in net]), {"1": torch.arange(8) < 4})
