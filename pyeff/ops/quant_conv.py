"""pyeff.ops.quant_conv2d / quant_linear: convolution and linear layers computed in integers.

Quantisation (the same as pyeff.ops.fake_quant, so the two agree bit for bit):
  activations: asymmetric, min-max over the call's whole input (range widened to hold 0), integer
               zero point zp, levels q in [0, 2^a_bits - 1];
  weights:     symmetric, one scale per output channel, levels w in [-(2^(w_bits-1) - 1), ...].
The convolution of the levels is integer arithmetic; a fused epilogue dequantises and adds bias:
    out[k] = a_scale * w_scale[k] * sum_i (q_i - zp) * w_ik + bias[k].

Integer slices (widths above 8 bits). Every GEMM multiplies int8 by int8 (or uint8 by int8) with
int32 accumulation; a b-bit operand is split into ceil(b/8) byte digits:
  * activations: q = sum_j 256^j u_j with unsigned digits u_j in [0, 255], zp likewise into z_j,
    so q - zp = sum_j 256^j (u_j - z_j): slice j is an 8-bit activation with zero point z_j
    (padding positions hold z_j, i.e. the value 0, in every slice);
  * weights (w_bits > 8): w - o = 256 h + l with balanced digits l, h in [-128, 127]; the offset o
    is 0 up to 15 bits and 128 for 16 bits (the range [-32767, 32767] does not fit two balanced
    int8 digits). o * sum_i (q_i - zp) comes from a window sum of per-pixel channel sums of the
    digits (`window_sums`), exact in int64.
  Each slice product is exact in int32 (|digit products| <= 2^15 per term); the slices are combined
  in float64 (exact for integers below 2^53) and only then scaled and rounded once.

Kernels:
  CPU, <= 8 bits both: quantise straight to uint8 in channels_last (C++), then oneDNN's int8
    convolution (onednn::qconv2d_pointwise: AMX / AVX512-VNNI) with the dequantisation and bias
    fused into it (float32 output).
  CPU, wider: the same quantiser writes byte slices; each slice runs through oneDNN's int8
    convolution with unit scales, whose float32 output holds the integer accumulator exactly when
    |acc| < 2^24 (checked from the weights before the call); the C++ epilogue combines slices.
  CPU fallback (float64-exact, CPUs without VNNI, accumulators too large for float32): C++ im2col
    of the digits into int8 columns (u - 128) -> at::_int_mm -> the C++ epilogue, which adds the
    exact correction (128 - z_j) * sum_i w_i.
  CUDA: the CUDA versions of the same quantiser / im2col / epilogue around at::_int_mm (cuBLASLt,
    int8 tensor cores). Triton: a quantise + im2col kernel and an int8 tl.dot GEMM with int32
    accumulation (kernels/quant_conv.py), then the same epilogue.

Every backend returns the output in channels_last memory format (the integer GEMM produces NHWC
rows; converting would cost a pass over the output).

Gradients are straight-through: d/dx and d/dw are those of F.conv2d applied to the fake-quantised
operands fake_quant(x, a_bits) and fake_quant(w, w_bits, scheme="sym", axis=0).
"""
import collections
import functools
import math
import numbers
import os
import weakref
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyeff import _extension
from pyeff.ops import _backend
from pyeff.ops._checks import FLOAT_DTYPES, check_bits, check_same_device, check_tensor
from pyeff.ops.fake_quant import fake_quant, minmax_reference, quant_params

# fastest first, as measured by bench/quant_conv.py
PREFERENCE = {"cpu": ("native",), "cuda": ("native", "triton")}
# CPU route of the native backend: "auto", "onednn" or "gemm" (for tests and benchmarks)
CPU_PATH_ENV = "PYEFF_QUANT_CONV_CPU_PATH"
_EXACT_F32 = 1 << 24  # integers below this are exact in float32
_MAX_KD = 1 << 17  # per-group reduction length that keeps every int8 x int8 slice GEMM in int32
_OPS = ("quant_conv_quantize", "quant_conv_quantize_auto", "quant_conv_im2col", "quant_conv_window_sums",
        "quant_conv_epilogue")


# --------------------------------------------------------------------------------------------
# quantisation parameters and levels (shared by every backend)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_finite(minmax: Tensor, what: str) -> None:
    if minmax.device.type == "cpu" and not bool(torch.isfinite(minmax).all()):
        raise ValueError(f"pyeff.ops.quant_conv2d: {what} contains NaN or infinity; quantisation needs finite values")


