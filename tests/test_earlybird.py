"""pyeff.earlybird: the mask distance and the FIFO draw rule on hand-made masks, the hook in the
shared loop (stop, resume), the slimming penalty, masked sparse training (apply_mask == the masked
network in float64, gradients, frozen optimizer state), the low-precision search, and bad input."""
import copy

import pytest
import torch
import torch.nn as nn

from conftest import randomise_bn
from pyeff.data import load_dataset
from pyeff.earlybird import EarlyBird, SlimmingPenalty, apply_mask, global_mask, mask_distance
from pyeff.models import create_model
from pyeff.prune import bn_layers, masked
from pyeff.train import TrainConfig, Trainer

torch.set_num_threads(1)


class OneBN(nn.Module):
    def __init__(self, n=10):
        super().__init__()
        self.conv = nn.Conv2d(1, n, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(n)
        self.head = nn.Linear(n, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def set_scales(model, values):
    with torch.no_grad():
        model.bn.weight.copy_(torch.tensor(values, dtype=torch.float32))


def test_mask_distance_is_normalised_hamming():
    a = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert mask_distance(a, b) == pytest.approx(3 / 8)
    assert mask_distance(a, a) == 0.0 and mask_distance(a, ~a) == 1.0
    with pytest.raises(ValueError, match="different shapes"):
        mask_distance(a, b[:4])


def test_global_mask_thresholds_the_quantile_and_keeps_one_per_layer():
    s = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.05, 0.02, 0.04])  # layer A: 4 channels, layer B: 3
    # ratio 0.6: floor(0.6 * 7) = 4 go (threshold at the 4th smallest, 0.1): 0.1 and all of layer B ...
    keep = global_mask(s, [4, 3], 0.6)
    assert keep.tolist() == [True, False, True, True, True, False, False]  # ... but B keeps its largest
    assert global_mask(s, [4, 3], 0.3).tolist() == [True, True, True, True, True, False, False]  # 2 go


def test_ticket_is_drawn_exactly_when_the_rule_says():
    model = OneBN(10)
    eb = EarlyBird(model, ratios=0.5, window=3, threshold=0.25)
    base = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]  # keeps channels 0-4
    plans = [list(reversed(base)),              # keeps 5-9: epoch 1
             base,                              # keeps 0-4: distance 1.0 to epoch 1
             [*base[:4], 0.05, 0.55, *base[6:]],  # keeps 0-3, 5: distance 0.2 to epoch 2, 0.8 to 1
             base,                              # distances 0.2 (epoch 3), 0.0 (epoch 2): drawn at 4
             base]
    drawn_at = []
    for e, sc in enumerate(plans, start=1):
        set_scales(model, sc)
        if eb.step():
            drawn_at.append(e)
    assert drawn_at == [4] and eb.drawn == {0.5: 4}
    assert eb.history[3]["distances"][0.5] == pytest.approx([0.0, 0.2])  # oldest first
    assert eb.history[2]["distances"][0.5] == pytest.approx([0.8, 0.2])
    assert eb.mask(0.5)["bn"].tolist() == [True] * 5 + [False] * 5
    m = eb.distance_matrix(0.5)
    assert m.shape == (5, 5) and torch.allclose(m, m.T) and torch.all(m.diagonal() == 0)
    assert m[0, 1] == pytest.approx(1.0) and m[1, 3] == 0


