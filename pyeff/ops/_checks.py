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


def check_backend(op: str, backend) -> None:
    """`backend` is None or a name; the name itself is checked where it is resolved (_backend)."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"pyeff.ops.{op}: backend must be a string (auto, native, triton, reference) or None, "
                        f"got {type(backend).__name__}")


def check_conv_sizes(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """A convolution needs at least one input channel, one output channel and a non-empty kernel
    (4-D x and weight already checked)."""
    if x.shape[1] == 0:
        raise ValueError(f"pyeff.ops.{op}: x has 0 channels (shape {tuple(x.shape)}); a convolution needs at least one")
    if weight.shape[0] == 0:
        raise ValueError(f"pyeff.ops.{op}: weight has 0 output channels (shape {tuple(weight.shape)})")
    if weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"pyeff.ops.{op}: weight has an empty kernel (shape {tuple(weight.shape)})")


def check_no_nan(op: str, name: str, t: torch.Tensor) -> None:
    """Raises when `t` holds a NaN. One reduction (a NaN makes the sum NaN); only a NaN sum (NaN,
    or +inf and -inf together) pays the exact pass. CPU only: on a GPU the check would synchronise."""
    if t.device.type != "cpu" or t.numel() == 0:
        return
    if bool(torch.isnan(t.sum())) and bool(torch.isnan(t).any()):
        raise ValueError(f"pyeff.ops.{op}: {name} contains NaN; quantisation needs finite values")
