"""`ImageDataset`: a whole image-classification split held in memory as uint8 tensors."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ImageDataset", "channel_stats", "convert_images"]


class ImageDataset:
    """One split of an image-classification dataset, held in memory.

    Attributes:
        images: uint8 tensor [N, C, H, W], contiguous.
        labels: int64 tensor [N], values in ``[0, num_classes)``.
        num_classes, classes: the number and names of the classes.
        mean, std: per-channel statistics in [0, 1] units, computed on the *train* split (also
            for the test split), used by `normalize` and `__getitem__`.
        name: the dataset's registered name.
        hflip: whether a horizontal flip keeps the label (true for objects, false for digits).
        split: "train" or "test".
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        name: str,
        hflip: bool,
        split: str = "train",
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {tuple(labels.shape)}")
        c = images.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
        self.images = images.contiguous()
        self.labels = labels.contiguous()
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        self.hflip = bool(hflip)
        self.split = split
        self._scale_shift: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- shape ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={n}, shape=[{c}, {h}, {w}], "
                f"num_classes={self.num_classes}, hflip={self.hflip})")

    # -- access -----------------------------------------------------------------------------
    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] -> float32 ``(x / 255 - mean) / std``, on the batch's device."""
        if batch.dtype != torch.uint8:
            raise TypeError(f"normalize expects a uint8 batch, got {batch.dtype}")
        scale, shift = self._affine(batch.device)
        return torch.addcmul(shift, batch.to(torch.float32), scale)

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # (x / 255 - m) / s  ==  x * (1 / (255 s)) + (-m / s): one fused multiply-add per element.
        if device not in self._scale_shift:
            m = torch.tensor(self.mean, dtype=torch.float64)
            s = torch.tensor(self.std, dtype=torch.float64)
            scale = (1.0 / (255.0 * s)).to(torch.float32).view(-1, 1, 1).to(device)
            shift = (-m / s).to(torch.float32).view(-1, 1, 1).to(device)
            self._scale_shift[device] = (scale, shift)
        return self._scale_shift[device]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.images[i]), int(self.labels[i])

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """A random subset of ``n`` samples, as class-balanced as the split allows.

        Classes are visited round-robin in a seeded random order, so every class gets
        ``n // num_classes`` or one more sample (fewer only if it has fewer). The kept samples stay
        in their original order; mean/std are kept (they belong to the train split).
        """
        if not 0 <= n <= len(self):
            raise ValueError(f"subset size must be in [0, {len(self)}], got {n}")
        rng = np.random.default_rng([seed, 0x5B5E7])
        perm = rng.permutation(len(self))
        labels = self.labels.numpy()[perm]
        # rank of each permuted sample among the permuted samples of its class
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=self.num_classes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.empty(len(perm), dtype=np.int64)
        rank[order] = np.arange(len(perm)) - np.repeat(starts, counts)
        class_order = rng.permutation(self.num_classes)
        key = rank * self.num_classes + np.argsort(class_order)[labels]
        keep = np.sort(perm[np.argsort(key, kind="stable")[:n]])
        return self.take(torch.from_numpy(keep))

    def take(self, indices) -> "ImageDataset":
        """The samples at `indices` (a sequence, range or int64 tensor), in that order; mean/std are kept."""
        idx = torch.as_tensor(list(indices) if isinstance(indices, range) else indices, dtype=torch.int64)
        if idx.dim() != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
        if len(idx) and not (0 <= int(idx.min()) and int(idx.max()) < len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)})")
        return ImageDataset(self.images[idx], self.labels[idx], classes=self.classes, mean=self.mean,
                            std=self.std, name=self.name, hflip=self.hflip, split=self.split)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (in [0, 1] units) of a uint8 [N, C, H, W] tensor.

    Uses a 256-bin histogram per channel, so it is exact, fast and needs no float copy.
    """
    vals = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * vals).sum() / total
        var = (hist * (vals - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-3))  # a constant channel must not divide by zero
    return tuple(means), tuple(stds)


def convert_images(images: torch.Tensor, image_size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """Resize (bilinear) and/or change the channel count (1 -> 3 replicates, 3 -> 1 is luma)."""
    if channels is not None and channels != images.shape[1]:
        if channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif channels == 1 and images.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.to(torch.float32) * w).sum(1, keepdim=True).round_().clamp_(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {images.shape[1]} channels to {channels} (supported: 1 <-> 3)")
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        out = []
        for chunk in images.split(4096):  # bounded float memory
            x = F.interpolate(chunk.to(torch.float32), size=(image_size, image_size), mode="bilinear",
                              align_corners=False, antialias=image_size < images.shape[2])
            out.append(x.round_().clamp_(0, 255).to(torch.uint8))
        images = torch.cat(out)
    return images.contiguous()
