"""The Triton backend: quantise + im2col and an int8 tl.dot GEMM (kernels/quant_conv.py), then the
same exact epilogue as the native one."""
import torch
from torch import Tensor

from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.quant_conv import weights
from pyeff.ops.quant_conv.reference import activation_levels, activation_params, fixed_range
from pyeff.ops.quant_conv.slicing import act_slices, window_sums, zero_point_digits


def run_triton(x, weight, bias, stride, padding, dilation, groups, w_bits, a_bits, a_range, out_scale, relu,
               forms: weights.WeightForms) -> Tensor:
    from pyeff.kernels import fake_quant as tfq
    from pyeff.kernels import quant_conv as tk

    N = x.shape[0]
    K, Cg, KH, KW = weight.shape
    OH, OW = conv_out_hw(x.shape[-2:], (KH, KW), stride, padding, dilation)
    scale, inv, zp_t, qmax = activation_params(x, a_bits, tfq.minmax if a_range is None else fixed_range(a_range))
    zp = int(zp_t.item())
    S_a = act_slices(a_bits)
    d = weights.digits(forms, weight, w_bits, groups)
    cols = d.stack.shape[0] // groups
    kd = Cg * KH * KW
    mats, colsum = weights.gemm_operands(forms, d, w_bits, groups, kd, cols)
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
    if d.offset:  # digits from the same levels, for the window sums of the 16-bit weight offset
        q = activation_levels(x, scale, inv, zp_t, qmax).to(torch.int64)
        digits = torch.stack([(q >> (8 * j)) & 255 for j in range(S_a)]).to(torch.uint8)
        digits = torch.stack([t.contiguous(memory_format=torch.channels_last) for t in digits])
        rowsum = window_sums(digits, zdig, groups, (KH, KW), stride, padding, dilation)
    wscale = d.scale if out_scale is None else d.scale * out_scale.to(d.scale)
    out = tk.epilogue(acc, corr, d.slices, rowsum, float(scale), wscale, bias, (N, K, OH, OW), x.dtype)
    return out.relu_() if relu else out
