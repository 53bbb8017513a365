"""pyeff.ops.fake_quant: uniform quantise-dequantise with a straight-through gradient.

    q   = clamp(floor(x * inv_scale + zero_point + r), qmin, qmax)
    out = (q - zero_point) * scale

with r = 1/2 (round half up) or, with stochastic rounding, r ~ U[0, 1) drawn from a counter-based
hash of (seed, element index) that every backend computes identically.

Schemes (per tensor, or per channel along `axis`):
  "asym": min-max over a range widened to hold 0; qmin = 0, qmax = 2^bits - 1, integer zero point.
  "sym":  max-abs; qmin = -(2^(bits-1) - 1), qmax = 2^(bits-1) - 1, zero point 0 (bits >= 2).

All arithmetic runs in float32 (float64 for float64 input) without fused multiply-adds, so the
compiled, CUDA and Triton kernels agree with `fake_quant_reference` bit for bit.
"""
import numbers
from typing import Optional

import torch
from torch import Tensor

from pyeff import _extension
from pyeff.ops import _backend
from pyeff.ops._checks import check_axis, check_backend, check_bits, check_tensor

SCHEMES = ("asym", "sym")
# fastest first, as measured by bench/fake_quant.py (see bench/results/)
PREFERENCE = {"cpu": ("native",), "cuda": ("native", "triton")}

_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# the reference: plain PyTorch, the op's specification


def quant_params(minmax: Tensor, bits: int, scheme: str):
    """(scale, inv_scale, zero_point, qmin, qmax) from a [2, C] tensor of minima and maxima.
    Shared by every backend so that they all quantise with identical parameters. Divisions are
    tensor by tensor: CUDA divides by a Python scalar as a multiplication by its reciprocal,
    which differs from the CPU in the last bit."""
    lo, hi = minmax[0], minmax[1]
    tiny = torch.finfo(minmax.dtype).tiny
    if scheme == "asym":
        qmin, qmax = 0, (1 << bits) - 1
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        q = torch.full_like(lo, qmax)
        span = hi - lo
        # a range wider than the dtype's largest value (e.g. float32 [-3e38, 3e38]) overflows to
        # inf: divide each end first there (elsewhere the result is unchanged, bit for bit), and
        # at 1 bit, where even that overflows, take the largest finite scale
        big = torch.finfo(minmax.dtype).max
        scale = torch.where(torch.isinf(span), (hi / q - lo / q).clamp(max=big), span / q)
    else:
        qmax = (1 << (bits - 1)) - 1
        qmin = -qmax
        scale = torch.maximum(-lo, hi) / torch.full_like(lo, qmax)
    # an all-zero tensor has no range: any positive scale reproduces it exactly
    scale = torch.where(scale == 0, torch.ones_like(scale), scale.clamp(min=tiny))
    inv_scale = torch.ones_like(scale) / scale
    if scheme == "asym":
        zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax)
    else:
        zero_point = torch.zeros_like(scale)
    return scale, inv_scale, zero_point, qmin, qmax


