"""scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images, 10 classes."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["load_digits_split", "DIGITS_CLASSES"]

DIGITS_CLASSES = [str(i) for i in range(10)]
TEST_FRACTION = 0.2


def load_digits_split(split: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 1, 8, 8] (0..16 scaled to 0..255) and int64 labels of one split.

    The split is a stratified 80/20 split drawn from ``seed`` (sklearn's ``train_test_split``),
    so it is the same for the same seed on every machine.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION,
                                           random_state=seed, stratify=labels)
    idx = np.sort(idx_train if split == "train" else idx_test)
    x = torch.from_numpy(np.ascontiguousarray(images[idx][:, None]))
    y = torch.from_numpy(labels[idx])
    return x, y