def activation_params(x: Tensor, a_bits: int, minmax=None):
    """(scale, inv_scale, zero_point, qmax) of the per-tensor asymmetric activation quantiser, as
    1-element tensors of the compute dtype (float32, float64 for float64 x)."""
    mm = minmax(x, None) if minmax is not None else minmax_reference(x, None)
    _check_finite(mm, "x")
    scale, inv, zp, _, qmax = quant_params(mm, a_bits, "asym")
    return scale, inv, zp, qmax


def fixed_range(a_range):
    """A `minmax` for activation_params that returns the given (lo, hi) instead of the data's."""
    def minmax(x: Tensor, axis) -> Tensor:
        return torch.tensor([[a_range[0]], [a_range[1]]], dtype=_compute_dtype(x), device=x.device)
    return minmax


def weight_levels(weight: Tensor, w_bits: int):
    """(integer levels as int64 [K, ...], scale [K]) of the symmetric per-output-channel weight
    quantiser: the levels fake_quant(weight, w_bits, scheme="sym", axis=0) rounds to."""
    wc = weight.to(_compute_dtype(weight))
    mm = minmax_reference(wc, 0)
    _check_finite(mm, "weight")
    scale, inv, zp, qmin, qmax = quant_params(mm, w_bits, "sym")
    shape = (-1,) + (1,) * (weight.dim() - 1)
    q = torch.floor(wc * inv.view(shape) + zp.view(shape) + 0.5).clamp(qmin, qmax)
    return q.to(torch.int64), scale


def activation_levels(x: Tensor, scale: Tensor, inv: Tensor, zp: Tensor, qmax: int) -> Tensor:
    xc = x.to(_compute_dtype(x))
    return torch.floor(xc * inv + zp + 0.5).clamp(0, qmax)


# --------------------------------------------------------------------------------------------
# the reference: plain PyTorch, the op's specification


