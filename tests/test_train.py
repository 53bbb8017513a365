"""The shared training loop: config checks, metrics files, hooks, atomic checkpoints, bitwise
resume, corrupt-checkpoint errors, and the `pyeff train` command."""
import glob
import os

import pytest
import torch
import torch.nn as nn

from pyeff.data import load_dataset
from pyeff.train import (CheckpointError, Hook, LRSchedule, TrainConfig, Trainer, atomic_save,
                         load_checkpoint, read_jsonl, split_outputs)
from pyeff.train.metrics import BASE_COLUMNS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    tr = load_dataset("digits", "train").subset(192, seed=1)
    te = load_dataset("digits", "test").subset(96, seed=1)
    return tr, te


class TinyNet(nn.Module):
    """Conv + BN (buffers) + dropout (consumes the RNG), optionally returning (logits, aux)."""

    def __init__(self, with_aux=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2))
        self.head = nn.Linear(32, 10)
        self.with_aux = with_aux

    def forward(self, x):
        f = self.body(x)
        logits = self.head(f)
        if self.with_aux:
            return logits, {"cost": f.abs().mean(1)}
        return logits


@pytest.fixture(scope="module", autouse=True)
def zoo_names():
    """A TrainConfig names a zoo model (checked on construction): TinyNet gets two zoo names while
    this module's tests run."""
    from pyeff.models import register_model, registry

    added = [n for n in ("tiny", "other") if n not in registry._MODELS]
    for n in added:
        register_model(lambda num_classes=10, in_channels=1: TinyNet(), name=n)
    yield
    for n in added:
        registry._MODELS.pop(n, None)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyNet(**kw)


def cfg(out, **kw):
    base = dict(model="tiny", dataset="digits", epochs=2, batch_size=64, lr=0.05, out_dir=str(out),
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def fit(out, data, net=None, hooks=(), **kw):
    t = Trainer(net or make_model(), cfg(out, **kw), *data, hooks=hooks, verbose=False)
    t.fit()
    return t


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# -- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, words", [
    ({"epochs": 0}, "epochs"), ({"schedule": "linear"}, "schedule"),
    ({"batch_size": 0}, "batch_size"), ({"warmup": 5, "epochs": 5}, "warmup"),
    ({"milestones": (9,), "epochs": 5, "schedule": "step"}, "milestones"),
    ({"device": "tpu"}, "device"), ({"lr": -1.0}, "lr"), ({"train_subset": 0}, "train_subset"),
    ({"model": "nosuch"}, "unknown model 'nosuch'.*known models: .*resnet20"),
    ({"dataset": "nosuch"}, "unknown dataset 'nosuch'.*digits"),
])
def test_config_validation(kw, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**kw)


def test_lr_schedule_shapes():
    cos = LRSchedule("cosine", epochs=4, steps_per_epoch=10)
    assert cos(0) == 1.0 and cos(20) == pytest.approx(0.5) and cos(39) < 0.01
    step = LRSchedule("step", epochs=4, steps_per_epoch=10, milestones=(2, 3), gamma=0.1)
    assert [step(s) for s in (0, 19, 20, 29, 30)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    warm = LRSchedule("cosine", epochs=4, steps_per_epoch=10, warmup=1)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0) and warm(10) == 1.0
    assert LRSchedule("constant", 3, 5)(14) == 1.0


# -- metrics ---------------------------------------------------------------------------------
def test_fit_writes_metrics_checkpoint_and_plot(tmp_path, digits):
    t = fit(tmp_path, digits)
    assert [r["epoch"] for r in t.history] == [1, 2]
    with open(tmp_path / "metrics.csv") as f:
        header = f.readline().strip().split(",")
        rows = f.read().strip().splitlines()
    assert header == list(BASE_COLUMNS) and len(rows) == 2
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in lines] == [1, 2]
    assert set(BASE_COLUMNS) <= set(lines[0])
    for r in lines:
        assert 0 <= r["train_acc"] <= 1 and 0 <= r["test_acc"] <= 1 and r["images_per_s"] > 0
        assert r["train_loss"] > 0 and r["lr"] > 0
    assert lines[1]["lr"] < lines[0]["lr"]  # cosine decays
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["epoch"] == 2 and ck["global_step"] == 2 * t.steps_per_epoch == 6
    assert ck["config"]["model"] == "tiny" and len(ck["history"]) == 2
    assert (tmp_path / "best.pt").exists()
    # evaluate() agrees with what fit logged for the final epoch
    assert t.evaluate()["acc"] == pytest.approx(t.history[-1]["test_acc"])