def _mul32(a: Tensor, c: int) -> Tensor:
    """(a * c) mod 2^32 for int64 a in [0, 2^32) without int64 overflow."""
    return (a * (c & 0xFFFF) + (((a * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def rounding_noise(seed: int, index: Tensor) -> Tensor:
    """U[0, 1) float32 values from (seed, int64 element index), as every kernel computes them."""
    key = _fmix32((seed & _M32) ^ _mul32(index >> 32, 0x9E3779B9))
    h = _fmix32((index & _M32) ^ key)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


def minmax_reference(x: Tensor, axis: Optional[int]) -> Tensor:
    xc = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if axis is None:
        return torch.stack([xc.min(), xc.max()]).view(2, 1)
    moved = xc.movedim(axis, 0).reshape(xc.shape[axis], -1)
    return torch.stack([moved.amin(dim=1), moved.amax(dim=1)])


def apply_reference(x, scale, inv_scale, zero_point, qmin, qmax, axis, seed) -> Tensor:
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    scale, inv_scale, zero_point = (t.to(x.device, compute).view(shape) for t in (scale, inv_scale, zero_point))
    if seed is None:
        r = 0.5
    else:
        index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
        r = rounding_noise(seed, index).to(compute)
    q = torch.floor(xc * inv_scale + zero_point + r).clamp(qmin, qmax)
    # an outer level can lie past the dtype's largest finite value (the grid is rounded to an
    # integer zero point): it saturates there instead of becoming inf
    omax = output_max(x.dtype)
    return ((q - zero_point) * scale).clamp(-omax, omax).to(x.dtype)


def output_max(dtype: torch.dtype) -> float:
    """The largest finite value of `dtype`: every backend saturates dequantised values to it."""
    return torch.finfo(dtype).max


def fake_quant_reference(x: Tensor, bits: int, scheme: str = "asym", axis: Optional[int] = None,
                         seed: Optional[int] = None) -> Tensor:
    """The specification of fake_quant in plain PyTorch (any device, float64-capable)."""
    mm = minmax_reference(x, axis)
    _check_finite(mm)
    scale, inv, zp, qmin, qmax = quant_params(mm, bits, scheme)
    return apply_reference(x, scale, inv, zp, qmin, qmax, axis, seed)


# --------------------------------------------------------------------------------------------
# backends


def _check_finite(minmax: Tensor) -> None:
    # only where it costs no device synchronisation; on a GPU, NaN input propagates into the output
    if minmax.device.type == "cpu" and not bool(torch.isfinite(minmax).all()):
        raise ValueError("pyeff.ops.fake_quant: x contains NaN or infinity; quantisation needs finite values")


def output_layout(x: Tensor, axis: Optional[int], seed: Optional[int]) -> torch.memory_format:
    """The memory format of fake_quant's output: the CPU kernel keeps a channels_last input's layout
    for one deterministic per-tensor quantiser (element order does not matter there); otherwise
    the output is contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and x.device.type == "cpu" and axis is None and seed is None and not x.is_contiguous() \
            and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def _run(x: Tensor, bits: int, scheme: str, axis: Optional[int], seed: Optional[int], backend: str) -> Tensor:
    if backend == "reference":  # elementwise ops keep any layout: impose the op's
        return fake_quant_reference(x, bits, scheme, axis, seed).contiguous(memory_format=output_layout(x, axis, seed))
    if backend == "native":  # the kernel follows output_layout itself
        minmax, apply = torch.ops.pyeff.fake_quant_minmax, torch.ops.pyeff.fake_quant_apply
    else:  # triton
        from pyeff.kernels import fake_quant as tk

        minmax, apply = tk.minmax, tk.apply
    mm = minmax(x, axis)
    _check_finite(mm)
    scale, inv, zp, qmin, qmax = quant_params(mm, bits, scheme)
    out = apply(x, scale, inv, zp, qmin, qmax, axis, seed)
    return out if backend == "native" else out.contiguous(memory_format=output_layout(x, axis, seed))


@torch.library.custom_op("pyeff::fake_quant", mutates_args=())
def _fake_quant_op(x: Tensor, bits: int, scheme: str, axis: Optional[int], seed: Optional[int],
                   backend: str) -> Tensor:
    return _run(x, bits, scheme, axis, seed, _backend.resolve("fake_quant", x.device, backend, PREFERENCE))


@_fake_quant_op.register_fake
def _(x, bits, scheme, axis, seed, backend):
    return torch.empty_like(x, memory_format=output_layout(x, axis, seed))


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    # straight-through estimator: the rounding is treated as the identity
    return grad, None, None, None, None, None


_fake_quant_op.register_autograd(_backward, setup_context=_setup_context)

if _extension.loaded():
    @torch.library.register_fake("pyeff::fake_quant_minmax")
    def _(x, axis):
        channels = 1 if axis is None else x.shape[axis]
        return x.new_empty((2, channels), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    @torch.library.register_fake("pyeff::fake_quant_apply")
    def _(x, scale, inv_scale, zero_point, qmin, qmax, axis, seed):
        return torch.empty_like(x, memory_format=output_layout(x, axis, seed))


# --------------------------------------------------------------------------------------------
# public API


def fake_quant(x: Tensor, bits: int, *, scheme: str = "asym", axis: Optional[int] = None,
               stochastic: bool = False, generator: Optional[torch.Generator] = None,
               seed: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """Quantise `x` uniformly to `bits` bits and dequantise it, with a straight-through gradient.

    Args:
        x: floating tensor (float16, bfloat16, float32, float64) on any device.
        bits: 1-16 (2-16 for scheme="sym").
        scheme: "asym" (min-max, integer zero point) or "sym" (max-abs, zero point 0).
        axis: None for one scale per tensor, or the channel axis for one scale per channel.
        stochastic: round up with probability equal to the fractional part instead of to nearest.
        generator: draws the seed of stochastic rounding (default: the global generator).
        seed: the seed of stochastic rounding itself (0 <= seed < 2**32); overrides `generator`.
        backend: "auto", "native", "triton" or "reference" (see pyeff.ops._backend).

    Example:
        >>> x = torch.randn(4, 8)
        >>> y = pyeff.ops.fake_quant(x, 4, axis=0)
        >>> len(torch.unique(y[0])) <= 16
        True
    """
    check_tensor("fake_quant", "x", x)
    bits = check_bits("fake_quant", "bits", bits)
    if scheme not in SCHEMES:
        raise ValueError(f"pyeff.ops.fake_quant: scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "sym" and bits < 2:
        raise ValueError("pyeff.ops.fake_quant: scheme='sym' needs bits >= 2 (1 bit leaves only the level 0); "
                         "use scheme='asym' for 1-bit quantisation")
    axis = check_axis("fake_quant", axis, x.dim())
    if axis is not None and x.dim() == 0:
        raise ValueError("pyeff.ops.fake_quant: a 0-d tensor has no channel axis")
    check_backend("fake_quant", backend)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"pyeff.ops.fake_quant: generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"pyeff.ops.fake_quant: seed must be an int in [0, 2**32) or None, got {seed!r}")
    if x.numel() == 0:
        return x.clone()
    if stochastic:
        if seed is None:
            gen_device = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 1 << 32, (1,), generator=generator, device=gen_device).item())
        elif not 0 <= int(seed) < (1 << 32):
            raise ValueError(f"pyeff.ops.fake_quant: seed must be in [0, 2**32), got {seed}")
        seed = int(seed)
    else:
        seed = None
    return _fake_quant_op(x, bits, scheme, axis, seed, backend or "auto")