def test_threshold_is_strict_and_window_must_fill():
    model = OneBN(10)
    eb = EarlyBird(model, ratios=0.5, window=4, threshold=0.2)
    set_scales(model, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    for _ in range(3):
        eb.step()
    assert eb.drawn == {}  # identical masks, but only 3 of the 4 in the window
    eb.step()
    assert eb.drawn == {0.5: 4}
    eb2 = EarlyBird(model, ratios=0.5, window=2, threshold=0.2)
    eb2.step()
    set_scales(model, [1.0, 0.9, 0.8, 0.7, 0.05, 0.5, 0.4, 0.3, 0.2, 0.1])  # one channel swapped: 0.2 apart
    eb2.step()
    assert eb2.drawn == {}


def test_bad_settings_are_clear_errors():
    model = OneBN()
    for r in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"in \(0, 1\)"):
            EarlyBird(model, ratios=(r,))
    with pytest.raises(ValueError, match="window"):
        EarlyBird(model, window=1)
    with pytest.raises(ValueError, match="threshold"):
        EarlyBird(model, threshold=1.0)
    with pytest.raises(ValueError, match="stop ratios"):
        EarlyBird(model, ratios=(0.3,), stop=0.5)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        EarlyBird(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        SlimmingPenalty(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="s must be"):
        SlimmingPenalty(model, s=-1)


def test_slimming_penalty_adds_s_sign_gamma():
    model = OneBN(6)
    set_scales(model, [0.5, -0.2, 0.0, 1.0, -3.0, 0.1])
    model(torch.randn(4, 1, 5, 5)).sum().backward()
    g = model.bn.weight.grad.clone()
    SlimmingPenalty(model, s=1e-2).apply()
    torch.testing.assert_close(model.bn.weight.grad - g, 1e-2 * torch.tensor([1., -1., 0., 1., -1., 1.]))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train").subset(128, seed=1), load_dataset("digits", "test").subset(64, seed=1)


@pytest.fixture(scope="module", autouse=True)
def zoo_name():
    from pyeff.models import register_model, registry

    added = "eb_tiny" not in registry._MODELS
    if added:
        register_model(lambda num_classes=10, in_channels=1: OneBN(), name="eb_tiny")
    yield
    if added:
        registry._MODELS.pop("eb_tiny", None)


def _trainer(out, data, hooks, model, epochs=6, resume=False):
    cfg = TrainConfig(model="eb_tiny", dataset="digits", epochs=epochs, batch_size=32, lr=0.05, out_dir=str(out),
                      progress=False, resume=resume, overwrite=not resume)
    return Trainer(model, cfg, *data, hooks=hooks, verbose=False)


def test_hook_in_the_shared_loop_stops_and_resumes(tmp_path, digits):
    torch.manual_seed(0)
    model = OneBN()
    eb = EarlyBird(model, ratios=(0.5,), window=2, threshold=0.5, stop=True)
    t = _trainer(tmp_path / "a", digits, [SlimmingPenalty(model), eb], model)
    hist = t.fit()
    assert 0.5 in eb.drawn and len(hist) == eb.drawn[0.5] < 6  # training ended at the draw
    assert hist[-1]["eb_drawn_0.5"] == eb.drawn[0.5]
    # a resumed run restores the masks and the history from the checkpoint
    model2 = OneBN()
    eb2 = EarlyBird(model2, ratios=(0.5,), window=2, threshold=0.5)
    t2 = _trainer(tmp_path / "a", digits, [SlimmingPenalty(model2), eb2], model2, resume=True)
    t2.load_state(torch.load(t.checkpoint_path, weights_only=True), t.checkpoint_path)
    assert eb2.drawn == eb.drawn and len(eb2.history) == len(eb.history)
    assert all(torch.equal(a, b) for a, b in zip(eb2.masks[0.5], eb.masks[0.5]))
    # resuming the stopped run with the same stop rule trains no further epoch
    model3 = OneBN()
    eb3 = EarlyBird(model3, ratios=(0.5,), window=2, threshold=0.5, stop=True)
    t3 = _trainer(tmp_path / "a", digits, [SlimmingPenalty(model3), eb3], model3, resume=True)
    assert len(t3.fit()) == len(hist) and eb3.drawn == eb.drawn


def test_checks_per_epoch_record_masks_within_the_epoch(tmp_path, digits):
    torch.manual_seed(0)
    model = OneBN()
    eb = EarlyBird(model, ratios=(0.5,), window=3, threshold=0.0, checks_per_epoch=2)  # 4 batches an epoch
    hist = _trainer(tmp_path / "b", digits, [eb], model, epochs=2).fit()
    assert [h["epoch"] for h in eb.history] == [0.5, 1, 1.5, 2] and len(eb.masks[0.5]) == 4
    assert "eb_max_distance_0.5" in hist[-1]
    with pytest.raises(ValueError, match="checks_per_epoch"):
        EarlyBird(model, checks_per_epoch=0)


# -- masked sparse training -------------------------------------------------------------------------
def _randomised(name, gen):
    return randomise_bn(create_model(name).double(), gen)


@pytest.mark.parametrize("name", ["resnet20", "preresnet20", "vgg11", "densenet40", "torchvision.resnet18"])
def test_apply_mask_equals_the_masked_network(name):
    gen = torch.Generator().manual_seed(7)
    model = _randomised(name, gen)
    keep = {n: torch.rand(bn.num_features, generator=gen) > 0.5 for n, bn in bn_layers(model).items()}
    for k in keep.values():
        k[0] = True
    ref = masked(model, keep).train()
    net = copy.deepcopy(model).train()
    h = apply_mask(net, keep, torch.zeros(1, 3, 32, 32, dtype=torch.double))
    x = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.double)
    a, b = ref(x), net(x)
    torch.testing.assert_close(b, a)
    a.square().sum().backward()
    b.square().sum().backward()
    ref_p = dict(ref.named_parameters())
    for n, p in net.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        gr = ref_p[n].grad if ref_p[n].grad is not None else torch.zeros_like(p)
        f = h.frozen.get(n)
        if f is not None:
            assert torch.all(g[f] == 0), n
            g, gr = g[~f], gr[~f]
        torch.testing.assert_close(g, gr, msg=n)
    for n, bn in bn_layers(net).items():  # running statistics of the channels that stay follow the masked net's
        stay = ~h.frozen[f"{n}.weight"] if f"{n}.weight" in h.frozen else slice(None)
        torch.testing.assert_close(bn.running_mean[stay], bn_layers(ref)[n].running_mean[stay])
    net.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x))
    h.remove()
    assert not any("forward" in m.__dict__ for m in net.modules())
    fresh = copy.deepcopy(model).eval()
    apply_mask(fresh, keep).remove()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model.eval()(x))  # the dense forward is back


