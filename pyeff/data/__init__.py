"""Datasets held in memory as uint8 tensors, and a fast batch loader over them.

    >>> from pyeff.data import load_dataset, BatchLoader
    >>> train = load_dataset("shapes", "train")          # the embedded default, no download
    >>> test = load_dataset("shapes", "test")
    >>> loader = BatchLoader(train, 128, shuffle=True, augment=True, seed=0)
    >>> for epoch in range(3):
    ...     loader.set_epoch(epoch)
    ...     for x, y in loader: ...

Datasets: ``shapes`` (procedural, 20k/5k, 32x32 RGB, 10 classes; the default), ``digits``
(scikit-learn's 1,797 real 8x8 digits), ``cifar10`` / ``cifar100`` (python-pickle layout under
``data_dir``).
"""
from __future__ import annotations

import threading
from typing import Callable

import torch

from pyeff.data.base import ImageDataset, channel_stats, convert_images
from pyeff.data.cache import cache_dir
from pyeff.data.loader import BatchLoader

__all__ = ["load_dataset", "list_datasets", "register_dataset", "DEFAULT_DATASET", "ImageDataset",
           "BatchLoader", "cache_dir"]

DEFAULT_DATASET = "shapes"
SPLITS = ("train", "test")

# name -> (builder(split, data_dir, seed, **kw) -> (images, labels, classes), hflip, kwarg names)
_REGISTRY: dict[str, tuple[Callable, bool, frozenset]] = {}


def register_dataset(name: str, *, hflip: bool, kwargs: tuple[str, ...] = ()):
    """Register ``builder(split, data_dir, seed, **kwargs) -> (uint8 images, labels, classes)``."""
    def deco(fn):
        _REGISTRY[name] = (fn, hflip, frozenset(kwargs))
        return fn
    return deco


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


@register_dataset("shapes", hflip=True, kwargs=("n_train", "n_test", "use_cache"))
def _shapes(split, data_dir, seed, n_train=None, n_test=None, use_cache=True):
    from pyeff.data.shapes import SHAPES_CLASSES, load_shapes_split
    x, y = load_shapes_split(split, seed, n_train if split == "train" else n_test, use_cache=use_cache)
    return x, y, SHAPES_CLASSES


@register_dataset("digits", hflip=False)
def _digits(split, data_dir, seed):
    from pyeff.data.digits import DIGITS_CLASSES, load_digits_split
    x, y = load_digits_split(split, seed)
    return x, y, DIGITS_CLASSES


@register_dataset("cifar10", hflip=True)
def _cifar10(split, data_dir, seed):
    from pyeff.data.cifar import load_cifar_split
    return load_cifar_split("cifar10", split, data_dir)


@register_dataset("cifar100", hflip=True)
def _cifar100(split, data_dir, seed):
    from pyeff.data.cifar import load_cifar_split
    return load_cifar_split("cifar100", split, data_dir)


_STATS: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}
_STATS_LOCK = threading.Lock()


def load_dataset(name: str, split: str = "train", *, data_dir=None, seed: int = 0, image_size: int | None = None,
                 channels: int | None = None, **kwargs) -> ImageDataset:
    """Load one split of a registered dataset as an `ImageDataset`.

    Args:
        name: one of `list_datasets()`.
        split: "train" or "test".
        data_dir: where on-disk datasets (cifar10, cifar100) live; defaults to ``$PYEFF_DATA``.
        seed: selects the generated images (shapes) or the train/test split (digits).
        image_size: resize to image_size x image_size (bilinear) when given.
        channels: 1 or 3 to convert (3 -> 1 is luma, 1 -> 3 replicates).
        **kwargs: dataset-specific: ``shapes`` takes ``n_train``, ``n_test`` (defaults 20000, 5000)
            and ``use_cache``.

    mean/std are the per-channel statistics of the *train* split after resizing and channel
    conversion, also when the test split is loaded.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for dataset {name!r}; use one of {', '.join(SPLITS)}")
    builder, hflip, allowed = _REGISTRY[name]
    extra = set(kwargs) - allowed
    if extra:
        raise TypeError(f"dataset {name!r} takes no argument(s) {', '.join(sorted(extra))}"
                        + (f"; it takes {', '.join(sorted(allowed))}" if allowed else ""))

    def build(which):
        x, y, classes = builder(which, data_dir, seed, **kwargs)
        return convert_images(x, image_size, channels), y, classes

    images, labels, classes = build(split)
    key = (name, str(data_dir), seed, image_size, channels, tuple(sorted(kwargs.items())))
    with _STATS_LOCK:
        stats = _STATS.get(key)
    if stats is None:
        stats = channel_stats(images if split == "train" else build("train")[0])
        with _STATS_LOCK:
            _STATS[key] = stats
    mean, std = stats
    return ImageDataset(images, labels, classes=classes, mean=mean, std=std, name=name, hflip=hflip, split=split)
