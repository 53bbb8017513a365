"""pyeff.nn.quantize_: a whole model's convs and linears swapped for the integer layers, sharing
the parameters; filter, copy and bad input."""
import pytest
import torch
from torch import nn

from pyeff.models import create_model
from pyeff.nn import QuantConv2d, QuantLinear
from pyeff.nn import QuantConfig, quantize_

torch.set_num_threads(1)


def _layers(model):
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_quantize_swaps_every_layer_and_keeps_the_state_dict(rng):
    model = create_model("resnet20", num_classes=5).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, generator=rng)
    out = quantize_(model, QuantConfig(w_bits=8, a_bits=8))
    assert out is model
    kinds = _layers(model)
    assert kinds and all(t in (QuantConv2d, QuantLinear) for t in kinds.values())
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k])
    # the same as running each layer's own quantised forward: compare with a module-by-module build
    ref = create_model("resnet20", num_classes=5).eval()
    ref.load_state_dict(keys)
    for name, m in list(ref.named_modules()):
        if type(m) in (nn.Conv2d, nn.Linear):
            parent, _, child = name.rpartition(".")
            q = (QuantConv2d if type(m) is nn.Conv2d else QuantLinear).from_float(m, w_bits=8, a_bits=8)
            setattr(ref.get_submodule(parent) if parent else ref, child, q)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_quantize_filter_copy_and_layers(rng):
    model = create_model("resnet20", num_classes=5).eval()
    copy_ = quantize_(model, QuantConfig(4, 4), filter_fn=lambda m, name: not name.startswith("stem"),
                      inplace=False)
    assert all(t is nn.Conv2d or t is nn.Linear for t in _layers(model).values())  # the original untouched
    kinds = _layers(copy_)
    assert kinds["stem.0"] is nn.Conv2d and kinds["layer1.0.conv1"] is QuantConv2d
    assert copy_.layer1[0].conv1.w_bits == 4
    only_linear = quantize_(model, QuantConfig(layers=("linear",)), inplace=False)
    kinds = _layers(only_linear)
    assert kinds["head.fc"] is QuantLinear and kinds["layer1.0.conv1"] is nn.Conv2d
    single = quantize_(nn.Conv2d(3, 4, 3))
    assert type(single) is QuantConv2d
    again = quantize_(copy_, QuantConfig(8, 8))  # quantised layers are left as they are
    assert again.layer1[0].conv1.w_bits == 4


def test_quantize_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_("model")
    with pytest.raises(TypeError, match="QuantConfig"):
        quantize_(nn.Linear(2, 2), {"w_bits": 8})
    with pytest.raises(ValueError, match="w_bits"):
        QuantConfig(w_bits=1)
    with pytest.raises(ValueError, match="layers"):
        QuantConfig(layers=("pool",))
    with pytest.raises(TypeError, match="filter_fn"):
        quantize_(nn.Linear(2, 2), filter_fn=3)
