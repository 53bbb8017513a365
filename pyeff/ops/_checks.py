"""Input checks shared by the ops: each names what is wrong and what is expected."""
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, min_dim=0, dim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pyeff.ops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"pyeff.ops.{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {allowed}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"pyeff.ops.{op}: {name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"pyeff.ops.{op}: {name} needs at least {min_dim} dimensions, got shape {tuple(t.shape)}")


def check_bits(op: str, name: str, bits, lo: int = 1, hi: int = 16) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"pyeff.ops.{op}: {name} must be an integer number of bits in [{lo}, {hi}], got {bits!r}")
    if not lo <= int(bits) <= hi:
        raise ValueError(f"pyeff.ops.{op}: {name}={bits} is out of range; expected an integer in [{lo}, {hi}]")
    return int(bits)


def check_axis(op: str, axis, ndim: int):
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"pyeff.ops.{op}: axis must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"pyeff.ops.{op}: axis={axis} is out of range for a tensor with {ndim} dimensions")
    return int(axis) % ndim


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"pyeff.ops.{op}: all tensors must be on one device, got {listed}")