def test_frozen_entries_and_optimizer_state_stay_untouched():
    gen = torch.Generator().manual_seed(8)
    model = _randomised("resnet20", gen).float().train()
    keep = {n: torch.rand(bn.num_features, generator=gen) > 0.4 for n, bn in bn_layers(model).items()}
    for k in keep.values():
        k[0] = True
    h = apply_mask(model, keep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    freeze = h.freeze_hook(opt)
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in h.frozen}
    x = torch.randn(8, 3, 32, 32, generator=gen)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        freeze.after_backward(None)
        opt.step()
        freeze.on_batch_end(None, 0, {})
    moved = 0
    for n, f in h.frozen.items():
        p = params[n]
        assert torch.equal(p.detach()[f], before[n][f]), n
        assert torch.all(opt.state[p]["momentum_buffer"][f] == 0), n
        moved += int((p.detach()[~f] != before[n][~f]).any())
    assert moved > 0


def test_apply_mask_bad_input():
    model = create_model("resnet20")
    full = {n: torch.ones(bn.num_features, dtype=torch.bool) for n, bn in bn_layers(model).items()}
    with pytest.raises(ValueError, match="removes every channel"):
        apply_mask(model, {**full, "stem.1": torch.zeros(16, dtype=torch.bool)})
    h = apply_mask(model, {**full, "layer1.0.bn1": torch.arange(16) < 8})
    with pytest.raises(ValueError, match="already has a mask"):
        apply_mask(model, full)
    h.remove()
    grouped = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2),
                            nn.BatchNorm2d(8))
    with pytest.raises(NotImplementedError, match="grouped conv"):
        apply_mask(grouped, {"1": torch.arange(8) % 2 == 0})


