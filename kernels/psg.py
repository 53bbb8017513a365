"""Triton kernel of the exact step of pyeff.ops.psg_conv2d_weight_grad: single entries of a
convolution's weight gradient, one program per listed entry. The program walks the N * OH * OW
output positions in blocks, multiplying grad_out by the input at the entry's tap (zero outside the
input), accumulates in float32 (float64 for float64) and reduces once at the end. Any stride,
padding, dilation and groups."""
import torch
import triton
import triton.language as tl

_BLOCK = 256


@triton.jit
def _psg_exact_entries_kernel(x_ptr, g_ptr, index_ptr, out_ptr, N, C, H, W, K, OH, OW, Cg, Kg, sh, sw, ph, pw, dh,
                              dw, KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    e = tl.program_id(0)
    flat = tl.load(index_ptr + e)
    taps = KH * KW
    k = flat // (Cg * taps)
    rest = flat % (Cg * taps)
    c = (k // Kg) * Cg + rest // taps
    i = (rest % taps) // KW
    j = rest % KW
    plane = OH * OW
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, N * plane, BLOCK):
        p = (start + tl.arange(0, BLOCK)).to(tl.int64)
        n = p // plane
        q = p - n * plane
        oh = q // OW
        ow = q - oh * OW
        ih = oh * sh - ph + i * dh
        iw = ow * sw - pw + j * dw
        ok = (p < N * plane) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        gv = tl.load(g_ptr + (n * K + k) * plane + q, mask=ok, other=0.0).to(ACC)
        xv = tl.load(x_ptr + ((n * C + c) * H + ih) * W + iw, mask=ok, other=0.0).to(ACC)
        acc += gv * xv
    tl.store(out_ptr + e, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty))


def psg_exact_entries(x: torch.Tensor, grad_out: torch.Tensor, index: torch.Tensor, weight_shape, stride, padding,
                      dilation, groups: int) -> torch.Tensor:
    """The weight gradient's entries at the flat indices `index` (int64, into weight_shape)."""
    x, grad_out, index = x.contiguous(), grad_out.contiguous(), index.contiguous()
    out = torch.empty(index.numel(), dtype=x.dtype, device=x.device)
    if index.numel() == 0:
        return out
    N, C, H, W = x.shape
    K, Cg, KH, KW = weight_shape
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    _psg_exact_entries_kernel[(index.numel(),)](
        x, grad_out, index, out, N, C, H, W, K, grad_out.shape[2], grad_out.shape[3], Cg, K // groups,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], KH=KH, KW=KW, BLOCK=_BLOCK, ACC=acc)
    return out
