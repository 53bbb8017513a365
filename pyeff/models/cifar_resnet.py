"""CIFAR ResNets (He et al. 2016): depth 6n+2, widths 16/32/64, and their pre-activation form.

Layout shared by both: ``stem`` -> ``layer1``, ``layer2``, ``layer3`` (each an ``nn.Sequential`` of
blocks) -> ``head``. A block's ``forward`` is ``residual(x)`` plus ``shortcut(x)`` (then a ReLU for
`BasicBlock`), so dynamic-inference methods can run the two parts for the samples they choose:
a skipped block is ``shortcut(x)`` alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pyeff.models.registry import register_model

__all__ = ["BasicBlock", "PreActBlock", "StagedNet", "CifarResNet", "ClassifierHead", "init_weights", "RESNET_DEPTHS"]

RESNET_DEPTHS = (20, 32, 38, 44, 56, 74, 110)
WIDTHS = (16, 32, 64)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or 1x1 conv + BN), ReLU after the add."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut; no activation after the add.

    The projection shortcut (1x1 conv + BN) reads the block's raw input rather than sharing the
    residual branch's first BN-ReLU, so ``residual`` and ``shortcut`` stay independent.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class ClassifierHead(nn.Module):
    """(optional BN-ReLU for pre-activation nets) -> global average pool -> flatten -> fc."""

    def __init__(self, in_features: int, num_classes: int, preact: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_features) if preact else nn.Identity()
        self.act = nn.ReLU(inplace=True) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.act(self.norm(x))), 1))


class StagedNet(nn.Module):
    """stem -> stages() in order -> head: the layout pyeff's CIFAR networks share, which dynamic
    methods (DDI's exits and budgets) drive stage by stage. Subclasses set `stem` and `head` and
    define `stages()`."""

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in self.stages():
            x = s(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class CifarResNet(StagedNet):
    """ResNet for 32x32 inputs: 3 stages of n blocks each, depth = 6n + 2."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, preact: bool = False,
                 widths: tuple[int, int, int] = WIDTHS, zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        block = PreActBlock if preact else BasicBlock
        self.depth, self.preact, self.num_classes = depth, preact, num_classes
        if preact:
            self.stem = nn.Sequential(conv3x3(in_channels, widths[0]))
        else:
            self.stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        cin = widths[0]
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            layers = []
            for j in range(n):
                layers.append(block(cin, w, stride if j == 0 else 1))
                cin = w
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.head = ClassifierHead(cin, num_classes, preact=preact)
        init_weights(self)
        if zero_init_residual:
            for b in self.blocks():
                nn.init.zeros_((b.bn2 if isinstance(b, BasicBlock) else b.conv2).weight)

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3]

    def blocks(self) -> list[nn.Module]:
        """All residual blocks in execution order."""
        return [b for s in self.stages() for b in s]


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs, BN to identity, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _make(depth: int, preact: bool):
    def build(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
        return CifarResNet(depth, num_classes, in_channels, preact=preact, **kwargs)
    name = f"{'pre' if preact else ''}resnet{depth}"
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR {'pre-activation ' if preact else ''}ResNet-{depth} ({(depth - 2) // 6} blocks per stage)."
    return register_model(build)


for _d in RESNET_DEPTHS:
    globals()[f"resnet{_d}"] = _make(_d, False)
    globals()[f"preresnet{_d}"] = _make(_d, True)
del _d
