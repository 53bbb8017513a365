"""Atomic checkpoints and RNG state capture.

`atomic_save` writes to a temporary file in the target's directory, flushes and fsyncs it, then
`os.replace`s it over the target, so a crash at any point leaves either the old checkpoint or the
new one, never a torn file. Checkpoints load with `weights_only=True`: they hold only tensors and
plain Python containers (hook states must too). `read_checkpoint` is the one reader of every file
pyeff writes (training checkpoints, best.pt, DFS and DDI checkpoints): a damaged or foreign file
is a CheckpointError naming it, never a raw unpickling traceback.
"""
from __future__ import annotations

import os
import random
import re
import tempfile

import numpy as np
import torch

FORMAT = "pyeff-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupt, truncated, foreign, or from another run."""


def atomic_save(obj, path) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not every filesystem allows fsync on a directory
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _load_failure(exc: BaseException) -> str:
    """Why torch.load failed, without torch's advice to load with weights_only=False (wrong for a
    damaged file, and unsafe for a foreign one)."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if m:
        reason = " ".join(m.group(1).split())
        if reason.startswith("Unsupported global"):
            return f"it holds pickled Python objects a checkpoint never contains ({reason[:160]})"
        return f"{type(exc).__name__}: {reason[:160]}"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


def read_checkpoint(path, *, what: str = "checkpoint", format=None, required=(), advice: str = "",
                    map_location="cpu") -> dict:
    """Load a file pyeff wrote with torch.save (weights_only=True), or raise CheckpointError (a
    ValueError) that names the file, says what is wrong with it and ends with `advice`.

    Args:
        what: what the file should be, for the messages ("DFS checkpoint", ...).
        format: the value its "format" key must have (None: any dict).
        required: keys it must hold.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path}" + (f" ({advice})" if advice else ""))
    tail = f"; {advice}" if advice else ""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a {what}{tail}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (truncated zip, bad pickle, foreign object types, ...)
        raise CheckpointError(f"{what} {path} is corrupt, truncated or not a pyeff file and cannot be "
                              f"read ({_load_failure(exc)}){tail}") from None
    if not isinstance(ckpt, dict) or (format is not None and ckpt.get("format") != format):
        found = ckpt.get("format") if isinstance(ckpt, dict) else None
        raise CheckpointError(f"{path} is not a {what}" + (f" (it is a {found!r} file)" if found else "") + tail)
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{what} {path} is incomplete (missing {', '.join(missing)}){tail}")
    return ckpt


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by the Trainer, or raise CheckpointError saying what to do."""
    path = os.fspath(path)
    advice = f"delete {path} (or choose another output directory) to start fresh"
    ckpt = read_checkpoint(path, what="pyeff training checkpoint", format=FORMAT, advice=advice,
                           map_location=map_location)
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')}, "
                              f"this pyeff reads version {VERSION}; {advice}")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "config", "history")
               if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                              f"{advice}")
    return ckpt


def rng_state() -> dict:
    """This process's RNG states as tensors and plain containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [s.cpu() for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
