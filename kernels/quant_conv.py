"""Triton kernels of pyeff.ops.quant_conv2d: quantise + im2col straight from the float input into
int8 GEMM columns (u - 128, byte digits for widths above 8 bits), and an int8 x int8 GEMM with
int32 accumulation on tl.dot. The dequantising epilogue combines slices in float64 with torch ops.
Launched with enable_fp_fusion=False so that the rounding matches fake_quant's."""
import torch
import triton
import triton.language as tl

from pyeff.ops._shapes import conv_out_hw


@triton.jit
def _im2col_kernel(x_ptr, out_ptr, pad_ptr, inv, zp, qmax, N, C, H, W, OH, OW, Cg, KW, Kd, M, S,
                   sh, sw, ph, pw, dh, dw, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # grid (row blocks over S*M, column blocks over Kd, groups); out is [G, S*M, Kd]
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    g = tl.program_id(2)
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    j = r // M
    m = r % M
    n = m // (OH * OW)
    oh = (m // OW) % OH
    ow = m % OW
    c = col % Cg
    kw = (col // Cg) % KW
    kh = col // (Cg * KW)
    ih = oh[:, None] * sh - ph + kh[None, :] * dh
    iw = ow[:, None] * sw - pw + kw[None, :] * dw
    valid = (r[:, None] < S * M) & (col[None, :] < Kd)
    inside = valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    offs = ((n[:, None] * C + g * Cg + c[None, :]) * H + ih) * W + iw
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    q = tl.floor(x * inv + zp + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), qmax).to(tl.int32)
    u = (q >> (8 * j[:, None])) & 255
    pad = tl.load(pad_ptr + j, mask=r < S * M, other=0)
    u = tl.where(inside, u, pad[:, None])
    tl.store(out_ptr + (g * S * M + r[:, None]) * Kd + col[None, :], (u - 128).to(tl.int8), mask=valid)


@triton.jit
def _int8_mm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0)
        b = tl.load(b_ptr + rk[:, None] * N + rn[None, :], mask=(rk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def im2col(x, inv, zp, qmax, slices, pad_digits, kernel, stride, padding, dilation, groups):
    """float x [N, C, H, W] -> int8 columns [G, S*M, C/G*kh*kw], columns ordered (kh, kw, c)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype).contiguous()
    N, C, H, W = x.shape
    KH, KW = kernel
    OH, OW = conv_out_hw((H, W), (KH, KW), stride, padding, dilation)
    Cg = C // groups
    Kd, M = Cg * KH * KW, N * OH * OW
    out = torch.empty((groups, slices * M, Kd), dtype=torch.int8, device=x.device)
    pads = torch.tensor(pad_digits, dtype=torch.int32, device=x.device)
    BM, BK = 32, 32
    grid = (triton.cdiv(slices * M, BM), triton.cdiv(Kd, BK), groups)
    _im2col_kernel[grid](x, out, pads, float(inv), float(zp), float(qmax), N, C, H, W, OH, OW, Cg, KW, Kd, M,
                         slices, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                         BLOCK_M=BM, BLOCK_K=BK, enable_fp_fusion=False)
    return out


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> int32 [M, N] (exact)."""
    a, b = a.contiguous(), b.contiguous()
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=torch.int32, device=a.device)
    BM, BN, BK = 64, 32, 32
    _int8_mm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](a, b, c, M, N, K, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK)
    return c


def epilogue(acc, corr, slices_w, rowsum, a_scale, w_scale, bias, out_shape, out_dtype):
    """The epilogue of pyeff::quant_conv_epilogue in float64 torch ops (exact integer combination,
    one rounding at the end)."""
    N, K, OH, OW = out_shape
    S_a = corr.shape[0]
    G = len(acc) // S_a
    Kg = K // G
    parts = []
    for g in range(G):
        v = None
        for j in range(S_a):
            a = acc[j * G + g].to(torch.float64)
            c = corr[j, g * slices_w * Kg:(g + 1) * slices_w * Kg].to(a.device)
            for l in range(slices_w):
                t = (a[:, l * Kg:(l + 1) * Kg] + c[l * Kg:(l + 1) * Kg]) * float(256 ** (j + l))
                v = t if v is None else v + t
        if rowsum is not None:
            v = v + 128.0 * rowsum[:, g:g + 1].to(v.device)
        parts.append(v)
    v = torch.cat(parts, dim=1)
    out = v * (a_scale * w_scale.to(v.device, torch.float64))
    if bias is not None:
        out = out + bias.to(torch.float64)
    # written into a channels_last tensor, not returned as a permuted view: autograd refuses in-place
    # ops (torch.relu_) on a view made inside the op
    result = torch.empty((N, K, OH, OW), dtype=out_dtype, device=out.device, memory_format=torch.channels_last)
    result.permute(0, 2, 3, 1).view(-1, K).copy_(out)
    return result
