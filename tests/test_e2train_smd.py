"""pyeff.e2train SMD on the shared Trainer: the drop rate, p = 0 is a plain run, a dropped batch
runs no forward and (default) changes nothing, step_dropped's zero-gradient step, the same steps
dropped across a resume, and bad settings."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from pyeff.data import load_dataset
from pyeff.e2train import SMDHook, drop_draw, stretch_epochs
from pyeff.train import CheckpointError, Hook, TrainConfig, Trainer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    tr = load_dataset("digits", "train").subset(192, seed=1)
    te = load_dataset("digits", "test").subset(64, seed=1)
    return tr, te


class TinyNet(nn.Module):
    """Conv + BN + linear; counts its training-mode forward calls."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(16, 10)
        self.train_calls = 0

    def forward(self, x):
        self.train_calls += self.training
        return self.head(self.body(x))


@pytest.fixture(scope="module", autouse=True)
def zoo_name():
    """A TrainConfig names a zoo model: TinyNet gets one while this module's tests run."""
    from pyeff.models import register_model, registry

    added = "smd_tiny" not in registry._MODELS
    if added:
        register_model(lambda num_classes=10, in_channels=1: TinyNet(), name="smd_tiny")
    yield
    if added:
        registry._MODELS.pop("smd_tiny", None)


def fit(out, data, hooks=(), **kw):
    torch.manual_seed(0)
    base = dict(model="smd_tiny", dataset="digits", epochs=2, batch_size=16, lr=0.05,
                weight_decay=1e-3, out_dir=str(out), progress=False)
    base.update(kw)
    t = Trainer(TinyNet(), TrainConfig(**base), *data, hooks=hooks, verbose=False)
    t.fit()
    return t


class KeptSteps(Hook):
    """Records the steps that ran a batch (on_batch_end runs only for those)."""

    def __init__(self):
        self.steps = []

    def on_batch_end(self, trainer, step, metrics):
        self.steps.append(step)


class StopAfter(Hook):
    def __init__(self, n):
        self.n = n

    def on_epoch_begin(self, trainer, epoch):
        if epoch == self.n + 1:
            raise KeyboardInterrupt


def snapshot(t):
    st = t.optimizer.state_dict()["state"]
    return ([w.detach().clone() for w in t.model.parameters()],
            {k: v["momentum_buffer"].clone() for k, v in st.items()
             if v.get("momentum_buffer") is not None})


class Probe(Hook):
    """Placed before SMDHook: the model and optimizer state as each step begins."""

    def __init__(self):
        self.before = {}

    def should_skip_batch(self, trainer, step, batch):
        self.before[step] = snapshot(trainer)
        return False


# -- the draw --------------------------------------------------------------------------------
def test_draw_is_a_pure_function_of_seed_and_step():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    h = SMDHook(p=0.3, seed=7)
    first = [h.drops(s) for s in range(20000)]
    assert torch.equal(torch.get_rng_state(), state)  # the Trainer's RNG is neither read nor used
    assert [SMDHook(p=0.3, seed=7).drops(s) for s in range(20000)] == first
    assert abs(sum(first) / len(first) - 0.3) < 0.015  # 4.6 sigma
    assert [SMDHook(p=0.3, seed=8).drops(s) for s in range(200)] != first[:200]
    u = [drop_draw(0, s) for s in range(5000)]
    assert min(u) >= 0.0 and max(u) < 1.0 and abs(sum(u) / len(u) - 0.5) < 0.02


# -- on the Trainer --------------------------------------------------------------------------
def test_drop_rate_metrics_and_no_forward(tmp_path, digits):
    kept = KeptSteps()
    smd = SMDHook(p=0.5, seed=1)
    t = fit(tmp_path, digits, hooks=[smd, kept], batch_size=4, epochs=3)  # 48 steps per epoch
    steps = 3 * t.steps_per_epoch
    expected_kept = [s for s in range(steps) if not smd.drops(s)]
    assert kept.steps == expected_kept
    assert abs(smd.dropped / steps - 0.5) < 0.15  # 144 steps: about 5 sigma
    assert smd.kept + smd.dropped == steps and smd.kept == len(expected_kept)
    assert t.model.train_calls == smd.kept  # a dropped batch runs no forward
    for r in t.history:
        assert r["smd_kept"] + r["smd_dropped"] == t.steps_per_epoch
        assert r["skipped_batches"] == r["smd_dropped"]
        assert r["smd_drop_rate"] == pytest.approx(r["smd_dropped"] / t.steps_per_epoch)


