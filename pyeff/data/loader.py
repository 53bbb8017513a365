"""`BatchLoader`: batches straight from a dataset's uint8 tensor, augmented on the whole batch.

The order of an epoch is one permutation drawn from (seed, epoch). Sample *positions* in that
permutation are what everything else keys on:

* with ``world_size`` W, the permutation is padded by repeating its head to a multiple of W (as
  torch's ``DistributedSampler`` does) and rank r takes positions r, r+W, r+2W, ... - so rank r's
  batch t is exactly rows ``[r::W]`` of the batch t that one process with batch size B*W sees;
* the crop offset and flip of a sample are a hash of (seed, epoch, position), so they agree
  between that one process and the W ranks as well.

With ``drop_last`` only full global batches (B*W samples) are used and the equality above holds for
every batch; without it the last batch may be short and, when N is not a multiple of W, the ranks'
last batches hold up to W-1 repeated samples (the DistributedSampler padding).
Nothing here touches torch's or numpy's global RNG.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pyeff.data.base import ImageDataset

__all__ = ["BatchLoader", "augment_params"]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic): a counter-based hash."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def augment_params(seed: int, epoch: int, positions: np.ndarray, pad: int, flip: bool):
    """Crop offsets (dy, dx in [0, 2*pad]) and flip flags for sample positions of an epoch."""
    key = _splitmix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], dtype=np.uint64))
    h = _splitmix64(key ^ positions.astype(np.uint64))
    span = np.uint64(2 * pad + 1)
    dy = (h % span).astype(np.int64)
    dx = ((h >> np.uint64(16)) % span).astype(np.int64)
    fl = ((h >> np.uint64(32)) & np.uint64(1)).astype(bool) if flip else np.zeros(len(positions), bool)
    return dy, dx, fl


class BatchLoader:
    """Iterate over ``(x float32 [B, C, H, W] normalised, y int64 [B])`` batches of a dataset.

    Args:
        dataset: an `ImageDataset`.
        batch_size: per-rank batch size.
        shuffle: draw a new permutation each epoch (from seed and epoch) instead of 0..N-1.
        augment: random crop with ``crop_padding`` zero pixels of padding (default 4 for 32x32,
            H // 8 in general) and, when ``dataset.hflip``, a random horizontal flip.
        seed: seeds order and augmentation; `set_epoch` picks the epoch.
        drop_last: use only full (global) batches.
        rank, world_size: this process's shard of the data (see the module doc).
        device: where the batches are produced. The dataset's uint8 images are copied there once
            (they are small), so gathering and augmenting run on that device.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool, augment: bool, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, device="cpu",
                 crop_padding: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(dataset) == 0:
            raise ValueError("BatchLoader needs a non-empty dataset")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        h = dataset.images.shape[2]
        self.crop_padding = crop_padding if crop_padding is not None else max(1, h // 8)
        self.epoch = 0
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, gb = len(self.dataset), self.batch_size * self.world_size
        return n // gb if self.drop_last else math.ceil(n / gb)

    def _positions(self) -> np.ndarray:
        """This rank's positions in the epoch's (padded) permutation, in batch order."""
        n, w = len(self.dataset), self.world_size
        total = len(self) * self.batch_size * w if self.drop_last else math.ceil(n / w) * w
        return np.arange(self.rank, total, w)

    def _order(self) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch, 0x10AD]).permutation(n)

    def __iter__(self):
        order = self._order()
        pos = self._positions()
        idx = order[pos % len(order)]  # positions past N wrap to the head: DistributedSampler padding
        if self.augment:
            dy, dx, fl = augment_params(self.seed, self.epoch, pos, self.crop_padding, self.dataset.hflip)
        for t in range(len(self)):
            sl = slice(t * self.batch_size, (t + 1) * self.batch_size)
            i = torch.from_numpy(idx[sl]).to(self.device)
            if self.augment:
                x = self._crop_flip(i, *(torch.from_numpy(a[sl]).to(self.device) for a in (dy, dx, fl)))
            else:
                x = self._images[i]
            yield self.dataset.normalize(x), self._labels[i]

    def _crop_flip(self, i: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, fl: torch.Tensor) -> torch.Tensor:
        """Images i, zero-padded by p, cropped H x W at (dy, dx), mirrored where fl: one gather.

        Indexes the unpadded images with clamped coordinates and zeroes what falls in the padding,
        so neither the batch nor the dataset is ever copied into a padded buffer.
        """
        _, c, h, w = self._images.shape
        p = self.crop_padding
        dev = self._images.device
        ar_h = torch.arange(h, device=dev)
        ar_w = torch.arange(w, device=dev)
        rows = dy[:, None] - p + ar_h  # [B, H] rows in the unpadded image
        cols = dx[:, None] - p + torch.where(fl[:, None], w - 1 - ar_w, ar_w)  # [B, W]
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        x = self._images[i[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                         rows.clamp(0, h - 1)[:, None, :, None], cols.clamp(0, w - 1)[:, None, None, :]]
        return x.masked_fill_(~inside, 0)
