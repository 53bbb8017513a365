"""pyeff.ops.masked_conv2d: a 2-D convolution that computes, per sample, only the active output
channels from the active input channels (channel gating, DDI/DFS-style channel skipping).

    y[n, k] = conv2d(x[n] restricted to the active input channels of n, weight[k]) + bias[k]
              if output channel k is active for sample n, else exactly 0

The reference is the dense convolution of the masked input, masked again at the output:
`where(out_mask, conv2d(where(in_mask, x, 0), weight, bias), 0)`. Inactive input channels are never
read by the fast kernels (so a NaN there does not reach the output) and inactive output channels cost
nothing but writing their zeros. Gradients flow to x, weight and bias through the active parts only
(gradients for inactive inputs and for weights of pairs no sample uses are exact zeros); the masks
get none.

How the CPU backend ("native") executes, chosen per call from the masks (timed with
bench/masked_conv.py and scratch scripts on a shared 2-core AVX-512 Xeon):
  * every channel active: the dense convolution (oneDNN), nothing to skip.
  * the active fraction of (sample, out, in) triples above DENSE_ABOVE: the dense convolution of the
    masked input, masked at the output (at full density the direct kernel runs at 0.4-1x oneDNN's
    speed, depending on the shape, so skipping pays only below that).
  * per-sample masks, float32, stride 1, groups 1: pyeff's direct AVX-512 kernel
    (csrc/cpu/masked_conv.cpp). Its unit of work is one (sample, output channel) plane, so its cost is
    proportional to the active (sample, out, in) triples. Rejected after measuring: one oneDNN call
    per sample on its channel slice (1.1-3.2x *slower* than the dense conv at 50% density, 1 thread:
    per-call overhead and oneDNN's slow NCHW path at 16 channels), and per-sample gathered weights
    with torch.bmm over F.unfold columns (5-14x slower than the dense conv).
  * one mask row shared by the batch: the same direct kernel while fewer than SHARED_ONEDNN input or
    output channels are active; above, one oneDNN conv on the gathered slice scattered into zeros
    (oneDNN wins at 64 channels / 8 px, the direct kernel at 16-32 channels).
  * anything else (stride > 1, groups > 1, float64, CPUs without AVX-512): the dense convolution of
    the masked input, masked at the output; pyeff's portable C++ loop nest, which skips the same
    work, was measured 13-70x slower than oneDNN there (stride 2, 50% density).
`cpu_strategy(...)` reports the choice ("dense", "masked_dense", "slice" or "kernel"); the
environment variable PYEFF_MASKED_CONV_STRATEGY=masked_dense|kernel forces one where some channel
is inactive (on any device; for tests and benchmarks).
The weight gradient uses pyeff's kernel only where it beats oneDNN's dense one (_wgrad_kernel_below);
the input gradient of a stride-1 conv is the same masked op with the masks swapped.
CUDA ("native": csrc/cuda/masked_conv.cu) and Triton (kernels/masked_conv.py) run a direct kernel
that skips inactive planes and input channels.
"""
import functools
import numbers
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyeff import _extension
from pyeff.ops import _backend
from pyeff.ops._checks import check_backend, check_conv_sizes, check_tensor
from pyeff.ops._shapes import conv_out_hw, effective_dilation

# fastest first (bench/masked_conv.py); on CUDA the Triton kernel has not been timed yet
PREFERENCE = {"cpu": ("native",), "cuda": ("native", "triton")}
# above this fraction of active (sample, out, in) triples the dense conv + masks is faster
DENSE_ABOVE = 0.8
# one mask row shared by the batch with at least this many active inputs and outputs: oneDNN on
# the gathered slice beats the direct kernel (measured at 64 channels, 8 px; not at 16-32 channels)
SHARED_ONEDNN = 32
# forces a strategy where some channel is inactive: auto, masked_dense or kernel
STRATEGY_ENV = "PYEFF_MASKED_CONV_STRATEGY"
FORCEABLE = ("auto", "masked_dense", "kernel")


# --------------------------------------------------------------------------------------------
# the reference: plain PyTorch, the op's specification


def _col(mask: Tensor) -> Tensor:
    return mask[:, :, None, None]