def test_p_zero_is_a_plain_run(tmp_path, digits):
    plain = fit(tmp_path / "plain", digits)
    smd = SMDHook(p=0.0)
    t = fit(tmp_path / "smd", digits, hooks=[smd])
    assert smd.dropped == 0 and [r["skipped_batches"] for r in t.history] == [0, 0]
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                 t.model.state_dict().values()))


@pytest.mark.parametrize("step_dropped", [False, True])
def test_what_a_dropped_batch_does(tmp_path, digits, step_dropped):
    probe, smd = Probe(), SMDHook(p=0.6, seed=2, step_dropped=step_dropped)
    after = {}

    class After(Hook):  # placed after SMDHook: the state once SMD has acted on this step
        def should_skip_batch(self, trainer, step, batch):
            after[step] = (snapshot(trainer), trainer.lr)
            return False

    t = fit(tmp_path, digits, hooks=[probe, smd, After()], batch_size=32, momentum=0.9)
    dropped = [s for s in range(2 * t.steps_per_epoch) if smd.drops(s)]
    checked = 0
    for s in dropped:
        (w0, m0), ((w1, m1), lr) = probe.before[s], after[s]
        if not step_dropped:  # nothing at all happens: weights and momentum untouched
            nxt = probe.before.get(s + 1, (w1, m1))
            for state in ((w1, m1), nxt):
                assert all(torch.equal(a, b) for a, b in zip(w0, state[0]))
                assert m0.keys() == state[1].keys()
                assert all(torch.equal(m0[k], state[1][k]) for k in m0)
        else:  # SGD with a zero gradient: buf = mu * buf + wd * w; w -= lr * buf
            for i, (a, b) in enumerate(zip(w0, w1)):
                buf = 1e-3 * a if i not in m0 else 0.9 * m0[i] + 1e-3 * a
                torch.testing.assert_close(m1[i], buf)
                torch.testing.assert_close(b, a - lr * buf)
        checked += 1
    assert checked >= 2 and t.model.train_calls == smd.kept


def test_resume_drops_the_same_steps(tmp_path, digits):
    ref_kept, ref_smd = KeptSteps(), SMDHook(p=0.5, seed=4)
    ref = fit(tmp_path / "ref", digits, hooks=[ref_smd, ref_kept], epochs=3)
    out = tmp_path / "run"
    first = KeptSteps()
    with pytest.raises(KeyboardInterrupt):
        fit(out, digits, hooks=[SMDHook(p=0.5, seed=4), first, StopAfter(1)], epochs=3)
    second, smd = KeptSteps(), SMDHook(p=0.5, seed=4)
    res = fit(out, digits, hooks=[smd, second, StopAfter(99)], epochs=3, resume=True)
    assert res.resumed_from is not None
    assert first.steps + second.steps == ref_kept.steps
    assert (smd.kept, smd.dropped) == (ref_smd.kept, ref_smd.dropped)  # totals came back too
    assert all(torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(),
                                                 res.model.state_dict().values()))
    assert [r["smd_dropped"] for r in res.history] == [r["smd_dropped"] for r in ref.history]
    # resuming with another seed would change which batches the rest of the run drops: refused
    with pytest.raises(CheckpointError, match="seed=4.*seed=5"):
        fit(out, digits, hooks=[SMDHook(p=0.5, seed=5)], epochs=3, resume=True)


# -- settings --------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_bad_p(p):
    with pytest.raises(ValueError, match=r"SMDHook: p is the probability .* got p="):
        SMDHook(p=p)
    with pytest.raises(ValueError, match="stretch_epochs: p is the probability"):
        stretch_epochs(10, p)


def test_bad_seed_and_flag():
    for seed in (-1, 2 ** 64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            SMDHook(seed=seed)
    with pytest.raises(ValueError, match="step_dropped"):
        SMDHook(step_dropped=1)


def test_stretch_epochs():
    assert stretch_epochs(3, 0.5) == 4 and stretch_epochs(30, 0.5) == 40  # the paper's 4/3
    assert stretch_epochs(160, 0.5) == 213 and stretch_epochs(10, 0.0) == 10
    assert stretch_epochs(10, 0.9) == 16  # 1 + 2p/3
    assert all(stretch_epochs(100, a / 10) <= stretch_epochs(100, (a + 1) / 10) for a in range(9))
    for e in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="epochs must be a positive integer"):
            stretch_epochs(e, 0.5)


def test_doc_example_runs(tmp_path, monkeypatch):
    """docs/e2train.md's SMD example runs as written."""
    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).resolve().parent.parent / "docs" / "e2train.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    scope: dict = {}
    exec(compile(code, "docs/e2train.md example 1", "exec"), scope)  # noqa: S102 (our own docs)
    assert scope["smd"].dropped > 0 and scope["history"][-1]["smd_dropped"] >= 0
