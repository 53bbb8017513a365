"""DDP: two CPU processes (gloo) reach the same weights as one process with the same global
batch, and only rank 0 writes files."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import pyeff.train as train
from pyeff.data import load_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 120


def tiny_model():
    """No BatchNorm: per-rank batch statistics would differ from the single-process ones."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 10))


def register_tiny():
    """A TrainConfig names a zoo model (checked on construction): give tiny_model one."""
    from pyeff.models import register_model, registry

    if "tiny" not in registry._MODELS:
        register_model(lambda num_classes=10, in_channels=1: tiny_model(), name="tiny")
        return True
    return False


@pytest.fixture
def tiny_registered():
    added = register_tiny()
    yield
    if added:
        from pyeff.models import registry
        registry._MODELS.pop("tiny", None)


def config(out):
    # 160 images / global batch 32 = 5 steps per epoch, every batch full (16 per rank); 75 test
    # images do not split evenly: the loader pads rank 1, evaluation must count each image once
    return train.TrainConfig(model="tiny", dataset="digits", epochs=2, batch_size=32, lr=0.05,
                             train_subset=160, test_subset=75, out_dir=out, progress=False,
                             threads=1)


def data():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _worker(rank, world, port, out, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    register_tiny()  # a fresh process
    t = train.Trainer(tiny_model(), config(out), *data(), verbose=False)
    assert t.world_size == world and t.per_rank_batch == 32 // world
    t.fit()
    final = t.evaluate()
    t.close()
    torch.save({"state": t.model.state_dict(), "history": t.history, "eval": final},
               f"{result}.{rank}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, nprocs):
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.time() + TIMEOUT
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT}s")


def test_two_processes_match_one(tmp_path, monkeypatch, tiny_registered):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "ddp")
    spawn(_worker, (2, free_port(), out, str(tmp_path / "res")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"res.{r}") for r in (0, 1))

    single = train.Trainer(tiny_model(), config(str(tmp_path / "single")), *data(), verbose=False)
    single.fit()
    ref = single.model.state_dict()
    for k in ref:
        torch.testing.assert_close(r0["state"][k], ref[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(r0["state"][k], r1["state"][k])  # DDP keeps ranks identical
    # evaluation is reduced over ranks: both see the whole test set's accuracy
    assert r0["eval"]["acc"] == r1["eval"]["acc"] == single.evaluate()["acc"]
    assert r0["eval"]["acc"] * 75 == pytest.approx(round(r0["eval"]["acc"] * 75))
    assert r0["eval"]["loss"] == pytest.approx(single.evaluate()["loss"], rel=1e-5)
    for a, b in zip(r0["history"], single.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == pytest.approx(b["train_acc"])
    # rank 0 alone wrote the outputs, once
    files = sorted(os.listdir(out))
    assert files == ["best.pt", "checkpoint.pt", "curves.png", "metrics.csv", "metrics.jsonl"]
    ck = train.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 2


def test_setup_needs_rendezvous_address(monkeypatch):
    from pyeff.train import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.setup("cpu")


def test_torchrun_cli(tmp_path):
    pytest.importorskip("pyeff.models")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pyeff", "train", "--model", "resnet20", "--data", "digits", "--epochs", "1",
           "--train-subset", "128", "--test-subset", "64", "--batch-size", "32",
           "--device", "cpu", "--out", str(out)]
    try:
        p = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True,
                           timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish within {TIMEOUT}s")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    # only rank 0 logs and prints the table
    assert p.stdout.count("epoch 1/1") == 1 and p.stdout.count("final test acc") == 1
    assert "2 process(es)" in p.stdout
    assert train.load_checkpoint(out / "checkpoint.pt")["world_size"] == 2
