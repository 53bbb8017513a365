"""A timm-style model registry: ``@register_model`` and ``create_model(name, ...)``.

Names ``torchvision.<name>`` build torchvision's classification models (``weights=None``).
"""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
TORCHVISION_PREFIX = "torchvision."


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register ``fn(num_classes=..., in_channels=..., **kwargs) -> nn.Module`` under its name."""
    def deco(f):
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"model {key!r} is already registered")
        _MODELS[key] = f
        return f
    return deco(fn) if fn is not None else deco


def _torchvision_names() -> list[str]:
    try:
        import torchvision.models as tvm
    except ImportError:
        return []
    return sorted(tvm.list_models(module=tvm))


def list_models(pattern: str | None = None, *, include_torchvision: bool = False) -> list[str]:
    """Registered model names (optionally filtered by a glob pattern such as ``"resnet*"``).

    With ``include_torchvision`` the ``torchvision.*`` classification models are listed too.
    """
    names = sorted(_MODELS)
    if include_torchvision:
        names += [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    if pattern:
        names = fnmatch.filter(names, pattern)
    return names


def is_model(name: str) -> bool:
    return name in _MODELS or (name.startswith(TORCHVISION_PREFIX)
                               and name[len(TORCHVISION_PREFIX):] in _torchvision_names())


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a model by name; unknown names raise ValueError listing the known ones."""
    if name.startswith(TORCHVISION_PREFIX):
        return _create_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, in_channels, **kwargs)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())} "
                         f"(and torchvision.<name> for torchvision's classification models)")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def _create_torchvision(name: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError as exc:
        raise ImportError(f"model 'torchvision.{name}' needs torchvision: pip install torchvision "
                          f"(the version matching your torch)") from exc
    known = tvm.list_models(module=tvm)
    if name not in known:
        raise ValueError(f"unknown torchvision model {name!r}; torchvision's classification models: "
                         f"{', '.join(sorted(known))}")
    model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d taking 3 channels for one taking ``in_channels`` (same other args)."""
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.in_channels == 3:
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups if mod.groups == 1 else in_channels,
                            mod.bias is not None, mod.padding_mode)
            parent_name, _, attr = mod_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
            return
    raise ValueError(f"{type(model).__name__} has no 3-channel input convolution to adapt to {in_channels} channels")
