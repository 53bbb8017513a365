"""CIFAR DenseNet-BC (Huang et al. 2017): 3 dense stages of bottleneck layers with growth rate k,
joined by compressing transitions (1x1 conv, 2x2 average pool).

Layout, shared with the CIFAR ResNets so dynamic methods can drive it: ``stem`` ->
``stage1``..``stage3`` (``stages()``; a stage is its dense layers, then the transition to the
next stage) -> ``head``. A `DenseLayer`'s ``forward`` is ``cat([x, new_features(x)])``, so a
skipped layer contributes zeros as its k new channels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeff.models.cifar_resnet import ClassifierHead, StagedNet, init_weights
from pyeff.models.registry import register_model

__all__ = ["DenseLayer", "Transition", "CifarDenseNet"]


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k channels)-BN-ReLU-conv3x3 (k channels); the output is the input with
    the k new channels appended."""

    def __init__(self, in_channels: int, growth: int, bottleneck: int = 4):
        super().__init__()
        width = bottleneck * growth
        self.in_channels, self.growth, self.width = in_channels, growth, width
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth, 3, padding=1, bias=False)

    def new_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.new_features(x)], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compress channels)-avgpool 2x2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(StagedNet):
    """DenseNet-BC for 32x32 inputs: depth = 6n + 4 (n bottleneck layers per stage)."""

    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10, in_channels: int = 3,
                 compression: float = 0.5):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"CIFAR DenseNet-BC depth must be 6n+4 (40, 100, ...), got {depth}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        n = (depth - 4) // 6
        self.depth, self.growth, self.num_classes = depth, growth, num_classes
        c = 2 * growth
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False))
        for i in range(1, 4):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < 3:
                out = int(c * compression)
                layers.append(Transition(c, out))
                c = out
            setattr(self, f"stage{i}", nn.Sequential(*layers))
        self.head = ClassifierHead(c, num_classes, preact=True)
        init_weights(self)

    def stages(self) -> list[nn.Sequential]:
        return [self.stage1, self.stage2, self.stage3]


def _make(depth: int, growth: int):
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarDenseNet:
        return CifarDenseNet(depth, growth, num_classes, in_channels, **kwargs)
    name = f"densenet{depth}"
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR DenseNet-BC-{depth}, growth rate {growth}."
    return register_model(build)


densenet40 = _make(40, 12)
densenet100 = _make(100, 12)
