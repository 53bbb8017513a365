"""Triton kernel of pyeff.ops.masked_conv2d: a direct convolution with one program per
(pixel block, output channel, sample). Programs of inactive (sample, output channel) pairs only
store zeros; active ones loop over the active input channels of their sample. Accumulates in
float32; any stride, padding, dilation and groups."""
import torch
import triton
import triton.language as tl

from pyeff.ops._shapes import conv_out_hw

_BLOCK = 128


@triton.jit
def _masked_conv2d_kernel(x_ptr, w_ptr, b_ptr, in_mask_ptr, out_mask_ptr, y_ptr,
                          C, K, H, W, OH, OW, sh, sw, ph, pw, dh, dw, Cg, Kg,
                          KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    pid_q = tl.program_id(0)
    k = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    q = pid_q * BLOCK + tl.arange(0, BLOCK)
    valid = q < OH * OW
    out_ptr = y_ptr + (n * K + k) * OH * OW + q
    active = tl.load(out_mask_ptr + n * K + k).to(tl.int32)
    if active != 0:
        oh = q // OW
        ow = q - oh * OW
        g = k // Kg
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_BIAS:
            acc += tl.load(b_ptr + k).to(tl.float32)
        for cl in range(0, Cg):
            c = g * Cg + cl
            if tl.load(in_mask_ptr + n * C + c).to(tl.int32) != 0:
                x_base = x_ptr + (n * C + c) * H * W
                w_base = w_ptr + (k * Cg + cl) * KH * KW
                for a in tl.static_range(KH):
                    ih = oh * sh - ph + a * dh
                    row_ok = valid & (ih >= 0) & (ih < H)
                    for b in tl.static_range(KW):
                        iw = ow * sw - pw + b * dw
                        ok = row_ok & (iw >= 0) & (iw < W)
                        xv = tl.load(x_base + ih * W + iw, mask=ok, other=0.0).to(tl.float32)
                        wv = tl.load(w_base + a * KW + b).to(tl.float32)
                        acc += xv * wv
        tl.store(out_ptr, acc.to(y_ptr.dtype.element_ty), mask=valid)
    else:
        tl.store(out_ptr, tl.zeros([BLOCK], dtype=y_ptr.dtype.element_ty), mask=valid)


def masked_conv2d(x: torch.Tensor, weight: torch.Tensor, bias, in_mask: torch.Tensor, out_mask: torch.Tensor,
                  stride, padding, dilation, groups: int) -> torch.Tensor:
    """x [N, C, H, W], weight [K, C / groups, kh, kw], masks bool [N, C] / [N, K]."""
    if x.dtype == torch.float64:
        raise TypeError("pyeff.kernels.masked_conv: the Triton kernel computes in float32; "
                        "use backend='native' or 'reference' for float64")
    x, weight = x.contiguous(), weight.contiguous()
    in_mask, out_mask = in_mask.contiguous(), out_mask.contiguous()
    n, c, h, w = x.shape
    k, _, kh, kw = weight.shape
    oh, ow = conv_out_hw((h, w), (kh, kw), stride, padding, dilation)
    y = torch.empty((n, k, oh, ow), dtype=x.dtype, device=x.device)
    if n == 0:
        return y
    b = bias.contiguous() if bias is not None else y  # never read without HAS_BIAS
    grid = (triton.cdiv(oh * ow, _BLOCK), k, n)
    _masked_conv2d_kernel[grid](x, weight, b, in_mask, out_mask, y, c, k, h, w, oh, ow,
                                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                                c // groups, k // groups, KH=kh, KW=kw, HAS_BIAS=bias is not None,
                                BLOCK=_BLOCK)
    return y
