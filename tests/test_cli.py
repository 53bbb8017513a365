"""The `pyeff` commands as a user meets them: every option documented with its default; bad
settings of `pyeff dfs train` / `pyeff ddi train` refused before any training, in one line with exit
code 2; a damaged checkpoint given to any command named in one line with exit code 2 (one reader,
pyeff.train.checkpoint.read_checkpoint); DFS/DDI checkpoints that carry their config and recipe,
and older ones with flat keys."""
import json
import os

import pytest
import torch

from pyeff.cli import build_parser, main

torch.set_num_threads(1)

TINY = ["--model", "resnet20", "--data", "digits", "--train-subset", "64", "--test-subset", "32",
        "--batch-size", "32", "--device", "cpu", "--threads", "1"]


def subparser(*path):
    p = build_parser()
    for name in path:
        sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
        p = sub.choices[name]
    return p


@pytest.mark.parametrize("path", [("train",), ("dfs", "train"), ("dfs", "eval"), ("ddi", "train"),
                                  ("ddi", "eval")], ids=" ".join)
def test_every_option_has_help_and_its_default(path):
    p = subparser(*path)
    for a in p._actions:
        if not a.option_strings or a.dest == "help" or a.required:
            continue
        h = (a.help or "").strip()
        assert "(default: " in h, (a.option_strings, h)
        assert not h.startswith("(default"), f"{a.option_strings} has no text"


def test_recipe_help_lists_conversion_and_recipe_options(capsys):
    with pytest.raises(SystemExit):
        main(["dfs", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in ("--bits INT,...", "(default: 0,8,10,12,14,16,32)", "--train-mode {all,routed}", "--target X",
              "(default: 25.0)", "--gate-epochs N", "--data DATASET, --dataset DATASET", "--out OUT_DIR",
              "(default: runs/dfs)", "--base-checkpoint"):
        assert s in text, s
    with pytest.raises(SystemExit):
        main(["ddi", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for s in ("--cost {flops,energy,latency}", "--channel-gates, --no-channel-gates", "--no-layer-gates",
              "--energy-mac-pj X", "(default: 4.6)", "--channel-mode {mask,width}", "--exit-weight X",
              "(default: runs/ddi)"):
        assert s in text, s
    assert "--input-size" not in text  # taken from the data


@pytest.fixture
def no_training(monkeypatch):
    """Any training step fails the test: validation must come first."""
    from pyeff.train.loop import Trainer

    def refuse(self):
        raise AssertionError("training started before the settings were checked")
    monkeypatch.setattr(Trainer, "fit", refuse)


def one_line_error(capsys, prefix):
    err = capsys.readouterr().err.strip()
    assert err.startswith(prefix) and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra, words", [
    (["--bits", "0,8,33"], "bit widths [33]"), (["--bits", "0"], "at least two choices"),
    (["--bits", "8,8"], "duplicate bit widths"), (["--bits", "32,8"], "ascending"),
    (["--model", "vgg11"], "cannot convert model 'vgg11'"), (["--model", "nosuch"], "unknown model 'nosuch'"),
    (["--target", "-5"], "target must be a number in [0, 100]"), (["--target", "150"], "target"),
    (["--beta", "-1"], "beta"), (["--dfs-epochs", "0"], "dfs_epochs"), (["--gate-lr", "0"], "gate_lr"),
    (["--base-epochs", "0"], "base_epochs"), (["--gate-bias=1,2"], "gate_bias has 2 values"),
    (["--data", "nosuch"], "unknown dataset"), (["--batch-size", "0"], "batch_size"),
])
def test_dfs_train_checks_everything_before_phase_1(extra, words, capsys, no_training, tmp_path):
    assert main(["dfs", "train", *TINY, "--out", str(tmp_path), *extra]) == 2
    assert words in one_line_error(capsys, "pyeff dfs train: error:")
    assert not os.path.exists(tmp_path / "phase1-float")


@pytest.mark.parametrize("extra, words", [
    (["--model", "vgg11"], "cannot convert model 'vgg11'"), (["--target", "150"], "target"),
    (["--widths", "0,1"], "widths must be fractions in (0, 1]"), (["--exit-weight", "-1"], "exit_weight"),
    (["--ddi-epochs", "0"], "ddi_epochs"), (["--energy-mac-pj", "-1"], "mac_pj"),
])
def test_ddi_train_checks_everything_before_phase_1(extra, words, capsys, no_training, tmp_path):
    assert main(["ddi", "train", *TINY, "--out", str(tmp_path), *extra]) == 2
    assert words in one_line_error(capsys, "pyeff ddi train: error:")


@pytest.mark.parametrize("argv", [["dfs", "train", "--bits", "a,b"], ["ddi", "train", "--cost", "joules"],
                                  ["ddi", "train", "--gate-bias", "1,2,3"], ["train", "--epochs", "x"],
                                  ["ddi", "eval", "--checkpoint", "x.pt", "--budgets", "0.5,1.5"]])
def test_unparsable_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err


# -- one checkpoint reader -------------------------------------------------------------------
@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x80\x02 this is not a checkpoint " * 20)
    return str(path)


def assert_names_corrupt_file(capsys, path, prefix):
    err = one_line_error(capsys, prefix)
    assert path in err and "corrupt" in err and "weights_only" not in err, err


def test_dfs_eval_corrupt_checkpoint(garbage, capsys):
    assert main(["dfs", "eval", "--checkpoint", garbage]) == 2
    assert_names_corrupt_file(capsys, garbage, "pyeff dfs eval: error:")


def test_ddi_eval_corrupt_checkpoint(garbage, capsys):
    assert main(["ddi", "eval", "--checkpoint", garbage]) == 2
    assert_names_corrupt_file(capsys, garbage, "pyeff ddi eval: error:")


def test_dfs_train_corrupt_base_checkpoint(garbage, capsys, no_training, tmp_path):
    assert main(["dfs", "train", *TINY, "--out", str(tmp_path / "o"), "--base-checkpoint", garbage]) == 2
    assert_names_corrupt_file(capsys, garbage, "pyeff dfs train: error:")


def test_ddi_train_corrupt_base_checkpoint(garbage, capsys, no_training, tmp_path):
    assert main(["ddi", "train", *TINY, "--out", str(tmp_path / "o"), "--base-checkpoint", garbage]) == 2
    assert_names_corrupt_file(capsys, garbage, "pyeff ddi train: error:")


def test_train_resume_corrupt_checkpoint(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"\x80\x02 this is not a checkpoint " * 20)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out), "--resume"]) == 2
    assert_names_corrupt_file(capsys, str(out / "checkpoint.pt"), "pyeff train: error:")