def _risky_low_precision(x: Tensor, weight: Tensor, stride, padding, dilation) -> bool:
    """True where oneDNN's float16 / bfloat16 CPU convolution (F.conv2d) segfaults (found by
    tests/test_fuzz_masked_conv.py, some only after other convolutions ran): an axis with a single
    output, or a padding as wide as the dilated kernel or as the input."""
    if x.device.type != "cpu" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    out = conv_out_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    for a in range(2):
        extent = dilation[a] * (weight.shape[2 + a] - 1) + 1
        if out[a] == 1 or padding[a] >= extent or padding[a] >= x.shape[2 + a]:
            return True
    return False


def _conv2d(x: Tensor, weight: Tensor, bias, stride, padding, dilation, groups: int) -> Tensor:
    """F.conv2d, with dilation dropped on 1-tap axes and, where oneDNN's half-precision CPU kernel
    crashes, computed in float32 and rounded back."""
    stride, padding = tuple(_pair_any(stride)), tuple(_pair_any(padding))
    dilation = effective_dilation(weight.shape[2:], _pair_any(dilation))
    if _risky_low_precision(x, weight, stride, padding, dilation):
        return F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride, padding, dilation,
                        groups).to(x.dtype)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _pair_any(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def masked_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_mask: Tensor,
                            out_mask: Tensor, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """The specification of masked_conv2d in plain PyTorch (any device, float64-capable). Masks are
    bool [N, C] / [N, K] or one row [1, C] / [1, K] shared by the batch."""
    xm = torch.where(_col(in_mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = _conv2d(xm, weight, bias, stride, padding, dilation, groups)
    return torch.where(_col(out_mask), y, torch.zeros((), dtype=y.dtype, device=y.device))


# --------------------------------------------------------------------------------------------
# strategies


def _pair(v, name: str, lo: int):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        v = (int(v), int(v))
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"pyeff.ops.masked_conv2d: {name} must be an int or a pair of ints, got {v!r}")
    if min(v) < lo:
        raise ValueError(f"pyeff.ops.masked_conv2d: {name} must be >= {lo}, got {tuple(v)}")
    if max(v) > 1 << 30:  # as quant_conv2d: larger strides break oneDNN (2**31 - 1 fails)
        raise ValueError(f"pyeff.ops.masked_conv2d: {name} must be <= 2**30, got {tuple(v)}")
    return [int(v[0]), int(v[1])]


def _rows(mask: Tensor, n: int) -> Tensor:
    return mask.expand(n, mask.shape[1]).contiguous()


def _active_fraction(in_mask: Tensor, out_mask: Tensor, n: int) -> float:
    """Mean over samples of (active outputs x active inputs) / (K x C): the work that remains."""
    ci = in_mask.sum(1, dtype=torch.float64)
    ko = out_mask.sum(1, dtype=torch.float64)
    per = ci * ko if in_mask.shape[0] == out_mask.shape[0] else ci.mean() * ko.mean()
    return float(per.mean()) / (in_mask.shape[1] * out_mask.shape[1])


def _subset_conv(x, weight, bias, in_row, out_row, stride, padding, dilation) -> Tensor:
    """One mask row for the whole batch: one dense oneDNN conv on the active slice, scattered into
    zeros (groups == 1)."""
    ci, ko = in_row.nonzero().squeeze(1), out_row.nonzero().squeeze(1)
    full_in = ci.numel() == x.shape[1]
    xs = x if full_in else x.index_select(1, ci)
    ws = weight.index_select(0, ko)
    ws = ws if full_in else ws.index_select(1, ci)
    ys = _conv2d(xs, ws.contiguous(), None if bias is None else bias.index_select(0, ko), stride, padding, dilation, 1)
    y = ys.new_zeros((x.shape[0], weight.shape[0]) + ys.shape[2:])
    return y.index_copy_(1, ko, ys)


def _dense_masked(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups, in_all: bool,
                  out_all: bool) -> Tensor:
    """The reference's arithmetic with fewer passes: no input copy when every input is active, and
    the inactive outputs zeroed in place. `in_all` / `out_all`: whether every channel is active."""
    xm = x if in_all else torch.where(_col(in_mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = _conv2d(xm, weight, bias, stride, padding, dilation, groups)
    if not out_all:
        # a multiply is ~7x faster than a broadcast masked_fill_ here (measured, 1M floats); it leaves
        # NaN where a non-finite value met an inactive output, so those (rare) calls are redone exactly
        y.mul_(_col(out_mask))
        if not bool(torch.isfinite(y.sum())):  # one reduction; isfinite(y).all() costs four passes
            y.masked_fill_(~_col(out_mask), 0)
    return y


@functools.lru_cache(maxsize=None)
def _cpu_has_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def _direct_kernel_applies(x: Tensor, stride, groups: int) -> bool:
    """Whether pyeff's AVX-512 direct kernel (rather than its portable loop nest) takes the call."""
    return x.dtype == torch.float32 and list(stride) == [1, 1] and groups == 1 and _cpu_has_avx512()


def _forced() -> str:
    forced = os.environ.get(STRATEGY_ENV, "auto").lower()
    if forced not in FORCEABLE:
        raise ValueError(f"pyeff.ops.masked_conv2d: {STRATEGY_ENV} must be one of {', '.join(FORCEABLE)}, "
                         f"got {forced!r}")
    return forced


def _strategy(x, in_mask, out_mask, stride, groups, in_all: bool, out_all: bool) -> str:
    """How the native backend runs a call (the module docstring gives the measurements):
    "dense" (every channel active), "masked_dense" (dense conv of the masked input, masked output),
    "slice" (one oneDNN conv on the channels a shared mask row keeps) or "kernel" (pyeff's kernel)."""
    if in_all and out_all:
        return "dense"
    forced = _forced()
    if forced != "auto":
        return forced
    if x.device.type != "cpu":
        return "kernel"
    # outside the AVX-512 kernel (strides, groups, float64/half, no AVX-512) the portable loop nest
    # was measured 13-70x slower than oneDNN's dense conv at 50% density (stride 2, 16->32 and
    # 32->64 channels, batch 128)
    if _active_fraction(in_mask, out_mask, x.shape[0]) > DENSE_ABOVE or not _direct_kernel_applies(x, stride, groups):
        return "masked_dense"
    if (in_mask.shape[0] == 1 and out_mask.shape[0] == 1 and groups == 1
            and min(int(in_mask.sum()), int(out_mask.sum())) >= SHARED_ONEDNN):
        return "slice"
    return "kernel"


def _native(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups) -> Tensor:
    n = x.shape[0]
    in_all, out_all = bool(in_mask.all()), bool(out_mask.all())
    strategy = _strategy(x, in_mask, out_mask, stride, groups, in_all, out_all)
    if strategy == "dense":
        return _conv2d(x, weight, bias, stride, padding, dilation, groups)
    if strategy == "masked_dense":
        return _dense_masked(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups, in_all, out_all)
    if strategy == "slice":
        return _subset_conv(x, weight, bias, in_mask[0], out_mask[0], stride, padding, dilation)
    return torch.ops.pyeff.masked_conv2d_fwd(x, weight, bias, _rows(in_mask, n), _rows(out_mask, n),
                                            stride, padding, dilation, groups)


def _run(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups, backend) -> Tensor:
    if backend == "reference":
        return masked_conv2d_reference(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups)
    if backend == "native":
        if not hasattr(torch.ops.pyeff, "masked_conv2d_fwd"):
            raise RuntimeError("pyeff.ops.masked_conv2d: the compiled extension pyeff._C predates masked_conv2d; "
                               "rebuild it (pip install --no-build-isolation -e .) or pass backend='reference'")
        return _native(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups)
    from pyeff.kernels import masked_conv as tk

    n = x.shape[0]
    return tk.masked_conv2d(x, weight, bias, _rows(in_mask, n), _rows(out_mask, n), stride, padding,
                            dilation, groups)


@torch.library.custom_op("pyeff::masked_conv2d", mutates_args=())
def _masked_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_mask: Tensor, out_mask: Tensor,
                      stride: list[int], padding: list[int], dilation: list[int], groups: int,
                      backend: str) -> Tensor:
    y = _run(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups,
             _backend.resolve("masked_conv2d", x.device, backend, PREFERENCE))
    return y.contiguous()  # oneDNN keeps a channels_last input's layout; the op's contract is NCHW


@_masked_conv2d_op.register_fake
def _(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups, backend):
    oh, ow = conv_out_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], oh, ow))


