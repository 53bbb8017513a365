"""The float-baseline cache (pyeff.train.baseline_cache) behind phase 1 of every recipe and
experiment: a hit returns the trained weights without training, any change of what defines the
run misses, a damaged entry is rebuilt, and the cache can be turned off. (conftest gives each test
its own cache folder.)"""
import os

import pytest
import torch

from pyeff.train import baseline_cache
from pyeff.train import build as build_mod
from pyeff.train.phases import float_phase, load_subsets, recipe_config

TINY = dict(model="resnet20", dataset="digits", batch_size=32, seed=0, train_subset=64, test_subset=32,
            device="cpu", progress=False)


@pytest.fixture
def trainings(monkeypatch):
    """Counts the trainings phase 1 runs."""
    calls = []
    real = build_mod.run_training

    def counted(cfg, *a, **kw):
        calls.append(cfg)
        return real(cfg, *a, **kw)

    monkeypatch.setattr(build_mod, "run_training", counted)
    return calls


def phase1(tmp_path, common=None, **kw):
    common = recipe_config(**(common or TINY))
    data = load_subsets(common)
    args = dict(epochs=1, lr=0.05, out_dir=str(tmp_path / "run"), verbose=False)
    args.update(kw)
    return float_phase(common, data, **args), data


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_hit_returns_the_trained_network_without_training(tmp_path, trainings):
    (m1, h1), data = phase1(tmp_path)
    assert len(trainings) == 1 and h1
    files = os.listdir(baseline_cache.cache_dir())
    assert len(files) == 1 and files[0].startswith("resnet20-digits-") and files[0].endswith(".pt")
    (m2, h2), _ = phase1(tmp_path)
    assert len(trainings) == 1, "a hit must not train"
    assert same_weights(m1, m2) and h2 == h1


@pytest.mark.parametrize("change", [dict(epochs=2), dict(lr=0.02), dict(seed=1), dict(train_subset=48),
                                    dict(batch_size=16), dict(model="preresnet20")])
def test_any_change_of_the_run_misses(tmp_path, trainings, change):
    phase1(tmp_path)
    common, kw = dict(TINY), {}
    for k, v in change.items():
        (kw if k in ("epochs", "lr") else common)[k] = v
    phase1(tmp_path, common, **kw)
    assert len(trainings) == 2, f"{change} must not hit the entry of another run"
    assert len(os.listdir(baseline_cache.cache_dir())) == 2


def test_paths_and_device_do_not_change_the_key(tmp_path, trainings):
    phase1(tmp_path)
    phase1(tmp_path, out_dir=str(tmp_path / "elsewhere"))
    assert len(trainings) == 1


def test_other_data_misses(tmp_path, trainings):
    common = recipe_config(**TINY)
    data = load_subsets(common)
    float_phase(common, data, epochs=1, lr=0.05, out_dir=str(tmp_path), verbose=False)
    train, test = data
    train.images[0] = 1 - train.images[0] if train.images.dtype.is_floating_point else 255 - train.images[0]
    float_phase(common, (train, test), epochs=1, lr=0.05, out_dir=str(tmp_path), verbose=False)
    assert len(trainings) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_network"])
def test_damaged_entry_is_rebuilt(tmp_path, trainings, damage, capsys):
    (m1, _), data = phase1(tmp_path)
    [name] = os.listdir(baseline_cache.cache_dir())
    path = os.path.join(baseline_cache.cache_dir(), name)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "garbage":
        with open(path, "wb") as f:
            f.write(b"not a checkpoint")
    else:  # a valid entry whose weights belong to another network
        entry = torch.load(path, weights_only=True)
        entry["state_dict"] = {k: v for k, v in list(entry["state_dict"].items())[:-2]}
        torch.save(entry, path)
    (m2, h2), _ = phase1(tmp_path)
    assert len(trainings) == 2, "a damaged entry must be rebuilt"
    assert "rebuilding the cached float baseline" in capsys.readouterr().out
    (m3, _), _ = phase1(tmp_path)
    assert len(trainings) == 2 and same_weights(m2, m3), "the rebuilt entry must be a hit again"


def test_cache_off(tmp_path, trainings, monkeypatch):
    monkeypatch.setenv("PYEFF_BASELINE_CACHE", "off")
    assert baseline_cache.cache_dir() is None
    phase1(tmp_path)
    phase1(tmp_path)
    assert len(trainings) == 2
    phase1(tmp_path, cache=False)
    assert len(trainings) == 3


def test_default_location_is_beside_the_data_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("PYEFF_BASELINE_CACHE")
    monkeypatch.setenv("PYEFF_CACHE", str(tmp_path / "c"))
    assert baseline_cache.cache_dir() == os.path.join(str(tmp_path / "c"), "baselines")