def test_training_learns(tmp_path, digits):
    t = fit(tmp_path, digits, epochs=6, lr=0.1, batch_size=16)
    assert t.history[-1]["train_loss"] < t.history[0]["train_loss"]
    assert t.history[-1]["test_acc"] > 0.3  # chance is 0.1


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path, digits):
    fit(tmp_path, digits, epochs=1)
    with pytest.raises(ValueError, match="--resume"):
        fit(tmp_path, digits, epochs=1)
    fit(tmp_path, digits, epochs=1, overwrite=True)


# -- checkpoints -----------------------------------------------------------------------------
class StopAfter(Hook):
    """Simulates a crash: raises when epoch `n + 1` begins, i.e. after epoch n's checkpoint."""

    def __init__(self, n):
        self.n = n

    def on_epoch_begin(self, trainer, epoch):
        if epoch == self.n + 1:
            raise KeyboardInterrupt


class Counter(Hook):
    """Stateful hook drawing random numbers: its state must survive the resume too."""

    def __init__(self):
        self.batches = 0
        self.draws = torch.zeros(0)

    def on_batch_end(self, trainer, step, metrics):
        self.batches += 1
        self.draws = torch.cat([self.draws, torch.rand(1)])

    def state_dict(self):
        return {"batches": self.batches, "draws": self.draws}

    def load_state_dict(self, state):
        self.batches, self.draws = state["batches"], state["draws"]


def test_resume_after_interruption_is_bitwise_identical(tmp_path, digits):
    ref_hook = Counter()
    ref = fit(tmp_path / "ref", digits, epochs=3, hooks=[ref_hook], warmup=1)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(out, digits, epochs=3, hooks=[StopAfter(1), Counter()], warmup=1)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len(read_jsonl(out / "metrics.jsonl")) == 1
    # a fresh process would build the model from another state: the checkpoint must win
    hook = Counter()
    res = fit(out, digits, net=make_model(seed=123), epochs=3, hooks=[StopAfter(99), hook],
              warmup=1, resume=True)
    assert res.resumed_from is not None
    assert state_equal(ref.model, res.model)
    ref_opt, res_opt = ref.optimizer.state_dict()["state"], res.optimizer.state_dict()["state"]
    assert all(torch.equal(ref_opt[k]["momentum_buffer"], res_opt[k]["momentum_buffer"])
               for k in ref_opt)
    assert hook.batches == ref_hook.batches and torch.equal(hook.draws, ref_hook.draws)
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
    assert [[r[k] for k in keys] for r in ref.history] == [[r[k] for k in keys]
                                                          for r in res.history]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # resuming a finished run does nothing and keeps the weights
    again = fit(out, digits, net=make_model(seed=5), epochs=3, hooks=[StopAfter(99), Counter()],
                warmup=1, resume=True)
    assert state_equal(ref.model, again.model)


def test_resume_hook_states_must_have_a_home(tmp_path, digits):
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path, digits, epochs=2, hooks=[Counter(), StopAfter(1)])
    # a stateful hook missing on resume is refused, naming it
    with pytest.raises(CheckpointError, match="Counter"):
        fit(tmp_path, digits, epochs=2, resume=True)
    # stateless hooks may come and go (StopAfter dropped, Recorder added)
    log = []
    c = Counter()
    fit(tmp_path, digits, epochs=2, hooks=[c, Recorder("r", log)], resume=True)
    assert c.batches == 2 * 3 and ("r", "epoch_begin", 2) in log and ("r", "epoch_begin", 1) not in log


def test_resume_without_checkpoint_starts_fresh(tmp_path, digits):
    a = fit(tmp_path / "a", digits, epochs=1)
    b = fit(tmp_path / "b", digits, epochs=1, resume=True)
    assert b.resumed_from is None and state_equal(a.model, b.model)