# --------------------------------------------------------------------------------------------
# autograd: gradients of the active parts only


def _setup_context(ctx, inputs, output):
    x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups, backend = inputs
    ctx.save_for_backward(x, weight, in_mask, out_mask)
    ctx.conf = (stride, padding, dilation, groups, backend, bias is not None)


def _input_grad(go, x, weight, in_mask, out_mask, stride, padding, dilation, groups, backend):
    kh, kw = weight.shape[2:]
    tpad = [dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1]]
    if stride == [1, 1] and groups == 1 and min(tpad) >= 0:
        # the input gradient of a stride-1 conv is a conv of grad_out with the flipped, transposed
        # kernel: the same masked op, with the roles of the masks swapped
        wt = weight.flip(2, 3).transpose(0, 1).contiguous()
        return _masked_conv2d_op(go, wt, None, out_mask, in_mask, [1, 1], tpad, dilation, 1, backend)
    gx = torch.nn.grad.conv2d_input(x.shape, weight, go, stride, padding, dilation, groups)
    return torch.where(_col(in_mask), gx, torch.zeros((), dtype=gx.dtype, device=gx.device))


def _wgrad_kernel_below(x, go, stride, groups) -> float:
    """The active fraction below which pyeff's weight-gradient kernel beats oneDNN's dense one.
    Measured (bench/masked_conv.py, 50% outputs active): 3x faster at 32x32 outputs, 1.2x at 16x16,
    2.5x slower at 8x8, where its per-(sample, channel pair) overhead dominates; the portable loop
    nest (no AVX-512, float64, strides, groups) is never faster than oneDNN."""
    if not _direct_kernel_applies(x, stride, groups):
        return -1.0
    plane = go.shape[2] * go.shape[3]
    return 0.9 if plane >= 1024 else 0.6 if plane >= 256 else -1.0


