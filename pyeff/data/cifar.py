"""CIFAR-10 / CIFAR-100 from their python-pickle layout on disk (no download, ever).

Expected layout (what ``cifar-10-python.tar.gz`` and ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html extract to)::

    DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    DIR/cifar-100-python/{train, test, meta}

``data_dir`` may be DIR or the batches folder itself. torchvision's ``CIFAR10`` reads the same
files but insists on their md5 sums, which rejects the small files the tests write, hence this
short reader.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_cifar_split", "CIFAR_LAYOUT"]

CIFAR_LAYOUT = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "label_key": b"labels",
        "names_key": b"label_names",
        "num_classes": 10,
        "archive": "cifar-10-python.tar.gz",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "label_key": b"fine_labels",
        "names_key": b"fine_label_names",
        "num_classes": 100,
        "archive": "cifar-100-python.tar.gz",
    },
}


def _where_to_get(name: str, root: Path | None) -> str:
    spec = CIFAR_LAYOUT[name]
    files = ", ".join(spec["train"] + spec["test"] + [spec["meta"]])
    under = f"under {root}" if root is not None else "under data_dir"
    return (f"expected {spec['folder']}/{{{files}}} {under}; download {spec['archive']} from "
            f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it there "
            f"(pass data_dir=<the folder holding {spec['folder']}> or the folder itself)")


def _batches_dir(name: str, data_dir) -> Path:
    spec = CIFAR_LAYOUT[name]
    if data_dir is None:
        data_dir = os.environ.get("PYEFF_DATA")
    if data_dir is None:
        raise FileNotFoundError(f"{name} needs a data_dir (or $PYEFF_DATA): {_where_to_get(name, None)}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data_dir {root} does not exist; {_where_to_get(name, root)}")
    for cand in (root / spec["folder"], root):
        if (cand / spec["meta"]).is_file() or (cand / spec["test"][0]).is_file():
            return cand
    raise FileNotFoundError(f"{name}: no {spec['folder']} found in {root}; {_where_to_get(name, root)}")


def _unpickle(path: Path, name: str, root: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{name}: missing {path}; {_where_to_get(name, root)}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # truncated, not a pickle, ...
        raise ValueError(f"{name}: {path} is not a readable CIFAR pickle ({type(exc).__name__}: {exc}); "
                         f"re-extract {CIFAR_LAYOUT[name]['archive']}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: {path} holds a {type(obj).__name__}, expected a dict")
    # Files written by Python 3 with str keys are accepted too.
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def load_cifar_split(name: str, split: str, data_dir=None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images [N, 3, 32, 32], int64 labels [N] and the class names of one split."""
    spec = CIFAR_LAYOUT[name]
    root = _batches_dir(name, data_dir)
    meta = _unpickle(root / spec["meta"], name, root)
    if spec["names_key"] not in meta:
        raise ValueError(f"{name}: {root / spec['meta']} has no {spec['names_key'].decode()!r} entry")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec["names_key"]]]
    if len(classes) != spec["num_classes"]:
        raise ValueError(f"{name}: {root / spec['meta']} lists {len(classes)} classes, expected {spec['num_classes']}")
    xs, ys = [], []
    for fname in spec[split]:
        path = root / fname
        d = _unpickle(path, name, root)
        if b"data" not in d or spec["label_key"] not in d:
            raise ValueError(f"{name}: {path} lacks 'data' or {spec['label_key'].decode()!r}")
        x = np.asarray(d[b"data"])
        y = np.asarray(d[spec["label_key"]], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (x.shape[0],):
            raise ValueError(f"{name}: {path} has data {x.dtype} {x.shape} and labels {y.shape}; "
                             f"expected uint8 [N, 3072] and [N]")
        if len(y) and (y.min() < 0 or y.max() >= spec["num_classes"]):
            raise ValueError(f"{name}: {path} has labels outside [0, {spec['num_classes']})")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)))
    labels = torch.from_numpy(np.concatenate(ys))
    return images, labels, classes