def test_resume_with_other_settings_is_refused(tmp_path, digits):
    fit(tmp_path, digits, epochs=1)
    with pytest.raises(CheckpointError, match="lr: checkpoint has 0.05, this run has 0.1"):
        fit(tmp_path, digits, epochs=1, lr=0.1, resume=True)
    with pytest.raises(CheckpointError, match="model: checkpoint has 'tiny'"):
        fit(tmp_path, digits, epochs=1, model="other", resume=True)


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"v": torch.arange(5)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"\x00" * 100)  # a partial write, then the "disk" fails
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        atomic_save({"v": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["v"], torch.arange(5))
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp files left behind


def test_crash_while_checkpointing_keeps_previous_epoch(tmp_path, digits, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def save_then_die(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == "pyeff-checkpoint":
            calls["n"] += 1
            if calls["n"] == 2:  # epoch 2's checkpoint: die half way through
                f.write(b"PK\x03\x04 partial")
                raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path, digits, epochs=2)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert not glob.glob(str(tmp_path / ".*tmp")) and not glob.glob(str(tmp_path / "*.tmp"))
    t = fit(tmp_path, digits, epochs=2, resume=True)
    assert [r["epoch"] for r in t.history] == [1, 2]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, digits, damage):
    fit(tmp_path, digits, epochs=1)
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as err:
        fit(tmp_path, digits, epochs=2, resume=True)
    msg = str(err.value)
    assert str(path) in msg and "delete" in msg
    if damage != "foreign":
        assert "corrupt" in msg
    assert "Traceback" not in msg and len(msg) < 600


# -- hooks -----------------------------------------------------------------------------------
class Recorder(Hook):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def on_fit_begin(self, t):
        self.log.append((self.name, "fit_begin"))

    def on_epoch_begin(self, t, epoch):
        self.log.append((self.name, "epoch_begin", epoch))

    def should_skip_batch(self, t, step, batch):
        self.log.append((self.name, "skip?", step))
        return False

    def loss(self, t, outputs, targets, loss):
        self.log.append((self.name, "loss"))
        return loss

    def after_backward(self, t):
        assert all(p.grad is not None for p in t.model.parameters())
        self.log.append((self.name, "after_backward"))

    def on_batch_end(self, t, step, metrics):
        assert {"loss", "correct", "batch_size", "lr"} <= set(metrics)
        self.log.append((self.name, "batch_end", step))

    def on_eval_begin(self, t):
        self.log.append((self.name, "eval_begin"))

    def on_eval_batch(self, t, outputs, targets):
        self.log.append((self.name, "eval_batch"))

    def eval_metrics(self, t):
        self.log.append((self.name, "eval_metrics"))
        return {f"{self.name}_metric": 1.5}

    def on_epoch_end(self, t, epoch, metrics):
        assert "test_acc" in metrics and f"{self.name}_metric" in metrics
        metrics[f"{self.name}_epoch"] = epoch
        self.log.append((self.name, "epoch_end", epoch))

    def on_fit_end(self, t, history):
        self.log.append((self.name, "fit_end"))


def test_hooks_are_called_in_order(tmp_path, digits):
    log = []
    tr, te = digits[0].subset(100), digits[1].subset(40)
    fit(tmp_path, (tr, te), hooks=[Recorder("a", log), Recorder("b", log)], epochs=1)
    # 100 images / batch 64 = 2 steps; 40 test images = 1 eval batch
    per_step = lambda s: [("a", "skip?", s), ("b", "skip?", s), ("a", "loss"), ("b", "loss"),
                          ("a", "after_backward"), ("b", "after_backward"),
                          ("a", "batch_end", s), ("b", "batch_end", s)]
    expected = ([("a", "fit_begin"), ("b", "fit_begin"), ("a", "epoch_begin", 1),
                 ("b", "epoch_begin", 1)] + per_step(0) + per_step(1)
                + [("a", "eval_begin"), ("b", "eval_begin"), ("a", "eval_batch"),
                   ("b", "eval_batch"), ("a", "eval_metrics"), ("b", "eval_metrics"),
                   ("a", "epoch_end", 1), ("b", "epoch_end", 1), ("a", "fit_end"),
                   ("b", "fit_end")])
    assert log == expected
    row = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert row["a_metric"] == 1.5 and row["b_epoch"] == 1
    with open(tmp_path / "metrics.csv") as f:
        assert f.readline().strip().endswith("a_metric,b_metric,a_epoch,b_epoch")


class CostLoss(Hook):
    """Adds the model's auxiliary per-sample cost to the loss (what DFS/DDI hooks do)."""

    def __init__(self):
        self.seen_aux = False

    def loss(self, t, outputs, targets, loss):
        self.seen_aux = "cost" in outputs.aux and outputs.aux["cost"].shape == targets.shape
        return loss + 5.0 * outputs.aux["cost"].mean()


def test_loss_hook_changes_training(tmp_path, digits):
    plain = fit(tmp_path / "plain", digits, net=make_model(with_aux=True), epochs=1)
    hook = CostLoss()
    costly = fit(tmp_path / "cost", digits, net=make_model(with_aux=True), epochs=1,
                 hooks=[hook])
    assert hook.seen_aux
    assert not state_equal(plain.model, costly.model)
    # penalising the features' magnitude shrinks them
    x = digits[1].normalize(digits[1].images)
    plain.model.eval(), costly.model.eval()
    with torch.no_grad():
        assert costly.model(x)[1]["cost"].mean() < plain.model(x)[1]["cost"].mean()


def test_skip_batch_hook(tmp_path, digits):
    class SkipAll(Hook):
        def should_skip_batch(self, t, step, batch):
            return True

    class SkipOdd(Hook):
        def should_skip_batch(self, t, step, batch):
            return step % 2 == 1

    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = fit(tmp_path / "all", digits, net=model, hooks=[SkipAll()], epochs=2)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert [r["skipped_batches"] for r in t.history] == [3, 3]
    assert t.scheduler.last_epoch == 6  # the LR schedule still advances over skipped batches

    t = fit(tmp_path / "odd", digits, hooks=[SkipOdd()], epochs=2)
    assert [r["skipped_batches"] for r in t.history] == [1, 2]  # steps 1 | 3, 5
    assert not all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())