def _weight_grad(go, x, weight, in_mask, out_mask, stride, padding, dilation, groups, backend):
    chosen = _backend.resolve("masked_conv2d", x.device, backend, PREFERENCE)
    if chosen == "native" and x.device.type == "cpu":
        n = x.shape[0]
        if _active_fraction(in_mask, out_mask, n) <= _wgrad_kernel_below(x, go, stride, groups):
            return torch.ops.pyeff.masked_conv2d_weight_grad(
                go, x, _rows(in_mask, n), _rows(out_mask, n), list(weight.shape[2:]), stride, padding,
                dilation, groups)
    xm = torch.where(_col(in_mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.nn.grad.conv2d_weight(xm, weight.shape, go, stride, padding, dilation, groups)


def _backward(ctx, grad):
    x, weight, in_mask, out_mask = ctx.saved_tensors
    stride, padding, dilation, groups, backend, has_bias = ctx.conf
    go = torch.where(_col(out_mask), grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).contiguous()
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = _input_grad(go, x, weight, in_mask, out_mask, stride, padding, dilation, groups, backend)
    if ctx.needs_input_grad[1]:
        gw = _weight_grad(go, x, weight, in_mask, out_mask, stride, padding, dilation, groups, backend)
    if has_bias and ctx.needs_input_grad[2]:
        gb = go.sum((0, 2, 3))
    return gx, gw, gb, None, None, None, None, None, None, None


_masked_conv2d_op.register_autograd(_backward, setup_context=_setup_context)

if _extension.loaded() and hasattr(torch.ops.pyeff, "masked_conv2d_fwd"):
    @torch.library.register_fake("pyeff::masked_conv2d_fwd")
    def _(x, weight, bias, in_mask, out_mask, stride, padding, dilation, groups):
        oh, ow = conv_out_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
        return x.new_empty((x.shape[0], weight.shape[0], oh, ow))

    @torch.library.register_fake("pyeff::masked_conv2d_weight_grad")
    def _(grad_out, x, in_mask, out_mask, kernel_size, stride, padding, dilation, groups):
        return x.new_empty((grad_out.shape[1], x.shape[1] // groups, kernel_size[0], kernel_size[1]))


# --------------------------------------------------------------------------------------------
# public API


def _check_mask(name: str, mask, n: int, channels: int, what: str, x: Tensor) -> Tensor:
    if mask is None:
        return torch.ones((1, channels), dtype=torch.bool, device=x.device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"pyeff.ops.masked_conv2d: {name} must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"pyeff.ops.masked_conv2d: {name} has dtype {str(mask.dtype).replace('torch.', '')}; "
                        f"expected bool (convert with {name}.bool() or ({name} > 0.5))")
    if mask.device != x.device:
        raise ValueError(f"pyeff.ops.masked_conv2d: {name} is on {mask.device} but x is on {x.device}; "
                         f"move it with {name}.to(x.device)")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if mask.dim() != 2 or mask.shape[1] != channels or mask.shape[0] not in (1, n):
        raise ValueError(f"pyeff.ops.masked_conv2d: {name} has shape {tuple(mask.shape)}; expected "
                         f"[{n}, {channels}] (one row per sample), [1, {channels}] or [{channels}] "
                         f"(shared by the batch), with {channels} = the number of {what} channels")
    return mask.contiguous()


def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, *, in_mask: Optional[Tensor] = None, out_mask: Optional[Tensor] = None,
                  backend: Optional[str] = None) -> Tensor:
    """conv2d that computes, per sample, only the active output channels from the active inputs.

    Args:
        x: [N, C, H, W] floating tensor.
        weight: [K, C / groups, kh, kw], same dtype and device as x.
        bias: optional [K].
        stride, padding, dilation: ints or pairs, as in torch.nn.functional.conv2d (padding >= 0 ints).
        groups: as in conv2d (supported by the portable kernels; the fast CPU kernel needs groups=1).
        in_mask: bool [N, C] (per sample) or [C] / [1, C] (shared); None = all active. Inactive input
            channels are never read.
        out_mask: bool [N, K] or [K] / [1, K]; None = all active. Inactive outputs are exact zeros.
        backend: "auto", "native", "triton" or "reference" (see pyeff.ops._backend).

    Example:
        >>> x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
        >>> keep = torch.tensor([[True, False] * 3, [False, True] * 3])
        >>> y = masked_conv2d(x, w, padding=1, out_mask=keep)
        >>> bool((y[0, 1] == 0).all()), y.shape
        (True, torch.Size([2, 6, 5, 5]))
    """
    check_tensor("masked_conv2d", "x", x)
    if x.dim() != 4:
        hint = " (unbatched input is not supported: use x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"pyeff.ops.masked_conv2d: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}{hint}")
    check_tensor("masked_conv2d", "weight", weight, dim=4)
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"pyeff.ops.masked_conv2d: weight ({weight.dtype}, {weight.device}) must match x "
                         f"({x.dtype}, {x.device})")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"pyeff.ops.masked_conv2d: groups must be a positive int, got {groups!r}")
    check_conv_sizes("masked_conv2d", x, weight)
    check_backend("masked_conv2d", backend)
    n, c = x.shape[:2]
    k = weight.shape[0]
    if c % groups or k % groups or weight.shape[1] * groups != c:
        raise ValueError(f"pyeff.ops.masked_conv2d: x has {c} channels and weight has shape {tuple(weight.shape)}; "
                         f"with groups={groups} the weight must be [K, {c // groups if c % groups == 0 else 'C/groups'}, kh, kw] "
                         f"and C and K divisible by groups")
    if bias is not None:
        check_tensor("masked_conv2d", "bias", bias, dim=1)
        if bias.shape[0] != k or bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"pyeff.ops.masked_conv2d: bias must be [{k}] with x's dtype and device, got "
                             f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = effective_dilation(weight.shape[2:], _pair(dilation, "dilation", 1))
    in_mask = _check_mask("in_mask", in_mask, n, c, "input", x)
    out_mask = _check_mask("out_mask", out_mask, n, k, "output", x)
    oh, ow = conv_out_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise ValueError(f"pyeff.ops.masked_conv2d: input {tuple(x.shape[2:])} is smaller than the dilated "
                         f"kernel {tuple(weight.shape[2:])} with padding {tuple(padding)}")
    if n == 0:
        return x.new_zeros((0, k, oh, ow))
    return _masked_conv2d_op(x, weight, bias, in_mask, out_mask, stride, padding, dilation, int(groups),
                             backend or "auto")


def cpu_strategy(x: Tensor, weight: Tensor, *, in_mask: Optional[Tensor] = None, out_mask: Optional[Tensor] = None,
                 stride=1, groups: int = 1) -> str:
    """The strategy masked_conv2d's native backend takes for these operands and masks (as the op
    takes them), under the current PYEFF_MASKED_CONV_STRATEGY: "dense", "masked_dense", "slice" or
    "kernel" (see the module docstring)."""
    n = x.shape[0]
    in_mask = _check_mask("in_mask", in_mask, n, x.shape[1], "input", x)
    out_mask = _check_mask("out_mask", out_mask, n, weight.shape[0], "output", x)
    return _strategy(x, in_mask, out_mask, _pair(stride, "stride", 1), int(groups), bool(in_mask.all()),
                     bool(out_mask.all()))
