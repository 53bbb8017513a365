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


def torchrun(tmp_path, *args, ok=True, timeout=TIMEOUT):
    """`torchrun --standalone --nproc_per_node=2 -m pyeff ARGS` on the CPU (ARGS may instead start
    with a script path); the finished process, which must have succeeded if `ok`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    what = [] if args[0].endswith(".py") else ["-m", "pyeff"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *what, *args]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM, not run()'s SIGKILL: torchrun then stops its workers (each in its own session),
        # which would otherwise outlive the test
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout}s")
    p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


# the zoo model, data and sizes of every torchrun test: 4 steps of 16 images per rank per epoch
TINY_RUN = ["--model", "resnet20", "--data", "digits", "--train-subset", "128", "--test-subset",
            "64", "--batch-size", "32", "--device", "cpu"]


def test_torchrun_cli(tmp_path):
    pytest.importorskip("pyeff.models")
    out = tmp_path / "run"
    p = torchrun(tmp_path, "train", *TINY_RUN, "--epochs", "1", "--out", str(out))
    # only rank 0 logs and prints the table
    assert p.stdout.count("epoch 1/1") == 1 and p.stdout.count("final test acc") == 1
    assert "2 process(es)" in p.stdout
    assert train.load_checkpoint(out / "checkpoint.pt")["world_size"] == 2


def _phase_runs(out, phases):
    """Each phase's run folder holds a checkpoint written by both ranks' trainer."""
    for ph in phases:
        assert train.load_checkpoint(out / ph / "checkpoint.pt")["world_size"] == 2, ph


# "all" is the default (every path runs); "routed" with the gate biased to skip leaves whole blocks
# without a sample on a rank, whose weights then get no gradient there (DDP must be told)
@pytest.mark.parametrize("mode", [[], ["--train-mode", "routed", "--gate-bias=3,0,0"]],
                         ids=["all", "routed-skipping"])
def test_torchrun_dfs(tmp_path, mode):
    """`pyeff dfs train` under torchrun: its 3 phases share one process group, every phase
    trains with DDP, rank 0 alone logs, prints the result and writes dfs.pt."""
    from pyeff.dfs.recipe import load_dfs

    out = tmp_path / "dfs"
    p = torchrun(tmp_path, "dfs", "train", *TINY_RUN, "--bits", "0,8,32", "--base-epochs", "1",
                 "--gate-epochs", "1", "--dfs-epochs", "1", "--calibrate-batches", "1",
                 "--out", str(out), *mode)
    assert p.stdout.count("epoch 1/1") == 3, p.stdout
    assert p.stdout.count("DFS resnet20 on digits") == 1, p.stdout
    _phase_runs(out, ["phase1-float", "phase2-gate", "phase3-dfs"])
    net, meta = load_dfs(str(out / "dfs.pt"))
    assert meta["model"] == "resnet20" and tuple(net.bits) == (0, 8, 32)
    if mode:
        assert "computation 0.0%" in p.stdout  # every block skipped: the case under test happened


@pytest.mark.parametrize("mode", [[], ["--train-mode", "routed", "--gate-bias=3,0"]],
                         ids=["all", "routed-skipping"])
def test_torchrun_ddi(tmp_path, mode):
    """`pyeff ddi train` under torchrun: both phases share one process group, every gate,
    exit and block trains with DDP, rank 0 alone logs, prints the result and writes ddi.pt."""
    from pyeff.ddi.recipe import load_ddi

    out = tmp_path / "ddi"
    p = torchrun(tmp_path, "ddi", "train", *TINY_RUN, "--base-epochs", "1", "--ddi-epochs", "1",
                 "--out", str(out), *mode)
    assert p.stdout.count("epoch 1/1") == 2, p.stdout
    assert p.stdout.count("DDI resnet20 on digits") == 1, p.stdout
    _phase_runs(out, ["phase1-float", "phase2-ddi"])
    net, meta = load_ddi(str(out / "ddi.pt"))
    assert meta["model"] == "resnet20"
    if mode:
        assert "cost 100.0%" not in p.stdout  # blocks were skipped: the case under test happened


def test_torchrun_e2train(tmp_path):
    """`pyeff e2train train` with all three levels under torchrun: SMD drops the same batches on
    both ranks, SLU's routed blocks train with DDP (find_unused_parameters), PSG's sign step acts
    on the averaged gradient; rank 0 alone prints the energy table and writes e2train.pt."""
    from pyeff.e2train.cli import load_e2train

    out = tmp_path / "e2"
    p = torchrun(tmp_path, "e2train", "train", *TINY_RUN, "--epochs", "1", "--no-stretch", "--psg-threshold", "1e-4",
                 "--out", str(out))
    assert p.stdout.count("E2-Train resnet20 on digits") == 1, p.stdout
    assert p.stdout.count("| total |") == 1, p.stdout
    ck = train.load_checkpoint(out / "checkpoint.pt")
    assert ck["world_size"] == 2
    model, saved = load_e2train(str(out / "e2train.pt"))
    assert saved["settings"]["smd"] and saved["settings"]["slu"] and saved["settings"]["psg"]
    last = saved["history"][-1]
    assert last["energy_kept_batches"] + last["energy_dropped_batches"] == 4  # the 4 steps of the epoch
    assert last["energy_j"] > 0


def test_torchrun_earlybird(tmp_path):
    """`pyeff earlybird train` under torchrun: both ranks draw the ticket at the same epoch, stop the
    search together, slim alike and train the slim network with DDP; rank 0 alone writes earlybird.pt."""
    from pyeff.earlybird.cli import load_earlybird

    out = tmp_path / "eb"
    p = torchrun(tmp_path, "earlybird", "train", *TINY_RUN, "--epochs", "3", "--schedule", "step", "--window", "2",
                 "--threshold", "0.6", "--out", str(out))
    assert p.stdout.count("Early-Bird resnet20 on digits") == 1, p.stdout
    assert train.load_checkpoint(out / "search" / "checkpoint.pt")["world_size"] == 2
    model, saved = load_earlybird(str(out / "earlybird.pt"))
    assert saved["ticket_epoch"] == 2 and len(saved["history"]["slim"]) == 1
    assert saved["flops"]["slim"] < saved["flops"]["dense"]


FAILING_RANK = """
import pyeff.train as train
from pyeff.train import distributed


