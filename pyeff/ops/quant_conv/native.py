"""The native backend: pyeff's compiled passes (quantiser, im2col, window sums, epilogue, the
depthwise kernel) around oneDNN's int8 convolution or at::_int_mm. One function per route
(routes.py chooses on the CPU; CUDA always takes the GEMM route, on cuBLASLt's int8 tensor cores)."""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.quant_conv import routes, weights
from pyeff.ops.quant_conv.reference import activation_params, fixed_range
from pyeff.ops.quant_conv.slicing import act_slices, window_sums, zero_point_digits

_MAX_KD = 1 << 17  # per-group reduction length that keeps every int8 x int8 slice GEMM in int32


class Activations(NamedTuple):
    digits: Tensor  # uint8 [S, N, C, H, W], channels_last slices
    scale: float
    zp: int
    qmax: int


def quantize(x: Tensor, a_bits: int, a_range) -> Activations:
    ops = torch.ops.pyeff
    qmax = (1 << a_bits) - 1
    if x.device.type == "cpu":  # range, parameters and digits in one C++ call
        digits, params = ops.quant_conv_quantize_auto(x, a_range, qmax, act_slices(a_bits))
        scale, _, zp, lo, hi = params.tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("pyeff.ops.quant_conv2d: x contains NaN or infinity; quantisation needs finite values")
        return Activations(digits, scale, int(zp), qmax)
    scale, inv, zp_t, qmax = activation_params(x, a_bits,
                                               ops.fake_quant_minmax if a_range is None else fixed_range(a_range))
    digits = ops.quant_conv_quantize(x, inv, zp_t, qmax, act_slices(a_bits))
    return Activations(digits, scale, int(zp_t.item()), qmax)