def test_split_outputs_conventions():
    z = torch.zeros(2, 3)
    assert split_outputs(z).logits is z and split_outputs(z).aux == {}
    o = split_outputs((z, {"cost": 1}))
    assert o.logits is z and o.aux == {"cost": 1}
    o = split_outputs({"logits": z, "gates": 2})
    assert o.logits is z and o.aux == {"gates": 2}
    with pytest.raises(ValueError, match="logits"):
        split_outputs({"out": z})
    with pytest.raises(ValueError, match="tuple"):
        split_outputs((z, z, z))


def test_non_hook_is_rejected(digits, tmp_path):
    with pytest.raises(TypeError, match="Hook"):
        Trainer(make_model(), cfg(tmp_path), *digits, hooks=[object()])


# -- the command -----------------------------------------------------------------------------
def _models_available():
    try:
        from pyeff.models import create_model  # noqa: F401
        return True
    except ImportError:
        return False


needs_models = pytest.mark.skipif(not _models_available(), reason="pyeff.models not built yet")


@needs_models
def test_cli_train_quick_run(tmp_path, capsys):
    from pyeff.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", "resnet20", "--data", "digits", "--quick", "--epochs", "2",
            "--train-subset", "128", "--test-subset", "64", "--batch-size", "32", "--threads",
            "1", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "train loss" in text and "test acc" in text and str(out) in text
    assert len([ln for ln in text.splitlines() if ln.strip().startswith(("1 ", "2 "))]) >= 2
    for f in ("checkpoint.pt", "best.pt", "metrics.jsonl", "metrics.csv", "curves.png"):
        assert (out / f).exists(), f
    cfg_saved = load_checkpoint(out / "checkpoint.pt")["config"]
    assert cfg_saved["train_subset"] == 128 and cfg_saved["epochs"] == 2
    # again without --resume: refused with a user error, not a traceback
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0  # already finished: resumes to the end at once
    (out / "checkpoint.pt").write_bytes(b"junk")
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "Traceback" not in err


def test_cli_train_help_states_defaults(capsys):
    from pyeff.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for d in ("(default: resnet20)", "(default: shapes", "(default: 128)", "(default: 0.1)",
              "(default: cosine)", "(default: 10; 2 with --quick)", "(default: 0)",
              "(default: runs/<model>-<data>-<YYYYmmdd-HHMMSS>)"):
        assert d in text, d


def test_cli_train_bad_settings_are_user_errors(capsys):
    from pyeff.cli import main

    assert main(["train", "--epochs", "0"]) == 2
    assert "epochs must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--data", "nosuchdata", "--epochs", "1"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
