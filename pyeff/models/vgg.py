"""VGG with BatchNorm for 32x32 inputs, as in Network Slimming and Early-Bird tickets.

cfg "D" (VGG-16) without its last max-pool: 13 conv-BN-ReLU layers leave a 2x2 map, a global average
pool and one linear layer classify. ``cfg`` may be passed explicitly to build a channel-pruned net, or ``width`` to scale every layer.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from pyeff.models.cifar_resnet import init_weights
from pyeff.models.registry import register_model

__all__ = ["CifarVGG", "VGG_CFGS"]

VGG_CFGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512],
}


class CifarVGG(nn.Module):
    def __init__(self, cfg: Sequence[int | str] = VGG_CFGS["D"], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.cfg = list(cfg)
        layers: list[nn.Module] = []
        cin = in_channels
        for v in self.cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _vgg(letter: str, name: str):
    def build(num_classes: int = 10, in_channels: int = 3, cfg: Sequence[int | str] | None = None,
              width: float = 1.0) -> CifarVGG:
        if cfg is not None and width != 1.0:
            raise ValueError("give either cfg or width, not both")
        if not width > 0:
            raise ValueError(f"width is a multiplier of every layer's channels, > 0; got {width!r}")
        cfg = cfg if cfg is not None else [v if v == "M" else max(1, int(round(v * width))) for v in VGG_CFGS[letter]]
        return CifarVGG(cfg, num_classes, in_channels)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"VGG-{name[3:]} with BN for 32x32 inputs (cfg {letter} without its last max-pool)."
    return register_model(build)


vgg11 = _vgg("A", "vgg11")
vgg13 = _vgg("B", "vgg13")
vgg16 = _vgg("D", "vgg16")
vgg19 = _vgg("E", "vgg19")
