"""PSGConv2d / psg_ / PSGSignHook, the E2Train object, the energy-account hook and `pyeff e2train`."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyeff.e2train import E2Train, EnergyHook, SLUConfig, SMDHook, format_energy_table
from pyeff.energy import EnergyModel
from pyeff.ops import psg as psg_ops
from pyeff.models import create_model
from pyeff.nn import PSGConv2d, PSGSignHook, QuantConv2d, psg_
from pyeff.ops.psg import psg_conv2d_weight_grad
from pyeff.ops.quant_conv import quant_conv2d
from pyeff.train import TrainConfig, Trainer
from pyeff.train.hooks import LambdaHook

WIDTHS = (4, 8, 8)
B, N_TRAIN = 16, 32
SMD_SEED = 2  # drops the first of the two batches, keeps the second


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny ops: one thread is several times faster than two on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 6, 3, padding=1, stride=1)
    p = PSGConv2d.from_float(conv, **kw)
    q = QuantConv2d.from_float(nn.Conv2d(3, 6, 3, padding=1))
    q.weight, q.bias = nn.Parameter(conv.weight.detach().clone()), nn.Parameter(conv.bias.detach().clone())
    return p, q


# -------------------------------------------------------------------------------- PSG layer

def test_psg_forward_equals_quant_conv2d_and_input_grad_equals_quantconv():
    p, q = _pair()
    x = torch.randn(2, 3, 8, 8)
    xp, xq = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp, yq = p(xp), q(xq)
    ref = quant_conv2d(x, p.weight.detach(), p.bias.detach(), 1, (1, 1), 1, 1, w_bits=8, a_bits=8)
    torch.testing.assert_close(yp, ref, rtol=0, atol=0)
    torch.testing.assert_close(yp, yq, rtol=0, atol=0)
    g = torch.randn_like(yp) * 1e-3
    yp.backward(g)
    yq.backward(g)
    torch.testing.assert_close(xp.grad, xq.grad, rtol=0, atol=0)
    torch.testing.assert_close(p.bias.grad, q.bias.grad)


@pytest.mark.parametrize("threshold", [0.0, 1e-3, 5e-5])
def test_psg_weight_grad_is_the_ops_output(threshold):
    p, _ = _pair(1, threshold=threshold)
    x = torch.randn(3, 3, 8, 8, requires_grad=True)
    y = p(x)
    g = torch.randn_like(y) * 1e-3
    with psg_ops.tracing() as trace:
        y.backward(g)
    gw, unc = psg_conv2d_weight_grad(x.detach(), g, tuple(p.weight.shape), 1, 1, threshold=threshold)
    torch.testing.assert_close(p.weight.grad, gw, rtol=0, atol=0)
    e = p.psg_log[-1]
    assert e["uncertain"] == int(unc.sum()) and e["entries"] == unc.numel() and e["rows"] == 6
    # the layer's record of the exact step is what the op did (rows, or single entries)
    assert (e["exact_rows"], e["exact_entries"]) == (trace[-1]["exact_rows"], trace[-1]["exact_entries"])
    assert e["predictor"]
    assert p.uncertain_fraction == pytest.approx(int(unc.sum()) / unc.numel())


def test_threshold_inf_and_sign_step_give_the_exact_gradients_sign():
    p, _ = _pair(2, threshold=math.inf)
    model = nn.Sequential(p, nn.BatchNorm2d(6))
    x = torch.randn(2, 3, 8, 8)
    y = p(x)
    y.retain_grad()
    model[1](y).backward(torch.randn(2, 6, 8, 8))
    exact = torch.nn.grad.conv2d_weight(x, tuple(p.weight.shape), y.grad, 1, 1)
    bn_grad = model[1].weight.grad.clone()
    PSGSignHook().after_backward(SimpleNamespace(model=model))
    assert torch.equal(p.weight.grad, torch.sign(exact))
    assert p.psg_log[-1]["predictor"] is False and p.psg_log[-1]["exact_rows"] == 6
    assert torch.equal(model[1].weight.grad, bn_grad)  # other parameters keep their gradient


def test_psg_converter_shares_parameters_and_filters():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    keys = sorted(m.state_dict())
    c = psg_(m, inplace=False, filter_fn=lambda mod, name: name != "0")
    assert type(c[0]) is nn.Conv2d and isinstance(c[2], PSGConv2d) and type(m[2]) is nn.Conv2d
    assert sorted(c.state_dict()) == keys
    w = m[0].weight
    psg_(m, x_bits=8, g_bits=8, threshold=0.0)
    assert isinstance(m[0], PSGConv2d) and m[0].weight is w and m[0].x_bits == 8
    assert isinstance(psg_(nn.Conv2d(1, 1, 1)), PSGConv2d)


# -------------------------------------------------------------------------------- energy accounting

def _tiny():
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=10, in_channels=1, widths=WIDTHS)


@pytest.fixture(scope="module")
def digits():
    from pyeff.data import load_dataset
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _layer_macs(model, x):
    """Per-sample MACs of every conv and linear, from the output shapes (independent of module_flops)."""
    out = {}

    def rec(m, inp, o):
        if isinstance(m, nn.Conv2d):
            out[m] = o[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            out[m] = m.in_features * m.out_features
    hs = [m.register_forward_hook(rec) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in hs:
        h.remove()
    return out


def _run(digits, tmp_path, smd, slu, psg, extra=()):
    e2 = E2Train(smd=SMDHook(p=0.5, seed=SMD_SEED) if smd else False, slu=slu, psg=psg)
    model, hooks = e2.apply(_tiny())
    cfg = TrainConfig(model="resnet20", dataset="digits", epochs=1, batch_size=B, train_subset=N_TRAIN,
                      test_subset=16, out_dir=str(tmp_path / f"r{int(smd)}{int(bool(slu))}{int(bool(psg))}"),
                      overwrite=True, progress=False, augment=False, threads=1, lr=0.01)
    hist = Trainer(model, cfg, *digits, hooks=list(extra) + hooks, verbose=False).fit()
    return e2, model, hist[-1]


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2")
    out = {}
    for smd in (False, True):
        for slu in (False, True):
            for psg in (False, True):
                executed = []
                rec = LambdaHook(loss=lambda t, o, y, loss, ex=executed: (ex.append(o.aux["execute"].sum(0))
                                                                          if "execute" in o.aux else None) or loss)
                out[smd, slu, psg] = (*_run(digits, tmp, smd, slu, psg, [rec]), executed)
    return out


def test_every_combination_trains_and_fills_the_account(runs):
    for (smd, slu, psg), (e2, model, last, executed) in runs.items():
        assert math.isfinite(last["train_loss"]), (smd, slu, psg)
        acct = e2.energy_hook.account
        assert acct.energy_j() > 0 and last["energy_j"] == pytest.approx(acct.energy_j())
        assert set(acct.phases) >= {"forward", "backward", "predictor", "exact", "skipped"}
        assert acct.energy_j("skipped") == 0
        assert last["energy_kept_batches"] + last["energy_dropped_batches"] == N_TRAIN // B
        assert (acct.macs("predictor") != {}) == psg
        assert "| total |" in format_energy_table(acct.table())


@pytest.mark.parametrize("mode", ["rows", "entries"])
def test_exact_macs_are_what_the_op_computed(mode, digits, tmp_path, monkeypatch):
    """The account's exact phase charges what the PSG op's exact step ran: whole rows (the layer's
    MACs x exact rows / rows) or single entries (N*OH*OW each), read back from the op's trace."""
    monkeypatch.setenv("PYEFF_PSG_EXACT", mode)
    with psg_ops.tracing() as trace:
        e2, _, _ = _run(digits, tmp_path, False, False, {"threshold": 1e-4})
    assert trace and any(c[f"exact_{mode}"] for c in trace)
    want = sum((c["exact_rows"] * math.prod(c["weight"][1:]) + c["exact_entries"]) * c["positions"] for c in trace)
    assert e2.energy_hook.account.macs("exact")["fp32"] == want