def test_wrong_kind_of_file_is_named(tmp_path, capsys):
    from pyeff.models import create_model
    from pyeff.train import atomic_save

    path = str(tmp_path / "float.pt")
    atomic_save({"model": create_model("resnet20", num_classes=10, in_channels=1).state_dict()}, path)
    assert main(["dfs", "eval", "--checkpoint", path]) == 2
    err = one_line_error(capsys, "pyeff dfs eval: error:")
    assert f"{path} is not a pyeff DFS checkpoint" in err
    # the weights of another network as the base: named before phase 1
    assert main(["dfs", "train", *TINY[2:], "--model", "resnet32", "--out", str(tmp_path / "o"),
                 "--base-checkpoint", path]) == 2
    err = one_line_error(capsys, "pyeff dfs train: error:")
    assert path in err and "do not fit resnet32" in err


# -- checkpoints carry their config and recipe -----------------------------------------------
def test_dfs_train_and_eval_end_to_end(tmp_path, capsys):
    from pyeff.dfs import DFSConfig
    from pyeff.dfs.recipe import DFSRecipe, load_dfs

    out = str(tmp_path / "run")
    rc = main(["dfs", "train", *TINY, "--base-epochs", "1", "--gate-epochs", "1", "--dfs-epochs", "1",
               "--bits", "0,8,32", "--train-mode", "routed", "--target", "50", "--out", out])
    assert rc == 0 and "saved" in capsys.readouterr().out
    ckpt = torch.load(f"{out}/dfs.pt", weights_only=True)
    assert DFSConfig.from_dict(ckpt["config"]) == DFSConfig(bits=(0, 8, 32), train_mode="routed")
    recipe = DFSRecipe.from_dict(ckpt["recipe"])
    assert (recipe.target, recipe.model, recipe.train_subset, recipe.out_dir) == (50.0, "resnet20", 64, out)
    net, meta = load_dfs(f"{out}/dfs.pt")
    assert net.config == DFSConfig(bits=(0, 8, 32), train_mode="routed") and meta["dataset"] == "digits"
    js = str(tmp_path / "eval.json")
    assert main(["dfs", "eval", "--checkpoint", f"{out}/dfs.pt", "--test-subset", "32", "--batch-size", "16",
                 "--time", "0.05", "--json", js]) == 0
    assert json.load(open(js))["bits"] == [0, 8, 32]


