"""Per-epoch metrics to JSONL and CSV, and a PNG of the training curves (matplotlib, Agg)."""
from __future__ import annotations

import csv
import io
import json
import math
import os

BASE_COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                "epoch_time", "eval_time", "images_per_s", "skipped_batches")


def columns(history) -> list:
    """The base columns, then any keys hooks added, in first-seen order."""
    cols = list(BASE_COLUMNS)
    for row in history:
        for k in row:
            if k not in cols:
                cols.append(k)
    return [c for c in cols if any(c in row for row in history)] if history else cols


def _atomic_write_text(path, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):  # tensors and numpy scalars
        return _jsonable(v.item())
    return v


def write_metrics(history, out_dir) -> dict:
    """(Re)write metrics.jsonl and metrics.csv from the whole history; returns their paths.

    Rewriting from the history (which the checkpoint carries) keeps the files consistent with the
    checkpoint after a crash and resume.
    """
    jsonl = os.path.join(out_dir, "metrics.jsonl")
    csv_path = os.path.join(out_dir, "metrics.csv")
    _atomic_write_text(jsonl, "".join(
        json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n" for row in history))
    buf = io.StringIO()
    cols = columns(history)
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: _jsonable(row.get(k, "")) for k in cols})
    _atomic_write_text(csv_path, buf.getvalue())
    return {"jsonl": jsonl, "csv": csv_path}


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(history, path, title: str | None = None) -> str:
    """Loss, accuracy and learning rate against epoch, side by side, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    del plt  # only the object API is used: no global state, safe in threads
    ep = [r["epoch"] for r in history]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in history]

    fig = Figure(figsize=(12, 3.6), dpi=100)
    axes = fig.subplots(1, 3)
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        axes[0].plot(ep, series(key), marker="o", ms=3, label=label)
    axes[0].set_title("loss")
    for key, label in (("train_acc", "train"), ("test_acc", "test")):
        axes[1].plot(ep, [100 * v for v in series(key)], marker="o", ms=3, label=label)
    axes[1].set_title("accuracy (%)")
    axes[2].plot(ep, series("lr"), marker="o", ms=3, color="tab:green")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def format_table(history, keys=("epoch", "train_loss", "train_acc", "test_loss", "test_acc",
                                "lr", "epoch_time")) -> str:
    """A fixed-width text table of the history (accuracies in %)."""
    head = {"epoch": "epoch", "train_loss": "train loss", "train_acc": "train acc",
            "test_loss": "test loss", "test_acc": "test acc", "lr": "lr",
            "epoch_time": "time (s)", "images_per_s": "img/s"}
    keys = [k for k in keys if any(k in r for r in history)] or list(keys)

    def fmt(k, v):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if k.endswith("_acc"):
            return f"{100 * v:.2f}%"
        if k == "lr":
            return f"{v:.4g}"
        if isinstance(v, float):
            return f"{v:.4f}" if "loss" in k else f"{v:.1f}"
        return str(v)

    rows = [[head.get(k, k) for k in keys]] + [[fmt(k, r.get(k)) for k in keys] for r in history]
    widths = [max(len(row[i]) for row in rows) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