class Boom(train.Hook):
    def on_batch_end(self, trainer, step, metrics):
        if trainer.rank == 1 and step == 1:
            raise RuntimeError("boom on rank 1")


cfg = train.TrainConfig(model="resnet20", dataset="digits", epochs=1, batch_size=32, train_subset=128,
                        test_subset=32, device="cpu", out_dir="out", progress=False)
if {held}:
    with distributed.process_group("cpu"):
        train.run_training(cfg, hooks=[Boom()])
else:
    train.run_training(cfg, hooks=[Boom()])
"""


@pytest.mark.parametrize("held", [False, True], ids=["trainer-group", "recipe-group"])
def test_a_failing_rank_ends_the_run(tmp_path, held):
    """A rank that raises must exit (torchrun then stops the others), not wait in a barrier the
    other rank, blocked in the next step's all-reduce, never reaches: that hung until gloo's
    30-minute timeout."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK.format(held=held))
    p = torchrun(tmp_path, str(script), ok=False, timeout=60)
    assert p.returncode != 0 and "boom on rank 1" in p.stdout + p.stderr


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


def _earlybird_worker(rank, world, port, out, result):
    from pyeff.earlybird import EarlyBird, SlimmingPenalty

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    register_tiny()
    model = bn_model()
    eb = EarlyBird(model, ratios=(0.5,), window=2, threshold=0.3, stop=True)
    cfg = config(out).replace(epochs=8)
    t = train.Trainer(model, cfg, *data(), hooks=[SlimmingPenalty(model, 1e-3), eb], verbose=False)
    t.fit()
    t.close()
    torch.save({"drawn": eb.drawn, "epochs": len(t.history), "masks": eb.masks[0.5]}, f"{result}.{rank}")


def test_earlybird_under_ddp_draws_and_stops_alike_on_every_rank(tmp_path, monkeypatch, tiny_registered):
    """The masks come from the BatchNorm scales, which DDP keeps identical, and the penalty is added
    after the gradients are reduced: both ranks draw the same ticket and stop at the same epoch."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spawn(_earlybird_worker, (2, free_port(), str(tmp_path / "eb"), str(tmp_path / "res")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"res.{r}") for r in (0, 1))
    assert r0["drawn"] == r1["drawn"] and 0.5 in r0["drawn"]
    assert r0["epochs"] == r1["epochs"] == r0["drawn"][0.5] < 8
    assert all(torch.equal(a, b) for a, b in zip(r0["masks"], r1["masks"]))