def test_old_flat_dfs_checkpoint_loads(tmp_path):
    from pyeff.dfs import convert
    from pyeff.dfs.recipe import DFS_FORMAT, load_dfs, save_dfs
    from pyeff.models import create_model
    from pyeff.train import atomic_save

    torch.manual_seed(0)
    net = convert(create_model("resnet20", num_classes=5), bits=(0, 8, 32), train_mode="routed").eval()
    x = torch.randn(4, 3, 32, 32)
    net.calibrate([x])
    new, old = str(tmp_path / "new.pt"), str(tmp_path / "old.pt")
    save_dfs(net, new, model="resnet20", dataset="shapes", num_classes=5, in_channels=3)
    atomic_save({"format": DFS_FORMAT, "bits": [0, 8, 32], "train_mode": "routed", "state_dict": net.state_dict(),
                 "model": "resnet20", "dataset": "shapes", "num_classes": 5, "in_channels": 3, "target": 25.0}, old)
    with torch.no_grad():
        ref = net(x)[0]
        for path in (new, old):
            net2, _ = load_dfs(path)
            assert net2.config == net.config
            torch.testing.assert_close(net2(x)[0], ref)


def test_ddi_checkpoints_old_flat_and_latency(tmp_path, monkeypatch):
    from pyeff.ddi import DDIConfig, DDINet, convert
    from pyeff.ddi.recipe import DDI_FORMAT, load_ddi, save_ddi
    from pyeff.models import create_model
    from pyeff.train import atomic_save

    torch.manual_seed(0)
    net = convert(create_model("resnet20", num_classes=5), channel_mode="width", exits=True).eval()
    new, old, lat = (str(tmp_path / f"{n}.pt") for n in ("new", "old", "lat"))
    meta = dict(model="resnet20", dataset="shapes", num_classes=5, in_channels=3)
    save_ddi(net, new, **meta)
    flat = {"format": DDI_FORMAT, "cost": "flops", "channel_gates": True, "layer_gates": True, "exits": True,
            "input_size": [3, 32, 32], "channel_mode": "width", "widths": [0.25, 0.5, 0.75, 1.0],
            "table": net.table.to_dict(), "budget_exits": None, "state_dict": net.state_dict(), **meta}
    atomic_save(flat, old)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)[0]
        for path in (new, old):
            net2, _ = load_ddi(path)
            assert net2.config == net.config
            torch.testing.assert_close(net2(x)[0], ref)
    # a latency net's stored table is used as is: loading times nothing
    ckpt = torch.load(new, weights_only=True)
    ckpt["config"]["cost"] = "latency"
    atomic_save(ckpt, lat)
    real = DDINet.measure_costs

    def no_timing(self, unit=None, *a, **kw):
        assert (unit or self.cost_unit) != "latency", "load_ddi re-timed the network"
        return real(self, unit, *a, **kw)
    monkeypatch.setattr(DDINet, "measure_costs", no_timing)
    net3, _ = load_ddi(lat)
    assert net3.config == DDIConfig.from_dict(ckpt["config"]) and net3.cost_unit == "latency"


# -- no "No CUDA runtime is found" on machines without a GPU -----------------------------------
NO_CUDA_RUNTIME = "No CUDA runtime is found"


def run_quiet_check(tmp_path, *args):
    """`python ARGS` with no visible GPU and a CUDA_HOME: where torch.utils.cpp_extension's import
    logs NO_CUDA_RUNTIME (as on a CPU machine with a CUDA toolkit)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CUDA_HOME=str(tmp_path), OMP_NUM_THREADS="1",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, *args], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_timing_logs_no_cuda_runtime_warning(tmp_path):
    from pyeff.dfs import convert
    from pyeff.dfs.recipe import save_dfs
    from pyeff.models import create_model

    control = run_quiet_check(tmp_path, "-c", "import torch.utils.cpp_extension")
    if NO_CUDA_RUNTIME not in control.stderr:
        pytest.skip("this torch build does not log the warning (no CUDA support compiled in)")
    ckpt = str(tmp_path / "dfs.pt")
    net = convert(create_model("resnet20", num_classes=10, in_channels=1), bits=(0, 8, 32))
    save_dfs(net, ckpt, model="resnet20", dataset="digits", num_classes=10, in_channels=1)
    p = run_quiet_check(tmp_path, "-m", "pyeff", "dfs", "eval", "--checkpoint", ckpt, "--test-subset", "16",
                        "--batch-size", "8", "--time", "0.01")
    assert "wall-clock per image" in p.stdout  # it timed
    assert NO_CUDA_RUNTIME not in p.stdout + p.stderr, p.stderr
    p = run_quiet_check(tmp_path, "-c", "import torch; from pyeff.experiments.measure import inference_latency, "
                        "latency_on; m = torch.nn.Linear(4, 4); inference_latency(m, (2, 4), min_run_time=0.01); "
                        "latency_on(m, torch.randn(2, 4), 0.01)")
    assert NO_CUDA_RUNTIME not in p.stdout + p.stderr, p.stderr
    p = run_quiet_check(tmp_path, "-m", "pyeff", "dfs", "eval", "--help")
    assert NO_CUDA_RUNTIME not in p.stdout + p.stderr, p.stderr
