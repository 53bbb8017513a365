"""On-disk cache for generated datasets: atomic writes, validated reads.

A cache file is an uncompressed ``.npz`` (zip: every member carries a CRC-32 that numpy checks
when it reads the member to its end). A reader validates the arrays it gets against what it
expects (shape, dtype, value range) and treats any failure - a truncated file, flipped bytes, a
wrong shape - as a miss, so a corrupted or half-written file is never used: the caller
regenerates and overwrites it. Writers go through a temporary file in the same directory and
``os.replace``, so readers never see a partial file even when two processes write at once.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

__all__ = ["cache_dir", "load_arrays", "save_arrays"]


def cache_dir() -> Path:
    """``$PYEFF_CACHE`` if set, else ``~/.cache/pyeff``."""
    env = os.environ.get("PYEFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyeff"


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file in the same dir, fsync, os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a shared cache should be readable
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_arrays(
    path: str | os.PathLike,
    validate: Callable[[dict[str, np.ndarray]], bool],
) -> dict[str, np.ndarray] | None:
    """Read a cache file; ``None`` when it is missing, unreadable or fails ``validate``."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reads every member fully -> CRC checked
        if not validate(arrays):
            return None
        return arrays
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile):
        return None