def test_low_precision_search_quantises_and_still_learns():
    from pyeff.earlybird import low_precision_

    torch.manual_seed(0)
    model = create_model("resnet20")
    ref = copy.deepcopy(model)
    h = low_precision_(model, bits=8, seed=3)
    x = torch.randn(8, 3, 16, 16)
    out = model(x)
    assert not torch.equal(out, ref(x))                         # the arithmetic changed ...
    torch.testing.assert_close(out, ref(x), rtol=0.2, atol=0.05 * float(ref(x).detach().abs().max()))  # ... a little
    out.square().sum().backward()
    conv = model.layer1[0].conv1
    # the weight gradient comes from 8-bit output gradients and activations: close to, not equal to, float
    ref(x).square().sum().backward()
    g, gr = conv.weight.grad, ref.layer1[0].conv1.weight.grad
    # (8-bit stochastic rounding is noisy: cosine ~0.6 here; at 16 bits it is ~0.997)
    assert not torch.equal(g, gr) and torch.nn.functional.cosine_similarity(g.flatten(), gr.flatten(), 0) > 0.3
    h.remove()
    fine = copy.deepcopy(ref)
    fine.zero_grad()
    ref.zero_grad()
    low_precision_(fine, bits=16, seed=3)
    fine(x).square().sum().backward()
    ref(x).square().sum().backward()
    g16, gr = fine.layer1[0].conv1.weight.grad, ref.layer1[0].conv1.weight.grad
    assert torch.nn.functional.cosine_similarity(g16.flatten(), gr.flatten(), 0) > 0.99
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(ValueError, match="bits"):
        low_precision_(model, bits=1)
    # a few SGD steps at 8 bits lower the loss on a fixed batch
    model = create_model("resnet20")
    low_precision_(model, bits=8)
    y = torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


# -- the command line -------------------------------------------------------------------------------
def test_cli_train_and_eval(tmp_path, capsys):
    import json

    from pyeff.cli import main

    out = tmp_path / "run"
    rc = main(["earlybird", "train", "--model", "resnet20", "--dataset", "digits", "--epochs", "4", "--batch-size",
               "16", "--train-subset", "64", "--test-subset", "32", "--out", str(out), "--no-progress", "--threads",
               "1", "--no-augment", "--schedule", "step", "--ratio", "0.5", "--window", "2", "--threshold", "0.6"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ticket at ratio 0.5 drawn at epoch 2" in printed
    assert (out / "search" / "checkpoint.pt").exists() and (out / "slim" / "checkpoint.pt").exists()
    search = [json.loads(line) for line in (out / "search" / "metrics.jsonl").read_text().splitlines()]
    slim_h = [json.loads(line) for line in (out / "slim" / "metrics.jsonl").read_text().splitlines()]
    assert len(search) == 2 and len(slim_h) == 2  # the search stopped at the draw; the ticket trained the rest
    rc = main(["earlybird", "eval", "--checkpoint", str(out / "earlybird.pt"), "--test-subset", "32",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["accuracy"] == pytest.approx(slim_h[-1]["test_acc"]) and res["flops"]["slim"] < res["flops"]["dense"]


@pytest.mark.parametrize("flag", [["--ratio", "1"], ["--window", "1"], ["--threshold", "2"], ["--penalty", "-1"]])
def test_cli_bad_flags(tmp_path, capsys, flag):
    from pyeff.cli import main

    rc = main(["earlybird", "train", "--dataset", "digits", "--out", str(tmp_path / "x"), "--epochs", "1"] + flag)
    assert rc == 2
    assert "error" in capsys.readouterr().err and not (tmp_path / "x" / "search" / "checkpoint.pt").exists()
