"""Integer slicing: operands wider than 8 bits as stacks of byte digits, so that every GEMM is
int8 x int8 (or uint8 x int8) with int32 accumulation (the derivation is in the package docstring)."""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from pyeff.ops._shapes import conv_out_hw


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


def zero_point_digits(zp: int, slices: int) -> List[int]:
    return [(zp >> (8 * j)) & 255 for j in range(slices)]


def digit_max(qmax: int, j: int) -> int:
    return min(255, qmax >> (8 * j))


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
    OH, OW = conv_out_hw((H, W), kernel, stride, padding, dilation)
    total = None
    for kh in range(kernel[0]):
        for kw in range(kernel[1]):
            h0, w0 = kh * dilation[0], kw * dilation[1]
            t = a[:, :, h0:h0 + stride[0] * (OH - 1) + 1:stride[0], w0:w0 + stride[1] * (OW - 1) + 1:stride[1]]
            total = t.clone() if total is None else total.add_(t)
    return total.permute(0, 2, 3, 1).reshape(N * OH * OW, groups).to(torch.float64)
