"""Triton kernels of pyeff.ops.fake_quant: per-program partial minima/maxima, then one
element-wise pass. Launched with enable_fp_fusion=False so that rounding matches the reference."""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _minmax_partial_kernel(x_ptr, part_ptr, per_channel, C, inner, splits, span,
                           BLOCK: tl.constexpr):
    split = tl.program_id(0)
    c = tl.program_id(1)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    hi = tl.full([BLOCK], float("-inf"), tl.float32)
    nan = tl.zeros([BLOCK], tl.int32)
    start = split.to(tl.int64) * span
    for off in range(0, span, BLOCK):
        j = start + off + tl.arange(0, BLOCK)
        mask = (j < per_channel) & (j < start + span)
        o = j // inner
        i = j - o * inner
        v = tl.load(x_ptr + (o * C + c) * inner + i, mask=mask, other=0.0).to(tl.float32)
        nan = nan | ((v != v) & mask).to(tl.int32)
        lo = tl.where(mask & (v < lo), v, lo)
        hi = tl.where(mask & (v > hi), v, hi)
    any_nan = tl.max(nan, axis=0)
    blo = tl.min(lo, axis=0)
    bhi = tl.max(hi, axis=0)
    blo = tl.where(any_nan > 0, float("nan"), blo)
    bhi = tl.where(any_nan > 0, float("nan"), bhi)
    tl.store(part_ptr + c * splits + split, blo)
    tl.store(part_ptr + (C + c) * splits + split, bhi)


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit(do_not_specialize=["seed"])  # a seed of 1 would otherwise become a constant
def _apply_kernel(x_ptr, y_ptr, scale_ptr, inv_ptr, zp_ptr, n, C, inner, qmin, qmax, omax, seed,
                  STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    c = (idx // inner) % C
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=mask, other=1.0)
    inv = tl.load(inv_ptr + c, mask=mask, other=1.0)
    zp = tl.load(zp_ptr + c, mask=mask, other=0.0)
    if STOCHASTIC:
        hi32 = (idx >> 32).to(tl.uint32)
        lo32 = (idx & 0xFFFFFFFF).to(tl.uint32)
        key = _fmix32(seed.to(tl.uint32) ^ (hi32 * 0x9E3779B9))
        h = _fmix32(lo32 ^ key)
        r = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    else:
        r = 0.5
    q = tl.floor(x * inv + zp + r)
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    y = (q - zp) * scale
    y = tl.minimum(tl.maximum(y, -omax), omax)  # saturate at the output dtype's largest value
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor, axis: Optional[int]):
    if axis is None:
        return 1, 1, x.numel()
    outer = 1
    for d in x.shape[:axis]:
        outer *= d
    inner = 1
    for d in x.shape[axis + 1:]:
        inner *= d
    return outer, x.shape[axis], inner


def _check(x: torch.Tensor):
    if x.dtype == torch.float64:
        raise TypeError("pyeff.kernels.fake_quant: the Triton kernels compute in float32; "
                        "use backend='native' or 'reference' for float64")


def minmax(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    _check(x)
    x = x.contiguous()
    outer, C, inner = _layout(x, axis)
    per_channel = outer * inner
    splits = max(1, min(triton.cdiv(per_channel, 8 * _BLOCK), max(1, 512 // C)))
    span = triton.cdiv(triton.cdiv(per_channel, splits), _BLOCK) * _BLOCK
    splits = triton.cdiv(per_channel, span)
    part = torch.empty((2, C, splits), device=x.device, dtype=torch.float32)
    _minmax_partial_kernel[(splits, C)](x, part, per_channel, C, inner, splits, span, BLOCK=_BLOCK)
    # NaN-propagating fold of the few partials
    has_nan = torch.isnan(part).any(dim=2)
    lo, hi = part[0].amin(dim=1), part[1].amax(dim=1)
    nan = torch.full_like(lo, float("nan"))
    return torch.stack([torch.where(has_nan[0], nan, lo), torch.where(has_nan[1], nan, hi)])


def apply(x, scale, inv_scale, zero_point, qmin: int, qmax: int, axis: Optional[int],
          seed: Optional[int]) -> torch.Tensor:
    _check(x)
    x = x.contiguous()
    outer, C, inner = _layout(x, axis)
    # Triton's interpreter (TRITON_INTERPRET=1) truncates float32 -> bfloat16 instead of rounding to
    # nearest even (found by tests/test_fuzz_fake_quant.py): there the kernel writes float32 and torch
    # rounds. Compiled Triton rounds to nearest even itself.
    via32 = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"
    y = torch.empty_like(x, dtype=torch.float32 if via32 else x.dtype)
    n = x.numel()
    f32 = dict(device=x.device, dtype=torch.float32)
    scale, inv_scale, zero_point = (t.to(**f32).contiguous() for t in (scale, inv_scale, zero_point))
    grid = (triton.cdiv(n, _BLOCK),)
    _apply_kernel[grid](x, y, scale, inv_scale, zero_point, n, C, inner, float(qmin), float(qmax),
                        torch.finfo(x.dtype).max,
                        0 if seed is None else int(seed) & 0xFFFFFFFF, STOCHASTIC=seed is not None,
                        BLOCK=_BLOCK, enable_fp_fusion=False)
    return y.to(x.dtype) if via32 else y