def direct_onednn(x, act: Activations, forms, weight, bias, stride, padding, dilation, groups, w_bits, out_scale,
                  relu) -> Tensor:
    """One oneDNN int8 convolution, dequantisation, bias and ReLU fused (float32 output)."""
    p = weights.onednn_direct(forms, weight, w_bits, stride, padding, dilation, groups)
    w32 = p.scale32 if out_scale is None else (p.scale * out_scale.to(p.scale)).float()  # rides on the scales
    out = torch.ops.onednn.qconv2d_pointwise(
        act.digits[0], act.scale, act.zp, p.packed, w32, p.zeros, None if bias is None else bias.float(), *p.conv,
        groups, 1.0, 0, torch.float32, "relu" if relu else "none", [], "")
    out = out.contiguous(memory_format=torch.channels_last)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def sliced_onednn(act: Activations, forms, d: weights.Digits, w_bits, stride, padding, dilation, groups, M: int):
    """One oneDNN int8 convolution per activation slice with unit scales: (accumulators, corrections)
    for the epilogue; each accumulator is an exact integer in float32."""
    p = weights.onednn_sliced(forms, d, w_bits, stride, padding, dilation, groups)
    cols = d.stack.shape[0] // groups
    acc = []
    for j, z in enumerate(zero_point_digits(act.zp, act.digits.shape[0])):
        o = torch.ops.onednn.qconv2d_pointwise(
            act.digits[j], 1.0, z, p.packed, p.unit, p.zeros, None, list(stride), list(padding), list(dilation),
            groups, 1.0, 0, torch.float32, "none", [], "")
        o2 = o.permute(0, 2, 3, 1).reshape(M, groups * cols)  # a view for channels_last output
        acc += [o2[:, g * cols:(g + 1) * cols] for g in range(groups)]
    return acc, torch.zeros(len(acc) // groups, groups * cols, dtype=torch.float64)


def float_conv(x, act: Activations, levels: weights.FloatLevels, bias, stride, padding, dilation, groups,
               out_scale, relu, compute: torch.dtype) -> Tensor:
    """The integer convolution sum (q - zp) * w_level as a float convolution: exact wherever every
    partial sum stays an integer the float type holds (routes.float_dtype checks the bound), then
    the scales, bias and ReLU in `compute`."""
    q = act.digits[0].to(compute)
    for j in range(1, act.digits.shape[0]):
        q.add_(act.digits[j].to(compute), alpha=256 ** j)
    q.sub_(act.zp)  # padding is then a zero activation, as in the reference
    w = levels.levels if levels.levels.dtype == compute else levels.levels.to(compute)
    acc = F.conv2d(q, w, None, stride, padding, dilation, groups)
    scale = levels.scale.to(torch.float64) * act.scale
    if out_scale is not None:
        scale = scale * out_scale.to(torch.float64)
    out = acc.mul_(scale.to(compute).view(1, -1, 1, 1))
    if bias is not None:
        out.add_(bias.to(compute).view(1, -1, 1, 1))
    if relu:
        out.relu_()
    out = out.contiguous(memory_format=torch.channels_last)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def int8_gemm(act: Activations, forms, d: weights.Digits, w_bits, kernel, stride, padding, dilation, groups, M: int):
    """pyeff's im2col of the digits (u - 128, int8) and at::_int_mm per group: (accumulators,
    corrections (128 - z_j) * column sums) for the epilogue, exact in int32."""
    dev = act.digits.device
    on_cuda = dev.type == "cuda"
    cols = d.stack.shape[0] // groups
    kd = d.stack[0].numel()
    # cuBLASLt's int8 GEMM wants K and N multiples of 8 and M > 16
    k_pad = -(-kd // 8) * 8 if on_cuda else kd
    col_pad = -(-cols // 8) * 8 if on_cuda else cols
    mats, colsum = weights.gemm_operands(forms, d, w_bits, groups, k_pad, col_pad)
    zdig = zero_point_digits(act.zp, act.digits.shape[0])
    a = torch.ops.pyeff.quant_conv_im2col(act.digits, zdig, list(kernel), list(stride), list(padding),
                                          list(dilation), groups, k_pad)
    rows = len(zdig) * M
    outs = []
    for g in range(groups):
        ag = a[g]
        if on_cuda and rows <= 16:
            ag = F.pad(ag, (0, 0, 0, 17 - rows))
        outs.append(torch._int_mm(ag, mats[g]))
    acc = []
    for j in range(len(zdig)):
        acc += [outs[g][j * M:(j + 1) * M, :cols] for g in range(groups)]
    corr = torch.tensor([128 - z for z in zdig], dtype=torch.float64, device=dev).view(-1, 1) \
        * colsum.to(dev, torch.float64).view(1, -1)
    return acc, corr


def run_native(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range, out_scale, relu,
               forms: weights.WeightForms) -> Tensor:
    K, Cg, KH, KW = weight.shape
    OH, OW = conv_out_hw(x.shape[-2:], (KH, KW), stride, padding, dilation)
    kd = Cg * KH * KW
    if kd > _MAX_KD:
        raise ValueError(f"pyeff.ops.quant_conv2d: C/groups * kh * kw = {kd} exceeds {_MAX_KD}, where int32 "
                         "accumulation of int8 slices could overflow; use backend='reference'")
    act = quantize(x, a_bits, a_range)
    args = (x, act, forms, weight, bias, stride, padding, dilation, groups, w_bits, out_scale, relu, (OH, OW))
    if x.device.type != "cpu":
        return run_route("gemm", *args)
    cands = routes.conv_candidates(x, weight.shape, stride, padding, dilation, (OH, OW), w_bits, a_bits, act.zp,
                                   act.qmax, lambda: weights.digits(forms, weight, w_bits, groups).l1max)
    route, out = routes.pick(cands, routes.tune_key(x, weight, stride, padding, dilation, groups, w_bits, a_bits),
                             lambda r: run_route(r, *args))
    routes.record(x, weight, groups, w_bits, a_bits, route)
    return out if out is not None else run_route(route, *args)


def run_route(route, x, act, forms, weight, bias, stride, padding, dilation, groups, w_bits, out_scale, relu,
              out_hw) -> Tensor:
    """quant_conv2d's output through one route, from the quantised activations `act`."""
    conv = (stride, padding, dilation, groups)
    if route == "float":
        lv = weights.float_levels(forms, weight, w_bits, torch.float32)
        compute = routes.float_dtype(x.dtype, max(act.zp, act.qmax - act.zp), lv.l1max)
        if compute != torch.float32:
            lv = weights.float_levels(forms, weight, w_bits, compute)
        return float_conv(x, act, lv, bias, *conv, out_scale, relu, compute)
    if route == "depthwise":
        lv = weights.float_levels(forms, weight, w_bits, torch.float64)
        wscale = lv.scale if out_scale is None else lv.scale * out_scale.to(lv.scale)
        fac = act.scale * wscale.to(torch.float64)  # the epilogue's order: the same bits as sliced / gemm
        return torch.ops.pyeff.quant_conv_depthwise(act.digits, act.zp, lv.levels, fac, bias, list(stride),
                                                    list(padding), list(dilation), relu, x.dtype)
    if route == "direct":
        return direct_onednn(x, act, forms, weight, bias, *conv, w_bits, out_scale, relu)
    N, (K, _, KH, KW), (OH, OW) = x.shape[0], weight.shape, out_hw
    d = weights.digits(forms, weight, w_bits, groups)
    M = N * OH * OW
    if route == "sliced":
        acc, corr = sliced_onednn(act, forms, d, w_bits, *conv, M)
    else:
        acc, corr = int8_gemm(act, forms, d, w_bits, (KH, KW), *conv, M)
    wscale = d.scale if out_scale is None else d.scale * out_scale.to(d.scale)  # rides on the epilogue's scales
    rowsum = None
    if d.offset:
        ws = torch.ops.pyeff.quant_conv_window_sums if x.device.type == "cpu" else window_sums
        rowsum = ws(act.digits, zero_point_digits(act.zp, act.digits.shape[0]), groups, (KH, KW), stride, padding,
                    dilation)
    out = torch.ops.pyeff.quant_conv_epilogue(acc, corr, d.slices, rowsum, float(act.scale), wscale, bias,
                                              [N, K, OH, OW], x.dtype)
    return out.relu_() if relu else out