def quant_conv2d_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                           groups: int, w_bits: int, a_bits: int, a_range=None, out_scale: Optional[Tensor] = None,
                           relu: bool = False) -> Tensor:
    """Fake-quantise both operands in float64 (the levels and scales of pyeff.ops.fake_quant) and
    run a float64 convolution; the result in x's dtype, channels_last. `a_range` = (lo, hi): the
    activation quantiser's range instead of the input's min-max (values outside saturate).
    `out_scale` [K] multiplies each output channel before the bias is added; `relu` clamps at 0."""
    scale, inv, zp, qmax = activation_params(x, a_bits, None if a_range is None else fixed_range(a_range))
    xd = (activation_levels(x, scale, inv, zp, qmax).double() - zp.double()) * scale.double()
    wq, wscale = weight_levels(weight, w_bits)
    wd = wq.double() * wscale.double().view(-1, 1, 1, 1)
    out = F.conv2d(xd, wd, None, stride, padding, dilation, groups)
    if out_scale is not None:
        out = out * out_scale.double().view(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    if relu:
        out = out.clamp_min(0)
    return out.to(x.dtype).contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# slicing


def act_slices(a_bits: int) -> int:
    return 1 if a_bits <= 8 else 2


def weight_digits(wq: Tensor, w_bits: int, groups: int):
    """Integer weight levels [K, Cg, kh, kw] -> (int8 digit stack [G * cols, Cg, kh, kw],
    slices_w, offset). Per group g the stack holds the columns [digit 0 of its Kg filters, digit 1
    ...]; w = sum_l 256^l digit_l + 128 * offset."""
    if w_bits <= 8:
        digits, ones = [wq], False
    else:
        offset = 128 if w_bits == 16 else 0
        t = wq - offset
        lo = torch.remainder(t + 128, 256) - 128
        hi = torch.div(t - lo, 256, rounding_mode="floor")
        digits, ones = [lo, hi], offset != 0
    K = wq.shape[0]
    parts = [d.reshape(groups, K // groups, *wq.shape[1:]) for d in digits]
    stack = torch.cat(parts, dim=1).reshape(-1, *wq.shape[1:])
    return stack.to(torch.int8), len(digits), ones


def window_sums(digits: Tensor, zdig: List[int], groups: int, kernel, stride, padding, dilation) -> Tensor:
    """[M, G] float64: sum of (q - zp) over each output position's window in group g (padding
    counts 0), from the byte digits [S, N, C, H, W]; exact (int64) before the final conversion."""
    S, N, C, H, W = digits.shape
    a = None
    for j in range(S):
        nhwc = digits[j].permute(0, 2, 3, 1)  # contiguous for channels_last digits
        cs = nhwc.reshape(N, H, W, groups, C // groups).sum(-1, dtype=torch.int32).permute(0, 3, 1, 2)
        cs = cs.to(torch.int64) - (C // groups) * zdig[j]
        a = cs * (256 ** j) if a is None else a + cs * (256 ** j)
    a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    OH = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    total = None
    for kh in range(kernel[0]):
        for kw in range(kernel[1]):
            h0, w0 = kh * dilation[0], kw * dilation[1]
            t = a[:, :, h0:h0 + stride[0] * (OH - 1) + 1:stride[0], w0:w0 + stride[1] * (OW - 1) + 1:stride[1]]
            total = t.clone() if total is None else total.add_(t)
    return total.permute(0, 2, 3, 1).reshape(N * OH * OW, groups).to(torch.float64)


def zero_point_digits(zp: int, slices: int) -> List[int]:
    return [(zp >> (8 * j)) & 255 for j in range(slices)]


def digit_max(qmax: int, j: int) -> int:
    return min(255, qmax >> (8 * j))


# --------------------------------------------------------------------------------------------
# prepared weights: quantised, sliced and packed once per (tensor, version, arguments)

_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_CACHE_SIZE = 64


def _prepared(weight: Tensor, key: tuple, build):
    """build() once per weight tensor, its in-place version and key. Entries hold a weak
    reference, so a new tensor at a recycled address never hits a stale entry."""
    try:
        version = weight._version
    except RuntimeError:  # inference tensors carry no version counter
        return build()
    k = (id(weight), weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), weight.dtype,
         weight.device) + key
    hit = _CACHE.get(k)
    if hit is not None and hit[0]() is weight and hit[1] == version:
        _CACHE.move_to_end(k)
        return hit[2]
    value = build()
    _CACHE[k] = (weakref.ref(weight), version, value)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


# --------------------------------------------------------------------------------------------
# backends


@functools.lru_cache(maxsize=None)
def cpu_has_int8_dot() -> bool:
    """True where oneDNN's int8 kernels are exact: AVX512-VNNI, AVX-VNNI or AMX-INT8. (Without
    them oneDNN halves int8 weights to dodge 16-bit saturation, which is not exact.)"""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return False


@functools.lru_cache(maxsize=None)
def _onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise") \
        and torch.backends.mkldnn.is_available()


def native_ops_built() -> bool:
    return _extension.loaded() and all(hasattr(torch.ops.pyeff, n) for n in _OPS)


def _out_hw(x: Tensor, weight: Tensor, stride, padding, dilation):
    H, W = x.shape[-2:]
    KH, KW = weight.shape[-2:]
    OH = (H + 2 * padding[0] - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + 2 * padding[1] - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    return OH, OW


def _weight_pack(weight: Tensor, w_bits: int, groups: int):
    wq, wscale = weight_levels(weight, w_bits)
    stack, S_w, offset = weight_digits(wq, w_bits, groups)
    # L1 norm of every stacked filter: bounds |acc| of a slice GEMM by digit range * l1
    l1 = stack.to(torch.int64).abs().flatten(1).sum(1)
    return stack, wscale, S_w, offset, int(l1.max()) if l1.numel() else 0


def _gemm_weights(stack: Tensor, groups: int, k_pad: int, col_pad: int):
    """int8 digit stack [G*cols, Cg, kh, kw] -> per-group GEMM operands [Kpad, cols_pad] with rows
    in the im2col order (kh, kw, c), plus the exact column sums [G * cols] (int64)."""
    G = groups
    cols = stack.shape[0] // G
    mats = stack.reshape(G, cols, *stack.shape[1:]).permute(0, 3, 4, 2, 1).reshape(G, -1, cols)
    colsum = mats.to(torch.int64).sum(1).reshape(-1)
    mats = F.pad(mats, (0, col_pad - cols, 0, k_pad - mats.shape[1]))
    return [m.contiguous() for m in mats], colsum


def _cpu_onednn_allowed() -> bool:
    forced = os.environ.get(CPU_PATH_ENV, "auto").lower()
    if forced not in ("auto", "onednn", "gemm"):
        raise ValueError(f"pyeff.ops.quant_conv2d: {CPU_PATH_ENV} must be auto, onednn or gemm, got {forced!r}")
    return forced != "gemm" and cpu_has_int8_dot() and _onednn_available()


def _single_slice(x: Tensor, a_bits: int, w_bits: int) -> bool:
    return a_bits <= 8 and w_bits <= 8 and x.dtype != torch.float64


def _cpu_direct(x: Tensor, a_bits: int, w_bits: int) -> bool:
    """One oneDNN int8 convolution with the dequantisation fused (<= 8 bits, float32 output)."""
    return _single_slice(x, a_bits, w_bits) and _cpu_onednn_allowed()


def _cpu_path(x: Tensor, a_bits: int, w_bits: int, kd: int, l1max: int, qmax: int, zp: int) -> str:
    if not _cpu_onednn_allowed():
        return "gemm"
    if _single_slice(x, a_bits, w_bits):
        return "direct"
    # slices through oneDNN: every slice accumulator must be exact in its float32 output
    amax = max(max(z, digit_max(qmax, j) - z) for j, z in enumerate(zero_point_digits(zp, act_slices(a_bits))))
    if amax * l1max < _EXACT_F32:
        return "sliced"
    return "gemm"


def _run_native(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range=None, out_scale=None,
                relu=False):
    dev = x.device
    ops = torch.ops.pyeff
    N, C = x.shape[:2]
    K, Cg, KH, KW = weight.shape
    OH, OW = _out_hw(x, weight, stride, padding, dilation)
    kd = Cg * KH * KW
    if kd > _MAX_KD:
        raise ValueError(f"pyeff.ops.quant_conv2d: C/groups * kh * kw = {kd} exceeds {_MAX_KD}, where int32 "
                         "accumulation of int8 slices could overflow; use backend='reference'")
    S_a = act_slices(a_bits)
    if dev.type == "cpu":  # range, parameters and digits in one C++ call
        qmax = (1 << a_bits) - 1
        digits, params = ops.quant_conv_quantize_auto(x, a_range, qmax, S_a)
        scale, _, zp, lo, hi = params.tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("pyeff.ops.quant_conv2d: x contains NaN or infinity; quantisation needs finite values")
        zp = int(zp)
    else:
        scale, inv, zp_t, qmax = activation_params(
            x, a_bits, ops.fake_quant_minmax if a_range is None else fixed_range(a_range))
        zp = int(zp_t.item())
        digits = ops.quant_conv_quantize(x, inv, zp_t, qmax, S_a)
    conv = (tuple(stride), tuple(padding), tuple(dilation))
    out_dtype = x.dtype
    digit_pack = lambda: _prepared(weight, ("digits", w_bits, groups),  # noqa: E731
                                   lambda: _weight_pack(weight, w_bits, groups))
    if dev.type == "cpu" and _cpu_direct(x, a_bits, w_bits):
        # one lookup per call: the prepacked weight, its float32 scales, zero points, conv args
        def plan():
            stack, wscale = digit_pack()[:2]
            w32 = wscale.float().contiguous()
            packed = torch.ops.onednn.qconv_prepack(stack, w32, 1.0, 0, list(stride), list(padding),
                                                    list(dilation), groups, None)
            return packed, wscale, w32, torch.zeros(K, dtype=torch.int64), (list(stride), list(padding),
                                                                            list(dilation))
        packed, wscale, w32, zeros, args = _prepared(weight, ("onednn", w_bits, groups) + conv, plan)
        if out_scale is not None:  # a per-channel factor rides on the weight scales
            w32 = (wscale * out_scale.to(wscale)).float()
        out = torch.ops.onednn.qconv2d_pointwise(
            digits[0], scale, zp, packed, w32, zeros, None if bias is None else bias.float(), *args, groups,
            1.0, 0, torch.float32, "relu" if relu else "none", [], "")
        out = out.contiguous(memory_format=torch.channels_last)
        return out if out_dtype == torch.float32 else out.to(out_dtype)
    stack, wscale, S_w, offset, l1max = digit_pack()
    if out_scale is not None:  # a per-channel factor rides on the weight scales of the epilogue
        wscale = wscale * out_scale.to(wscale)
    path = _cpu_path(x, a_bits, w_bits, kd, l1max, qmax, zp) if dev.type == "cpu" else "gemm"
    cols = stack.shape[0] // groups
    M = N * OH * OW
    zdig = zero_point_digits(zp, S_a)
    if path == "sliced":
        packed = _prepared(weight, ("onednn-sliced", w_bits, groups) + conv, lambda: torch.ops.onednn.qconv_prepack(
            stack, torch.ones(stack.shape[0]), 1.0, 0, list(stride), list(padding), list(dilation), groups, None))
        unit = torch.ones(stack.shape[0])
        zeros = torch.zeros(stack.shape[0], dtype=torch.int64)
        acc = []
        for j in range(S_a):
            o = torch.ops.onednn.qconv2d_pointwise(
                digits[j], 1.0, zdig[j], packed, unit, zeros, None, list(stride), list(padding), list(dilation),
                groups, 1.0, 0, torch.float32, "none", [], "")
            o2 = o.permute(0, 2, 3, 1).reshape(M, groups * cols)  # a view for channels_last output
            acc += [o2[:, g * cols:(g + 1) * cols] for g in range(groups)]
        corr = torch.zeros(S_a, groups * cols, dtype=torch.float64)
    else:
        on_cuda = dev.type == "cuda"
        # cuBLASLt's int8 GEMM wants K and N multiples of 8 and M > 16
        k_pad = -(-kd // 8) * 8 if on_cuda else kd
        col_pad = -(-cols // 8) * 8 if on_cuda else cols
        mats, colsum = _prepared(weight, ("gemm", w_bits, groups, k_pad, col_pad),
                                 lambda: _gemm_weights(stack, groups, k_pad, col_pad))
        a = ops.quant_conv_im2col(digits, zdig, [KH, KW], list(stride), list(padding), list(dilation), groups, k_pad)
        rows = S_a * M
        acc = []
        outs = []
        for g in range(groups):
            ag = a[g]
            if on_cuda and rows <= 16:
                ag = F.pad(ag, (0, 0, 0, 17 - rows))
            outs.append(torch._int_mm(ag, mats[g]))
        for j in range(S_a):
            acc += [outs[g][j * M:(j + 1) * M, :cols] for g in range(groups)]
        corr = torch.tensor([128 - z for z in zdig], dtype=torch.float64, device=dev).view(-1, 1) \
            * colsum.to(dev, torch.float64).view(1, -1)
    rowsum = None
    if offset:
        ws = ops.quant_conv_window_sums if dev.type == "cpu" else window_sums
        rowsum = ws(digits, zdig, groups, (KH, KW), stride, padding, dilation)
    out = ops.quant_conv_epilogue(acc, corr, S_w, rowsum, float(scale), wscale, bias, [N, K, OH, OW], out_dtype)
    return out.relu_() if relu else out


def _run_triton(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range=None, out_scale=None,
                relu=False):
    from pyeff.kernels import quant_conv as tk

    N = x.shape[0]
    K, Cg, KH, KW = weight.shape
    OH, OW = _out_hw(x, weight, stride, padding, dilation)
    scale, inv, zp_t, qmax = activation_params(x, a_bits, _triton_minmax() if a_range is None else fixed_range(a_range))
    zp = int(zp_t.item())
    S_a = act_slices(a_bits)
    stack, wscale, S_w, offset, _ = _prepared(weight, ("digits", w_bits, groups),
                                           lambda: _weight_pack(weight, w_bits, groups))
    cols = stack.shape[0] // groups
    kd = Cg * KH * KW
    mats, colsum = _prepared(weight, ("gemm", w_bits, groups, kd, cols),
                             lambda: _gemm_weights(stack, groups, kd, cols))
    zdig = zero_point_digits(zp, S_a)
    a = tk.im2col(x, inv, zp_t, qmax, S_a, zdig, (KH, KW), stride, padding, dilation, groups)
    M = N * OH * OW
    acc = []
    outs = [tk.int8_mm(a[g], mats[g]) for g in range(groups)]
    for j in range(S_a):
        acc += [outs[g][j * M:(j + 1) * M] for g in range(groups)]
    corr = torch.tensor([128 - z for z in zdig], dtype=torch.float64, device=x.device).view(-1, 1) \
        * colsum.to(x.device, torch.float64).view(1, -1)
    rowsum = None
    if offset:  # digits from the same levels, for the window sums of the 16-bit weight offset
        q = activation_levels(x, scale, inv, zp_t, qmax).to(torch.int64)
        digits = torch.stack([(q >> (8 * j)) & 255 for j in range(S_a)]).to(torch.uint8)
        digits = torch.stack([d.contiguous(memory_format=torch.channels_last) for d in digits])
        rowsum = window_sums(digits, zdig, groups, (KH, KW), stride, padding, dilation)
    if out_scale is not None:
        wscale = wscale * out_scale.to(wscale)
    out = tk.epilogue(acc, corr, S_w, rowsum, float(scale), wscale, bias, (N, K, OH, OW), x.dtype)
    return out.relu_() if relu else out


def _triton_minmax():
    from pyeff.kernels import fake_quant as fq

    return fq.minmax


def _run(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend, a_range=None, out_scale=None,
         relu=False):
    if x.shape[0] == 0:
        OH, OW = _out_hw(x, weight, stride, padding, dilation)
        return x.new_empty((0, weight.shape[0], OH, OW)).contiguous(memory_format=torch.channels_last)
    run = {"reference": quant_conv2d_reference, "native": _run_native, "triton": _run_triton}[backend]
    return run(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range, out_scale, relu)


def _resolve(device: torch.device, backend: str) -> str:
    choice = _backend.resolve("quant_conv2d", device, backend, PREFERENCE)
    if choice == "native" and not native_ops_built():
        if backend not in (None, "", "auto"):
            raise RuntimeError("pyeff.ops.quant_conv2d: backend 'native' is not usable: pyeff._C was built without "
                               "the quant_conv kernels (rebuild with pip install --no-build-isolation -e .)")
        return "reference"
    return choice


@torch.library.custom_op("pyeff::quant_conv2d", mutates_args=())
def _quant_conv2d_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                     dilation: List[int], groups: int, w_bits: int, a_bits: int, backend: str,
                     a_range: Optional[List[float]] = None, out_scale: Optional[Tensor] = None,
                     relu: bool = False) -> Tensor:
    return _run(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, _resolve(x.device, backend),
                a_range, out_scale, relu)


@_quant_conv2d_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend, a_range=None, out_scale=None,
      relu=False):
    OH, OW = _out_hw(x, weight, stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], OH, OW)).contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend, a_range, out_scale, relu = inputs
    ctx.save_for_backward(x, weight, out_scale, output if relu else None)
    ctx.conv = (stride, padding, dilation, groups)
    ctx.bits = (w_bits, a_bits)
    ctx.a_range = a_range
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    # straight-through: the gradients of F.conv2d on the fake-quantised operands, then of the
    # per-channel scale, the bias and the ReLU applied to its output
    x, weight, out_scale, out = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    w_bits, a_bits = ctx.bits
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_s = out_scale is not None and ctx.needs_input_grad[11]
    grad = grad.to(x.dtype)
    if out is not None:  # relu
        grad = grad * (out > 0).to(grad.dtype)
    if not (need_w or need_s):
        xq = x
    elif ctx.a_range is None:
        xq = fake_quant(x.detach(), a_bits)
    else:  # the fixed range's levels (values outside saturate)
        scale, inv, zp, qmax = activation_params(x, a_bits, fixed_range(ctx.a_range))
        xq = ((activation_levels(x.detach(), scale, inv, zp, qmax) - zp) * scale).to(x.dtype)
    wq = fake_quant(weight.detach(), w_bits, scheme="sym", axis=0) if (need_x or need_s) else weight
    g_conv = grad if out_scale is None else grad * out_scale.to(grad.dtype).view(1, -1, 1, 1)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        g_conv, xq, wq, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False])
    gb = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
    gs = None
    if need_s:
        gs = (grad * F.conv2d(xq, wq, None, stride, padding, dilation, groups)).sum((0, 2, 3)).to(out_scale.dtype)
    return gx, gw, gb, None, None, None, None, None, None, None, None, gs, None


_quant_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _register_kernel_fakes():
    @torch.library.register_fake("pyeff::quant_conv_quantize")
    def _(x, inv_scale, zero_point, qmax, slices):
        N, C, H, W = x.shape
        return x.new_empty((slices, N, H, W, C), dtype=torch.uint8).permute(0, 1, 4, 2, 3)

    @torch.library.register_fake("pyeff::quant_conv_quantize_auto")
    def _(x, a_range, qmax, slices):
        N, C, H, W = x.shape
        digits = x.new_empty((slices, N, H, W, C), dtype=torch.uint8).permute(0, 1, 4, 2, 3)
        return digits, x.new_empty((5,), dtype=torch.float64)

    @torch.library.register_fake("pyeff::quant_conv_window_sums")
    def _(digits, zero_digits, groups, kernel, stride, padding, dilation):
        S, N, C, H, W = digits.shape
        OH = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        OW = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        return digits.new_empty((N * OH * OW, groups), dtype=torch.float64)

    @torch.library.register_fake("pyeff::quant_conv_im2col")
    def _(digits, pad_digits, kernel, stride, padding, dilation, groups, k_pad):
        S, N, C, H, W = digits.shape
        OH = (H + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        OW = (W + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        return digits.new_empty((groups, S * N * OH * OW, k_pad), dtype=torch.int8)

    @torch.library.register_fake("pyeff::quant_conv_epilogue")
    def _(acc, corr, slices_w, rowsum, a_scale, w_scale, bias, out_shape, out_dtype):
        N, K, OH, OW = out_shape
        return corr.new_empty((N, K, OH, OW), dtype=out_dtype).contiguous(memory_format=torch.channels_last)


if native_ops_built():
    _register_kernel_fakes()


# --------------------------------------------------------------------------------------------
# public API


def _pair(op: str, name: str, v, lo: int):
    # fast path for plain ints (the isinstance checks against numbers.Integral cost ~15 us a call)
    if type(v) is int and v >= lo:
        return [v, v]
    if type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int \
            and v[0] >= lo and v[1] >= lo:
        return [v[0], v[1]]
    if isinstance(v, str):
        raise ValueError(f"pyeff.ops.{op}: {name}={v!r} is not supported; give integers")
    vals = (v, v) if not isinstance(v, (tuple, list)) else tuple(v)
    if len(vals) != 2 or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in vals):
        raise TypeError(f"pyeff.ops.{op}: {name} must be an int or a pair of ints, got {v!r}")
    if any(int(i) < lo for i in vals):
        raise ValueError(f"pyeff.ops.{op}: {name} must be >= {lo}, got {v!r}")
    return [int(i) for i in vals]


def _check_bits(op: str, w_bits, a_bits):
    if isinstance(w_bits, numbers.Integral) and not isinstance(w_bits, bool) and int(w_bits) == 1:
        raise ValueError(f"pyeff.ops.{op}: w_bits=1 leaves the symmetric weight quantiser only the level 0; "
                         "expected an integer in [2, 16]")
    return check_bits(op, "w_bits", w_bits, 2, 16), check_bits(op, "a_bits", a_bits, 1, 16)


def quant_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                 groups: int = 1, *, w_bits: int = 8, a_bits: int = 8, a_range=None,
                 out_scale: Optional[Tensor] = None, relu: bool = False, backend: Optional[str] = None) -> Tensor:
    """2-D convolution computed in integers: F.conv2d's arguments, with the activations quantised to
    `a_bits` (asymmetric, per tensor, min-max of this call's input, or `a_range`) and the weights to `w_bits`
    (symmetric, per output channel); int8 GEMMs with int32 accumulation (widths above 8 bits as
    int8 slices) and a fused dequantising epilogue that adds the bias.

    Args:
        x: [N, C, H, W] float16 / bfloat16 / float32 / float64.
        weight: [K, C / groups, kh, kw], same dtype and device as x.
        bias: None or [K].
        stride, padding, dilation: int or pair (padding >= 0, no strings).
        groups: divides C and K.
        w_bits: 2-16. a_bits: 1-16.
        a_range: None, or (lo, hi) finite floats with lo <= hi: quantise the activations over this
            range, widened to hold 0 as the min-max range is, instead of the call's min-max; values
            outside the widened range saturate, exactly as if x were clipped to it first. A running
            range (DFS) saves the min-max pass and makes a sample's output independent of its batch.
        out_scale: None or [K], same dtype and device as x: each output channel is multiplied by it
            before the bias is added, in the dequantising epilogue. With relu=True the output is
            clamped at 0 there too. Together they fold an inference BatchNorm and ReLU into the conv:
            out_scale = gamma / sqrt(var + eps), bias = beta + (conv_bias - mean) * out_scale.
        backend: "auto", "native", "triton" or "reference" (see pyeff.ops._backend).

    Returns [N, K, OH, OW] in x's dtype, channels_last memory format. Equal to
    quant_conv2d_reference (float64 convolution of the fake-quantised operands) up to the final
    rounding to x's dtype. Gradients are straight-through (see the module docstring).

    Example:
        >>> x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
        >>> quant_conv2d(x, w, padding=1, w_bits=4, a_bits=4).shape
        torch.Size([2, 4, 8, 8])
    """
    op = "quant_conv2d"
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight)
    if x.dim() != 4:
        raise ValueError(f"pyeff.ops.{op}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}"
                         + (" (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""))
    if weight.dim() != 4:
        raise ValueError(f"pyeff.ops.{op}: weight must be 4-D [K, C/groups, kh, kw], got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"pyeff.ops.{op}: weight has dtype {weight.dtype} but x has {x.dtype}; they must match")
    if bias is not None:
        check_tensor(op, "bias", bias, dim=1)
        if bias.dtype != x.dtype:
            raise TypeError(f"pyeff.ops.{op}: bias has dtype {bias.dtype} but x has {x.dtype}; they must match")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"pyeff.ops.{op}: bias has {bias.shape[0]} values for {weight.shape[0]} output channels")
    check_same_device(op, x=x, weight=weight, bias=bias)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"pyeff.ops.{op}: groups must be a positive integer, got {groups!r}")
    groups = int(groups)
    C, K = x.shape[1], weight.shape[0]
    if K % groups:
        raise ValueError(f"pyeff.ops.{op}: {K} output channels are not divisible by groups={groups}")
    if C != weight.shape[1] * groups:
        raise ValueError(f"pyeff.ops.{op}: x has {C} channels but weight expects {weight.shape[1]} x groups={groups} "
                         f"= {weight.shape[1] * groups}")
    stride, padding, dilation = (_pair(op, "stride", stride, 1), _pair(op, "padding", padding, 0),
                                 _pair(op, "dilation", dilation, 1))
    w_bits, a_bits = _check_bits(op, w_bits, a_bits)
    OH, OW = _out_hw(x, weight, stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"pyeff.ops.{op}: input {tuple(x.shape[-2:])} (padded by {padding}) is smaller than the "
                         f"dilated kernel {tuple(weight.shape[-2:])}")
    if a_range is not None:
        try:
            lo, hi = (float(v) for v in a_range)
        except (TypeError, ValueError):
            raise TypeError(f"pyeff.ops.{op}: a_range must be a pair of floats (lo, hi), got {a_range!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise ValueError(f"pyeff.ops.{op}: a_range must be finite with lo <= hi, got {(lo, hi)}")
        a_range = [lo, hi]
    if out_scale is not None:
        check_tensor(op, "out_scale", out_scale, dim=1)
        if out_scale.dtype != x.dtype or out_scale.shape[0] != K:
            raise ValueError(f"pyeff.ops.{op}: out_scale must be [{K}] of dtype {x.dtype}, got "
                             f"{tuple(out_scale.shape)} of {out_scale.dtype}")
        check_same_device(op, x=x, out_scale=out_scale)
    relu = bool(relu)
    backend = backend or "auto"
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, out_scale))) \
            and not torch.compiler.is_compiling():
        # nothing to record: the kernels directly (the custom op's dispatch costs ~0.1 ms a call)
        return _run(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, _resolve(x.device, backend),
                    a_range, out_scale, relu)
    return _quant_conv2d_op(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, backend,
                            a_range, out_scale, relu)


def quant_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, w_bits: int = 8, a_bits: int = 8,
                 backend: Optional[str] = None) -> Tensor:
    """F.linear computed in integers, quantised as quant_conv2d (activations per tensor over the
    whole input, weights per output feature). x: [..., in_features]; weight: [out, in]."""
    op = "quant_linear"
    check_tensor(op, "x", x, min_dim=1)
    check_tensor(op, "weight", weight, dim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"pyeff.ops.{op}: x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    w_bits, a_bits = _check_bits(op, w_bits, a_bits)
    lead = x.shape[:-1]
    x4 = x.reshape(-1, x.shape[-1], 1, 1)
    try:
        out = quant_conv2d(x4, weight.reshape(*weight.shape, 1, 1), bias, w_bits=w_bits, a_bits=a_bits,
                           backend=backend)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("quant_conv2d", op)) from None
    return out.reshape(*lead, weight.shape[0])


__all__ = ["quant_conv2d", "quant_linear", "quant_conv2d_reference", "FLOAT_DTYPES"]