def test_account_values_derived_independently(runs):
    smd = SMDHook(p=0.5, seed=SMD_SEED)
    kept = sum(not smd.drops(s) for s in range(N_TRAIN // B))
    assert 0 < kept < N_TRAIN // B
    per = _layer_macs(_tiny(), torch.zeros(1, 1, 8, 8))
    convs = sum(v for m, v in per.items() if isinstance(m, nn.Conv2d))
    lin = sum(v for m, v in per.items() if isinstance(m, nn.Linear))
    stem = next(v for m, v in per.items() if isinstance(m, nn.Conv2d))
    for s, batches in ((False, N_TRAIN // B), (True, kept)):
        n = batches * B
        acct = runs[s, False, False][0].energy_hook.account
        assert acct.macs("forward") == {"fp32": n * (convs + lin)}
        assert acct.macs("backward") == {"fp32": n * (2 * (convs + lin) - stem)}  # no input grad at the stem
        assert runs[s, False, False][2]["energy_kept_batches"] == batches
        acct = runs[s, False, True][0].energy_hook.account
        assert acct.macs("forward") == {"int8": n * convs, "fp32": n * lin}
        assert acct.macs("backward") == {"fp32": n * (convs - stem + 2 * lin)}
        assert acct.macs("predictor") == {"int4x16": n * convs}
        assert 0 < acct.macs("exact")["fp32"] <= n * convs
        em = EnergyModel()
        assert acct.energy_j("predictor") == pytest.approx(n * convs * em.mac_pj_at((4, 16)) * 1e-12)


def test_energy_ordering(runs):
    e = {k: v[0].energy_hook.account.energy_j() for k, v in runs.items()}
    fwd = {k: v[0].energy_hook.account.macs("forward").get("fp32", 0) for k, v in runs.items()}
    assert e[True, False, False] < e[False, False, False]          # smd < dense
    assert e[True, True, False] < e[True, False, False]            # smd + slu < smd
    assert e[False, True, False] < e[False, False, False]          # slu < dense
    assert e[False, False, True] < e[False, False, False]          # psg < dense (int8 forward)
    assert e[True, True, True] < e[True, True, False]              # all three < smd + slu
    assert fwd[True, True, False] < fwd[True, False, False]


def test_slu_charges_the_gated_blocks_by_the_rows_that_ran_them(runs):
    """forward fp32 MACs of an SLU run = dense - (samples that skipped gated block g) x its residual
    chain's MACs, summed over g, + the gate's head; derived from aux["execute"]."""
    base = _tiny()
    per = {name: v for m, v in _layer_macs(base, torch.zeros(1, 1, 8, 8)).items()
           for name, mm in base.named_modules() if mm is m}
    gated = ["layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer3.0", "layer3.1", "layer3.2"]
    residual = [per[f"{b}.conv1"] + per[f"{b}.conv2"] for b in gated]
    for smd in (False, True):
        e2, net, last, executed = runs[smd, True, False]
        n = last["energy_kept_batches"] * B
        ran = torch.stack(executed).sum(0).tolist()
        assert len(ran) == len(gated) and sum(ran) < n * len(gated)
        # the gate's head (a Linear per gated block) is counted; its 1x1 projections run functionally on the
        # pooled features (C x 10 MACs a sample) and are not module calls, so the hook does not see them
        gate = len(net.gate.proj) * net.gate.head.in_features * net.gate.head.out_features
        dense = n * sum(per.values())
        expected = dense - sum((n - r) * c for r, c in zip(ran, residual)) + n * gate
        assert e2.energy_hook.account.macs("forward")["fp32"] == expected


def test_psg_metrics_in_history(runs):
    last = runs[False, False, True][2]
    assert 0 <= last["psg_uncertain_pct"] <= 100 and 0 <= last["psg_exact_rows_pct"] <= 100


def test_energy_hook_state_roundtrip(runs):
    h = runs[True, True, True][0].energy_hook
    h2 = EnergyHook()
    h2.load_state_dict(h.state_dict())
    assert h2.account.energy_j() == pytest.approx(h.account.energy_j())


def test_torchvision_resnet18_slu_psg_smoke():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model, hooks = E2Train(smd=False, slu=True, psg=True).apply(tv.models.resnet18(num_classes=4))
    assert any(isinstance(m, PSGConv2d) for m in model.modules())
    model.train()
    logits, aux = model(torch.randn(2, 3, 16, 16))
    F.cross_entropy(logits, torch.tensor([0, 1])).backward()
    sign = next(h for h in hooks if isinstance(h, PSGSignHook))
    sign.after_backward(SimpleNamespace(model=model))
    layers = [m for m in model.modules() if isinstance(m, PSGConv2d) and m.weight.grad is not None]
    assert layers and all(set(m.weight.grad.unique().tolist()) <= {-1.0, 0.0, 1.0} for m in layers)


# -------------------------------------------------------------------------------- CLI

def test_cli_train_and_eval(tmp_path, capsys):
    from pyeff.cli import main
    out = tmp_path / "run"
    rc = main(["e2train", "train", "--model", "resnet20", "--dataset", "digits", "--epochs", "1", "--batch-size", "16",
               "--train-subset", "32", "--test-subset", "16", "--out", str(out), "--no-progress", "--threads", "1",
               "--no-augment", "--no-stretch", "--psg-threshold", "1e-4"])
    assert rc == 0
    assert (out / "checkpoint.pt").exists() and (out / "e2train.pt").exists()
    assert "| total |" in capsys.readouterr().out
    rc = main(["e2train", "eval", "--checkpoint", str(out / "e2train.pt"), "--test-subset", "16",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert res["accuracy"] == pytest.approx(hist[-1]["test_acc"])
    assert res["training_energy_j"] == pytest.approx(hist[-1]["energy_j"])


@pytest.mark.parametrize("flag", [["--psg-x-bits", "1"], ["--psg-g-bits", "17"], ["--psg-threshold", "-1"],
                                  ["--psg-threshold", "nan"], ["--smd-p", "1"], ["--slu-target", "0"]])
def test_cli_bad_flags(tmp_path, capsys, flag):
    from pyeff.cli import main
    rc = main(["e2train", "train", "--dataset", "digits", "--out", str(tmp_path / "x"), "--epochs", "1"] + flag)
    assert rc == 2
    err = capsys.readouterr().err
    assert "error" in err and not (tmp_path / "x" / "checkpoint.pt").exists()


# -------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("psg, word", [({"x_bits": 1}, "x_bits"), ({"g_bits": 17}, "g_bits"),
                                       ({"w_bits": 32}, "w_bits"), ({"threshold": -1e-5}, "threshold"),
                                       ({"threshold": float("nan")}, "threshold"), ({"bits": 4}, "unknown"),
                                       ({"sign_scale": 0}, "sign_scale"), ("yes", "psg")])
def test_e2train_bad_psg(psg, word):
    with pytest.raises(ValueError, match=word):
        E2Train(psg=psg)


@pytest.mark.parametrize("smd", [1.0, -0.1, float("nan"), "x"])
def test_e2train_bad_smd(smd):
    with pytest.raises(ValueError, match="p"):
        E2Train(smd=smd)


def test_e2train_bad_slu_and_energy():
    with pytest.raises(ValueError, match="target"):
        E2Train(slu=SLUConfig(target=1.5))
    with pytest.raises(ValueError, match="slu"):
        E2Train(slu="on")
    with pytest.raises(ValueError, match="energy"):
        E2Train(energy="45nm")
    with pytest.raises(ValueError, match="residual block"):
        E2Train(smd=False, psg=False).apply(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(TypeError):
        E2Train().apply("resnet20")


def test_layer_bad_input():
    for kw, word in (({"x_bits": 1}, "x_bits"), ({"g_bits": 17}, "g_bits"), ({"threshold": float("nan")}, "threshold"),
                     ({"threshold": -1.0}, "threshold")):
        with pytest.raises(ValueError, match=word):
            PSGConv2d(1, 1, 1, **kw)
        with pytest.raises(ValueError, match=word):
            psg_(nn.Conv2d(1, 1, 1), **kw)
    with pytest.raises(ValueError, match="scale"):
        PSGSignHook(scale=float("nan"))


def test_epochs_stretch():
    assert E2Train(smd=True).epochs(160) == 213
    assert E2Train(smd=False).epochs(160) == 160


# -------------------------------------------------------------------------------- docs

def _doc_blocks():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "docs" / "e2train.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("marker", ["PSGSignHook().after_backward", "format_energy_table(e2.energy_hook"])
def test_doc_examples_run(marker, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = next(b for b in _doc_blocks() if marker in b)
    torch.manual_seed(0)
    exec(compile(code, "docs/e2train.md", "exec"), {})  # noqa: S102 (our own docs)
