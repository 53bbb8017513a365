"""Trained float baselines, cached by everything that defines them, shared between experiments,
recipes and runs: DFS, DDI and every later method start from the same converged float network
without each retraining it.

An entry's key is a hash of the training config's run-defining fields (model, dataset, epochs,
lr, schedule, seed, batch size, subsets, ...; not paths, device or threads), a fingerprint of the
data actually trained and tested on, and CACHE_VERSION (bumped when the shared loop changes what a
config trains). An entry is one file written atomically; one that cannot be read, or holds another
network, is rebuilt.

Where: baselines/ in pyeff's cache folder (pyeff.data.cache.cache_dir(): $PYEFF_CACHE, else
~/.cache/pyeff, beside the generated data sets); PYEFF_BASELINE_CACHE=<folder> puts the entries
elsewhere, PYEFF_BASELINE_CACHE=off turns the cache off.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import torch

from pyeff.train.checkpoint import CheckpointError, atomic_save, read_checkpoint
from pyeff.train.config import RUN_DEFINING_FIELDS, TrainConfig

CACHE_ENV = "PYEFF_BASELINE_CACHE"
CACHE_VERSION = 1
FORMAT = "pyeff-float-baseline"


def cache_dir() -> Optional[str]:
    """The baselines folder, or None when the cache is off."""
    from pyeff.data.cache import cache_dir as pyeff_cache

    root = os.environ.get(CACHE_ENV)
    if root is not None and root.strip().lower() in ("off", "0", "none", ""):
        return None
    return os.path.expanduser(root) if root else str(pyeff_cache() / "baselines")


def data_fingerprint(data) -> str:
    """A hash of the (train_set, test_set) images and labels (a few ms for the embedded sets)."""
    h = hashlib.sha256()
    for ds in data:
        for t in (ds.images, ds.labels):
            t = t.contiguous().cpu()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(cfg: TrainConfig, data) -> tuple[str, dict]:
    """(key, described): the entry's name and what it stands for (stored beside the weights)."""
    described = {f: _plain(getattr(cfg, f)) for f in RUN_DEFINING_FIELDS}
    described["data"] = data_fingerprint(data)
    described["cache_version"] = CACHE_VERSION
    blob = json.dumps(described, sort_keys=True).encode()
    return f"{cfg.model}-{cfg.dataset}-{hashlib.sha256(blob).hexdigest()[:20]}", described


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def entry_path(cfg: TrainConfig, data) -> Optional[str]:
    root = cache_dir()
    return None if root is None else os.path.join(root, cache_key(cfg, data)[0] + ".pt")


def load(cfg: TrainConfig, data, model_factory):
    """(model, history) from the cache, or None on a miss. A damaged entry, or one whose weights do
    not fit `model_factory()`, counts as a miss (and is rebuilt by the caller's store)."""
    path = entry_path(cfg, data)
    if path is None or not os.path.exists(path):
        return None
    key, described = cache_key(cfg, data)
    try:
        entry = read_checkpoint(path, what="cached float baseline", format=FORMAT,
                                required=("state_dict", "described", "history"))
        if entry["described"] != described:
            raise CheckpointError(f"{path} was written for another configuration")
        model = model_factory()
        model.load_state_dict(entry["state_dict"])
    except (CheckpointError, RuntimeError, KeyError, TypeError) as exc:
        print(f"pyeff: rebuilding the cached float baseline {key} ({str(exc).splitlines()[0]})", flush=True)
        return None
    return model, entry["history"]


def store(cfg: TrainConfig, data, model, history) -> Optional[str]:
    """Write the entry (atomically); returns its path, or None when the cache is off."""
    path = entry_path(cfg, data)
    if path is None:
        return None
    _, described = cache_key(cfg, data)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "described": described, "history": history, "state_dict": state}, path)
    return path
