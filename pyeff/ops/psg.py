"""pyeff.ops.psg_conv2d_weight_grad: E2-Train's predictive sign gradient (PSG) for a conv weight.

    exact      = torch.nn.grad.conv2d_weight(x, weight_shape, grad_out, stride, padding, dilation, groups)
    g_pred     = sx * sg * conv2d_weight(qx, qg)       (qx, qg: integer levels, sx, sg: their scales)
    uncertain  = |g_pred| <= threshold
    grad_weight = where(uncertain, exact, g_pred)

The predictor sees the operands at low precision: x at `x_bits` (4 in the paper), grad_out at `g_bits`
(16). Where it is confident (|g_pred| > threshold) its value, and so its sign, is the gradient; the
full-precision value decides only where it is not. threshold=0: the predictor everywhere except its
exact zeros; threshold=inf: the exact gradient everywhere.

Quantiser: pyeff's symmetric max-abs quantiser (`fake_quant(t, bits, scheme="sym")`, parameters from
`fake_quant.quant_params`), ONE scale per tensor for x and one for grad_out, so that the predictor
is a single integer GEMM over the whole batch: qx = clamp(floor(x / sx + 1/2), -(2^(b-1) - 1), 2^(b-1) - 1)
with sx = max|x| / (2^(b-1) - 1), and likewise for grad_out. qx * sx is exactly fake_quant's output.
The paper's reference quantises the input per sample; per-sample scales would turn the reduction
over the batch into one GEMM per sample (or a rescaling of grad_out per sample before it is
quantised). With one scale, a sample whose activations are much smaller than the batch's largest
gets fewer effective levels: its contribution to g_pred is coarser than in the paper.

The predictor's integer sum is exact in both backends (float64 sums of integers in the reference,
exact while N * OH * OW < 2^23 at 16 x 16 bits; int32 GEMM chunks summed in int64 natively), and
both scale it by the same float64 product sx * sg, so `uncertain` and the predictor entries agree
bit for bit. The exact entries agree up to the float rounding of conv2d_weight's summation order
(the native backend computes them on a subset of the output channels).

Native and triton backends (CPU and CUDA; plain PyTorch around torch._int_mm, plus an entries
kernel; the levels come from pyeff's compiled fake_quant_minmax / fake_quant_apply where they are
built, else from the same expression in PyTorch). The batch runs in steps of about STEP output positions, each step:
  1. quantise x to int8 levels in NHWC order (x_bits > 8: two int8 byte digits) and im2col them in
     int8 (columns ordered (kh, kw, c) per group; padding writes the digits of 0);
  2. quantise grad_out to levels laid out [K, N*OH*OW]; above 8 bits as two int8 digits
     q = 256 h + (l + 128), h = q >> 8 and l = (q & 255) - 128 (the unsigned low byte moved to int8),
     so every operand is int8. The offset 128 is corrected with the column sums of the x columns
     (an extra all-ones row of the GEMM's left operand) and, for x, with the row sums of grad_out;
  3. one torch._int_mm (int8 x int8 -> int32) per group and reduction chunk of at most 131064
     positions (|digit products| <= 2^14, so no chunk overflows int32); summed in int64.
Then the digits and offsets are combined in int64, scaled in float64, and
  4. the exact values, one of two ways (see ENTRY_COST): whole rows, one conv2d_weight on
     grad_out[:, rows] for the output channels holding an uncertain entry (per group, rows padded
     to the same count so that one grouped call serves every group that needs any); or single
     entries, pyeff::psg_exact_entries on the uncertain flat indices alone (C++ / CUDA kernel for
     "native", Triton for "triton"). None at all when nothing is uncertain; threshold=inf skips
     the predictor (every entry is uncertain).
On CUDA torch._int_mm needs more than 16 rows and a reduction and column count that are multiples
of 8: both operands are zero-padded (as pyeff.ops.quant_conv.native.int8_gemm does). The CUDA
path is the same Python code; its padded layout is tested on the CPU (gemm_alignment), and it
(with the CUDA entries kernel) has not run on a GPU yet (none on the development machines).

What is saved: the exact weight gradient costs one float GEMM of K x (C/groups * kh * kw) x
N*OH*OW; the predictor is an int8 GEMM of (slices_g * K + 1) x (slices_x * C/groups * kh * kw) x
N*OH*OW, and the exact GEMM then runs on the uncertain rows only (or, when few entries are
uncertain, a sum per entry). The saving is real when whole rows are certain or few entries are
uncertain; where uncertain entries are many and scattered over every row (measured at threshold 5e-5
for a 3x3 conv at realistic gradient scale: 7% of the entries, every row; docs/ops.md), every row
runs exactly and the predictor is extra work, as costly on an AMX CPU as oneDNN's fp32 weight
gradient. No autograd: the op computes a gradient.
"""
import math
import numbers
import os
from typing import List, Sequence

import torch
from torch import Tensor

from pyeff import _extension
from pyeff.ops import _backend
from pyeff.ops._checks import check_backend, check_bits, check_same_device, check_tensor
from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.fake_quant import minmax_reference, quant_params
from pyeff.ops.quant_conv.api import _pair

OP = "psg_conv2d_weight_grad"
DTYPES = (torch.float32, torch.float64)
# reduction positions per int32 GEMM: 131064 * 128 * 128 < 2^31 (and a multiple of 8 for CUDA)
CHUNK = 131064
# output positions (N*OH*OW) per step of the predictor's loop over the batch (measured: 4096-16384 alike)
STEP = 8192
DEVICES = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# the quantiser (shared) and the reference: plain PyTorch, the op's specification


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_finite(name: str, minmax: Tensor) -> None:
    # only where it costs no device synchronisation; on a GPU, NaN input propagates into the output
    if minmax.device.type == "cpu" and not bool(torch.isfinite(minmax).all()):
        raise ValueError(f"pyeff.ops.{OP}: {name} contains NaN or infinity; quantisation needs finite values")


def _minmax(t: Tensor) -> Tensor:
    """[2, 1] (min, max) of t in its compute dtype: minmax_reference's values in one pass (pyeff's
    compiled fake_quant_minmax where it is built for the device)."""
    if _compiled_quantiser(t.device):
        return torch.ops.pyeff.fake_quant_minmax(t, None)
    return torch.stack(torch.aminmax(t.to(_compute_dtype(t)))).view(2, 1)


def sym_params(t: Tensor, bits: int, name: str, minmax: Tensor = None):
    """(scale, inv_scale, qmax) of the symmetric per-tensor max-abs quantiser (fake_quant's
    scheme="sym"), as 1-element tensors of the compute dtype; `minmax` ([2, 1]: min, max) if known."""
    mm = minmax_reference(t, None) if minmax is None else minmax
    _check_finite(name, mm)
    scale, inv, _, _, qmax = quant_params(mm, bits, "sym")
    return scale, inv, qmax


def sym_levels(t: Tensor, bits: int, name: str):
    """(integer levels of t in its compute dtype, scale): q * scale == fake_quant(t, bits, scheme="sym")."""
    scale, inv, qmax = sym_params(t, bits, name)
    # fake_quant's apply_reference: floor(t * inv + zero_point + 1/2) with zero_point 0
    q = torch.floor(t.to(_compute_dtype(t)) * inv + 0.5).clamp(-qmax, qmax)
    return q, scale


def predictor_scale(sx: Tensor, sg: Tensor) -> Tensor:
    """The float64 factor that turns the integer sum into g_pred (the same in every backend)."""
    return sx.to(torch.float64) * sg.to(torch.float64)


def psg_conv2d_weight_grad_reference(x: Tensor, grad_out: Tensor, weight_shape: Sequence[int], stride=1, padding=0,
                                     dilation=1, groups: int = 1, *, x_bits: int = 4, g_bits: int = 16,
                                     threshold: float = 5e-5):
    """The specification of psg_conv2d_weight_grad (same arguments, less `backend`): the predictor as
    a float64 conv2d_weight of the integer levels (exact integer sums), the exact gradient as
    torch.nn.grad.conv2d_weight in x's dtype. Returns (grad_weight in x's dtype, uncertain bool)."""
    if x.shape[0] == 0:
        return x.new_zeros(tuple(weight_shape)), torch.ones(tuple(weight_shape), dtype=torch.bool, device=x.device)
    qx, sx = sym_levels(x, x_bits, "x")
    qg, sg = sym_levels(grad_out, g_bits, "grad_out")
    acc = torch.nn.grad.conv2d_weight(qx.double(), tuple(weight_shape), qg.double(), stride, padding, dilation, groups)
    g_pred = acc * predictor_scale(sx, sg)
    uncertain = g_pred.abs() <= threshold
    exact = torch.nn.grad.conv2d_weight(x, tuple(weight_shape), grad_out, stride, padding, dilation, groups)
    return torch.where(uncertain, exact, g_pred.to(x.dtype)), uncertain


# --------------------------------------------------------------------------------------------
# the native backend: int8 im2col + torch._int_mm predictor, exact gradient on uncertain rows

_TRACE = None


class tracing:
    """Context manager: `with tracing() as calls:` appends one dict per native call made inside:
    shapes, bits, threshold, `uncertain` (entries), `entries`, `exact_rows` (output channels whose
    exact gradient was computed, including rows that pad a group), `exact_entries` (entries
    computed singly instead), `positions` (N*OH*OW), `rows` (K), `predictor` (whether the predictor
    ran; not at threshold=inf)."""

    def __enter__(self):
        global _TRACE
        self._outer, _TRACE = _TRACE, []
        return _TRACE

    def __exit__(self, *exc):
        global _TRACE
        _TRACE = self._outer
        return False


def exact_weight_grad(x: Tensor, weight_shape, grad_out: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """The full-precision weight gradient (every exact value of the native backend comes from here)."""
    return torch.nn.grad.conv2d_weight(x, tuple(weight_shape), grad_out, stride, padding, dilation, groups)


def _levels(t: Tensor, inv: Tensor, qmax: int) -> Tensor:
    """The reference's levels floor(t * inv + 1/2) clamped to [-qmax, qmax], as floats in t's layout:
    pyeff's compiled fake_quant_apply with scale 1 and zero point 0 where it is built for the
    device (one pass; bit for bit fake_quant's rounding), else the same expression in PyTorch."""
    if _compiled_quantiser(t.device):
        one = torch.ones(1, dtype=inv.dtype, device=t.device)
        return torch.ops.pyeff.fake_quant_apply(t, one, inv, torch.zeros_like(one), -qmax, qmax, None, None)
    return torch.floor(t.to(_compute_dtype(t)) * inv + 0.5).clamp_(-qmax, qmax)


def _compiled_quantiser(device: torch.device) -> bool:
    """Whether pyeff's compiled fake_quant kernels (fake_quant_minmax / fake_quant_apply) serve `device`."""
    ok, _ = _backend.available("native", device)
    return ok and hasattr(torch.ops.pyeff, "fake_quant_apply") and hasattr(torch.ops.pyeff, "fake_quant_minmax")


def _digits(q: Tensor, bits: int):
    """Integer-valued float levels -> int8 digit planes [d_0, ...] and the offset o with
    q = sum_j 256^j d_j + o. Up to 8 bits the level itself; above, the unsigned low byte moved to
    int8 and the high byte: q = 256 * (q >> 8) + ((q & 255) - 128) + 128 (int16 -> int8 keeps the
    low byte, and 0x80 flips its top bit: l - 128)."""
    if bits <= 8:
        return [q.to(torch.int8)], 0
    qi = q.to(torch.int16)
    return [qi.to(torch.int8) ^ -128, (qi >> 8).to(torch.int8)], 128


def _wide(n_bytes: int) -> torch.dtype:
    """The widest integer type whose size divides n_bytes: the im2col copies move runs of C/groups
    bytes, and moving them as int32 / int64 words halves the copy time (measured)."""
    for size, dt in ((8, torch.int64), (4, torch.int32), (2, torch.int16)):
        if n_bytes % size == 0:
            return dt
    return torch.int8


def _x_planes(x: Tensor, inv: Tensor, qmax: int, bits: int, padding):
    """x's digit planes, zero-padded, in NHWC order: int8 [S, N, H + 2 ph, W + 2 pw, C], and the
    offset o (padding holds the digits of the level 0)."""
    N, C, H, W = x.shape
    digits, offset = _digits(_levels(x, inv, qmax), bits)
    fills = [0] if offset == 0 else [-128, 0]  # 0 = 256 * 0 + (-128) + 128
    xp = torch.empty((len(digits), N, H + 2 * padding[0], W + 2 * padding[1], C), dtype=torch.int8,
                     device=x.device)
    for s, (d, fill) in enumerate(zip(digits, fills)):
        if padding[0] or padding[1]:
            xp[s].fill_(fill)
        xp[s, :, padding[0]:padding[0] + H, padding[1]:padding[1] + W].copy_(d.permute(0, 2, 3, 1))
    return xp, offset


def _im2col(xp: Tensor, kernel, stride, dilation, groups: int, out_hw, rows: int, cols: int) -> Tensor:
    """int8 columns [G, rows, S, cols] of the padded digit planes [S, N, Hp, Wp, C]: row m = (n, oh, ow),
    column (kh, kw, c) of group g for digit plane s; rows past N*OH*OW and columns past
    kh*kw*C/G are zero (CUDA's GEMM alignment). One strided copy per kernel tap."""
    S, N, _, _, C = xp.shape
    KH, KW = kernel
    OH, OW = out_hw
    Cg, M = C // groups, N * OH * OW
    Kd = KH * KW * Cg
    buf = torch.empty((groups, rows, S, cols), dtype=torch.int8, device=xp.device)
    if rows > M or cols > Kd:
        buf.zero_()
    dt = _wide(Cg)
    w = torch.empty((), dtype=dt).element_size()
    core = buf.view(dt)[:, :M, :, :Kd // w].view(groups, N, OH, OW, S, KH, KW, Cg // w)
    src = xp.view(dt)
    for i in range(KH):
        h0 = i * dilation[0]
        for j in range(KW):
            w0 = j * dilation[1]
            win = src[:, :, h0:h0 + stride[0] * (OH - 1) + 1:stride[0], w0:w0 + stride[1] * (OW - 1) + 1:stride[1]]
            core[:, :, :, :, :, i, j, :].copy_(win.reshape(S, N, OH, OW, groups, Cg // w).permute(4, 1, 2, 3, 0, 5))
    return buf


def _g_operand(grad_out: Tensor, inv: Tensor, qmax: int, bits: int, groups: int, rows: int, cols: int,
               row_sums: bool):
    """grad_out's levels as the GEMM's left operand [G, rows, cols] int8: per group the digit planes
    of its Kg output channels over the positions (n, oh, ow), then (above 8 bits) a row of ones that
    sums the x columns; padding zero. Returns (operand, slices, offset, the row sums of the levels
    [G, Kg] int64 if `row_sums`, else None)."""
    N, K, OH, OW = grad_out.shape
    M, Kg = N * OH * OW, K // groups
    q = _levels(grad_out, inv, qmax)
    # [G, Kg, N, OH*OW] views of the levels and of the operand's rows
    qt = q.reshape(N, groups, Kg, OH * OW).permute(1, 2, 0, 3)
    written = Kg if bits <= 8 else 2 * Kg + 1
    a = torch.empty((groups, rows, cols), dtype=torch.int8, device=grad_out.device)
    if rows > written or cols > M:
        a.zero_()

    def plane(i):
        return a[:, i * Kg:(i + 1) * Kg, :M].view(groups, Kg, N, OH * OW)

    if bits <= 8:
        plane(0).copy_(qt)
        sums = qt.sum((2, 3), dtype=torch.float64).to(torch.int64) if row_sums else None
        return a, 1, 0, sums
    qi = torch.empty((groups, Kg, N, OH * OW), dtype=torch.int16, device=grad_out.device)
    qi.copy_(qt)
    torch.bitwise_xor(qi.to(torch.int8), -128, out=plane(0))
    plane(1).copy_(qi >> 8)
    a[:, 2 * Kg, :M] = 1
    return a, 2, 128, qi.view(groups, Kg, M).sum(-1, dtype=torch.int64) if row_sums else None


def _gemm(a: Tensor, b: Tensor) -> Tensor:
    """a [R, L] @ b [L, J] (int8) as int64, in int32 chunks of at most CHUNK reduction positions."""
    L = a.shape[1]
    if L <= CHUNK:
        return torch._int_mm(a, b).to(torch.int64)
    acc = None
    for c0 in range(0, L, CHUNK):
        c1 = min(L, c0 + CHUNK)
        part = torch._int_mm(a[:, c0:c1].contiguous(), b[c0:c1]).to(torch.int64)
        acc = part if acc is None else acc.add_(part)
    return acc


def gemm_alignment(device: torch.device) -> bool:
    """Whether torch._int_mm's operands must be padded on `device`: cuBLASLt's int8 GEMM wants the
    reduction and column counts multiples of 8 and more than 16 rows (the tests also run the padded
    layout on the CPU through this function)."""
    return device.type == "cuda"


def predictor(x: Tensor, grad_out: Tensor, weight_shape, stride, padding, dilation, groups: int, x_bits: int,
              g_bits: int) -> Tensor:
    """g_pred in float64 [K, C/groups, kh, kw] from int8 GEMMs; bitwise equal to the reference's.
    The batch runs in steps of about STEP output positions: the quantised operands of one step
    stay in cache and the allocator reuses their memory from step to step (fresh buffers the size
    of the whole im2col cost more in page faults than the GEMM itself: measured)."""
    K, Cg, KH, KW = weight_shape
    N, (OH, OW) = x.shape[0], grad_out.shape[-2:]
    Kg, Kd = K // groups, KH * KW * Cg
    sx, inv_x, qx_max = sym_params(x, x_bits, "x", _minmax(x))
    sg, inv_g, qg_max = sym_params(grad_out, g_bits, "grad_out", _minmax(grad_out))
    aligned = gemm_alignment(x.device)
    cols = -(-Kd // 8) * 8 if aligned else Kd
    g_slices = 1 if g_bits <= 8 else 2
    a_rows = g_slices * Kg + (1 if g_bits > 8 else 0)
    a_pad = max(a_rows, 17) if aligned else a_rows
    step = max(1, STEP // (OH * OW))  # samples per step
    acc = gsum = None
    ox = og = 0
    for n0 in range(0, N, step):
        xs, gs = x[n0:n0 + step], grad_out[n0:n0 + step]
        m = xs.shape[0] * OH * OW
        rows = -(-m // 8) * 8 if aligned else m
        xp, ox = _x_planes(xs, inv_x, qx_max, x_bits, padding)
        b = _im2col(xp, (KH, KW), stride, dilation, groups, (OH, OW), rows, cols)
        del xp
        a, _, og, gs_sum = _g_operand(gs, inv_g, qg_max, g_bits, groups, a_pad, rows, ox != 0)
        S = b.shape[2]
        part = torch.stack([_gemm(a[g], b[g].view(rows, S * cols)) for g in range(groups)]) if groups > 1 \
            else _gemm(a[0], b[0].view(rows, S * cols)).unsqueeze(0)
        acc = part if acc is None else acc.add_(part)
        if gs_sum is not None:
            gsum = gs_sum if gsum is None else gsum.add_(gs_sum)
        del a, b
    M = N * OH * OW
    acc = acc.view(groups, a_pad, S, cols)[:, :, :, :Kd]
    total = None
    for i in range(g_slices):
        for j in range(S):
            part = acc[:, i * Kg:(i + 1) * Kg, j] * (256 ** (i + j))
            total = part if total is None else total.add_(part)
    if og:  # grad_out's offset times the column sums of x: the ones row
        colsum = acc[:, g_slices * Kg, 0].clone()
        for j in range(1, S):
            colsum.add_(acc[:, g_slices * Kg, j] * (256 ** j))
        total.add_(colsum.mul_(og).view(groups, 1, Kd))
    if ox:  # x's offset times the row sums of grad_out's digit part (grad_out - og)
        total.add_(((gsum - og * M) * ox + og * ox * M).view(groups, Kg, 1))
    g_pred = total.view(K, Kd).to(torch.float64).mul_(predictor_scale(sx, sg))
    return g_pred.view(K, KH, KW, Cg).permute(0, 3, 1, 2).contiguous()


def run_native(x: Tensor, grad_out: Tensor, weight_shape, stride, padding, dilation, groups: int, x_bits: int,
               g_bits: int, threshold: float, backend: str = "native"):
    K = weight_shape[0]
    Kg = K // groups
    mode = exact_mode()
    if math.isinf(threshold):  # every entry uncertain: the exact gradient, nothing else
        for t, name in ((x, "x"), (grad_out, "grad_out")):  # the quantiser's NaN / infinity error all the same
            _check_finite(name, _minmax(t))
        uncertain = torch.ones(tuple(weight_shape), dtype=torch.bool, device=x.device)
        grad = exact_weight_grad(x, weight_shape, grad_out, stride, padding, dilation, groups)
        _record(x, grad_out, weight_shape, groups, x_bits, g_bits, threshold, uncertain, K, False)
        return grad, uncertain
    g_pred = predictor(x, grad_out, weight_shape, stride, padding, dilation, groups, x_bits, g_bits)
    uncertain = g_pred.abs() <= threshold
    grad = g_pred.to(x.dtype)
    need, per_group, r, exact_rows, exact_entries = _plan(uncertain, groups, x.device, backend, mode)
    if exact_entries:
        idx = uncertain.flatten().nonzero().flatten()  # ascending flat indices
        grad.view(-1)[idx] = _entries_kernel(x.device, backend)(x, grad_out, idx, list(weight_shape), list(stride),
                                                                list(padding), list(dilation), groups)
    elif exact_rows == K:  # every row: the full exact gradient
        exact = exact_weight_grad(x, weight_shape, grad_out, stride, padding, dilation, groups)
        grad = torch.where(uncertain, exact, grad)
    elif exact_rows:
        active = per_group.nonzero().flatten()  # groups with a row to compute
        A = active.numel()
        # per active group its needed rows first, filled up to r with others of the group
        order = torch.sort((~need[active]).to(torch.int8), dim=1, stable=True).indices[:, :r]
        idx = (active.view(A, 1) * Kg + order).flatten()
        Cg = weight_shape[1]
        xs = x if A == groups else x.unflatten(1, (groups, Cg))[:, active].flatten(1, 2)
        exact = exact_weight_grad(xs, (A * r, *weight_shape[1:]), grad_out[:, idx], stride, padding, dilation, A)
        grad[idx] = torch.where(uncertain[idx], exact, grad[idx])
    _record(x, grad_out, weight_shape, groups, x_bits, g_bits, threshold, uncertain, exact_rows, True, exact_entries)
    return grad, uncertain


# The exact step computes either whole rows of the weight gradient (one conv2d_weight GEMM on the
# output channels holding an uncertain entry) or only the uncertain entries (psg_exact_entries: a
# direct sum per entry from the NCHW tensors, no GEMM). Per multiply-add the GEMM is far more
# efficient, so the entries kernel runs only when few entries are uncertain:
#   uncertain entries * ENTRY_COST <= entries of the rows the GEMM would compute.
# Measured on the 2-core Xeon (N=128, 3x3): an entry costs 15-50x its share of the full GEMM at 64
# channels (16x16 and 8x8 planes) and 4-10x at 16 channels (32x32), so 32 keeps the entries kernel
# to where it wins (at 1% uncertain: 4.1 ms against 16 ms for every row at 64 channels, 16x16).
ENTRY_COST = 32
EXACT_MODES = ("auto", "rows", "entries")


def exact_mode() -> str:
    """PYEFF_PSG_EXACT: auto (the cost rule above), rows (always whole rows) or entries (always the
    entries kernel where the backend has one)."""
    mode = (os.environ.get("PYEFF_PSG_EXACT") or "auto").lower()
    if mode not in EXACT_MODES:
        raise ValueError(f"PYEFF_PSG_EXACT={mode!r}: expected one of {', '.join(EXACT_MODES)}")
    return mode


def _plan(uncertain: Tensor, groups: int, device: torch.device, backend: str, mode: str):
    """How the exact step handles an uncertain mask: (need [G, Kg] rows with an uncertain entry,
    their count per group, the most in a group r, exact_rows, exact_entries); one of the last two
    is 0. Rows are padded per group to r, so exact_rows = r x groups holding any."""
    K = uncertain.shape[0]
    need = uncertain.view(groups, K // groups, -1).any(2)
    per_group = need.sum(1)
    r = int(per_group.max())
    if r == 0:
        return need, per_group, 0, 0, 0
    rows = r * int((per_group > 0).sum())
    u = int(uncertain.sum())
    if _entries_kernel(device, backend) is not None and _use_entries(mode, u, rows, uncertain[0].numel()):
        return need, per_group, r, 0, u
    return need, per_group, r, rows, 0


def exact_work(uncertain: Tensor, groups: int, device: torch.device, backend=None) -> tuple[int, int]:
    """(exact_rows, exact_entries): what the op's exact step computes for this uncertain mask on
    `device` with `backend` (the same rule the op applies; for layers that account for their work)."""
    b = resolve(device, backend)
    if b == "reference":
        return uncertain.shape[0], 0
    return _plan(uncertain, groups, device, b, exact_mode())[3:]


def _use_entries(mode: str, uncertain: int, rows: int, row_len: int) -> bool:
    if mode != "auto":
        return mode == "entries"
    return uncertain * ENTRY_COST <= rows * row_len


def _entries_kernel(device: torch.device, backend: str):
    """The psg_exact_entries kernel of a backend on a device, or None (then whole rows only)."""
    if backend == "triton":
        from pyeff.kernels.psg import psg_exact_entries
        return psg_exact_entries
    if _backend.available("native", device)[0] and hasattr(torch.ops.pyeff, "psg_exact_entries"):
        return torch.ops.pyeff.psg_exact_entries
    return None


if _extension.loaded() and hasattr(torch.ops.pyeff, "psg_exact_entries"):
    @torch.library.register_fake("pyeff::psg_exact_entries")
    def _(x, grad_out, index, weight_shape, stride, padding, dilation, groups):
        return x.new_empty((index.shape[0],))


def psg_exact_entries_reference(x: Tensor, grad_out: Tensor, index: Tensor, weight_shape, stride, padding,
                                dilation, groups: int) -> Tensor:
    """What every psg_exact_entries kernel computes: the exact weight gradient at flat indices `index`."""
    return exact_weight_grad(x, weight_shape, grad_out, stride, padding, dilation, groups).flatten()[index]


def _record(x, grad_out, weight_shape, groups, x_bits, g_bits, threshold, uncertain, exact_rows, ran_predictor,
            exact_entries=0):
    if _TRACE is not None:
        _TRACE.append({"x": tuple(x.shape), "weight": tuple(weight_shape), "groups": groups, "x_bits": x_bits,
                       "g_bits": g_bits, "threshold": threshold, "uncertain": int(uncertain.sum()),
                       "entries": uncertain.numel(), "exact_rows": exact_rows, "rows": weight_shape[0],
                       "exact_entries": exact_entries, "positions": grad_out.shape[0] * grad_out[0, 0].numel(),
                       "predictor": ran_predictor})


# --------------------------------------------------------------------------------------------
# backend choice, the torch op


def resolve(device: torch.device, backend) -> str:
    """"native" (CPU or CUDA: the predictor around torch._int_mm, the exact entries from pyeff's
    compiled psg_exact_entries where it is built, else whole exact rows), "triton" (the same with the
    Triton entries kernel: CUDA, or the CPU under TRITON_INTERPRET=1) or "reference".
    PYEFF_BACKEND_PSG_CONV2D_WEIGHT_GRAD / PYEFF_BACKEND choose when `backend` is auto."""
    choice = backend
    if choice in (None, "", "auto"):
        choice = os.environ.get(f"PYEFF_BACKEND_{OP.upper()}")
        if not choice:  # a global PYEFF_BACKEND=triton means auto where Triton cannot run
            choice = os.environ.get("PYEFF_BACKEND")
            if choice and choice.lower() == "triton" and not _backend.available("triton", device)[0]:
                choice = None
    choice = (choice or "auto").lower()
    if choice not in _backend.BACKENDS:
        raise ValueError(f"pyeff.ops.{OP}: unknown backend {choice!r}; expected one of auto, native, triton, "
                         "reference")
    if choice in ("native", "triton") and device.type not in DEVICES:
        raise RuntimeError(f"pyeff.ops.{OP}: backend {choice!r} is not usable on {device}: it needs a CPU or CUDA "
                           "tensor (torch._int_mm)")
    if choice == "triton":
        ok, why = _backend.available("triton", device)
        if not ok:
            raise RuntimeError(f"pyeff.ops.{OP}: backend 'triton' is not usable on {device}: {why}")
    if choice == "auto":  # measured: the C++ / CUDA entries kernel (or whole rows) ahead of Triton's
        return "native" if device.type in DEVICES else "reference"
    return choice


def run(x, grad_out, weight_shape, stride, padding, dilation, groups, x_bits, g_bits, threshold, backend):
    if x.shape[0] == 0:
        return x.new_zeros(tuple(weight_shape)), torch.ones(tuple(weight_shape), dtype=torch.bool, device=x.device)
    if backend == "reference":
        return psg_conv2d_weight_grad_reference(x, grad_out, weight_shape, stride, padding, dilation, groups,
                                                x_bits=x_bits, g_bits=g_bits, threshold=threshold)
    return run_native(x, grad_out, weight_shape, stride, padding, dilation, groups, x_bits, g_bits, threshold,
                      backend)


@torch.library.custom_op(f"pyeff::{OP}", mutates_args=())
def psg_conv2d_weight_grad_op(x: Tensor, grad_out: Tensor, weight_shape: List[int], stride: List[int],
                              padding: List[int], dilation: List[int], groups: int, x_bits: int, g_bits: int,
                              threshold: float, backend: str) -> tuple[Tensor, Tensor]:
    return run(x, grad_out, weight_shape, stride, padding, dilation, groups, x_bits, g_bits, threshold,
               resolve(x.device, backend))


@psg_conv2d_weight_grad_op.register_fake
def _(x, grad_out, weight_shape, stride, padding, dilation, groups, x_bits, g_bits, threshold, backend):
    return x.new_empty(tuple(weight_shape)), x.new_empty(tuple(weight_shape), dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# public API


def _weight_shape(weight_shape) -> List[int]:
    if isinstance(weight_shape, torch.Tensor) or not isinstance(weight_shape, (tuple, list, torch.Size)):
        raise TypeError(f"pyeff.ops.{OP}: weight_shape must be a tuple of 4 ints (K, C/groups, kh, kw), "
                        f"got {type(weight_shape).__name__}")
    if len(weight_shape) != 4:
        raise ValueError(f"pyeff.ops.{OP}: weight_shape must have 4 entries (K, C/groups, kh, kw), got "
                         f"{tuple(weight_shape)}")
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in weight_shape):
        raise TypeError(f"pyeff.ops.{OP}: weight_shape must hold ints, got {tuple(weight_shape)}")
    if any(int(v) < 1 for v in weight_shape):
        raise ValueError(f"pyeff.ops.{OP}: weight_shape entries must be >= 1, got {tuple(weight_shape)}")
    return [int(v) for v in weight_shape]


def _threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"pyeff.ops.{OP}: threshold must be a real number >= 0 (inf allowed), got {threshold!r}")
    t = float(threshold)
    if math.isnan(t) or t < 0:
        raise ValueError(f"pyeff.ops.{OP}: threshold must be >= 0 (inf allowed) and not NaN, got {threshold!r}")
    return t


def psg_conv2d_weight_grad(x: Tensor, grad_out: Tensor, weight_shape: Sequence[int], stride=1, padding=0,
                           dilation=1, groups: int = 1, *, x_bits: int = 4, g_bits: int = 16,
                           threshold: float = 5e-5, backend=None):
    """E2-Train's predictive sign gradient of a conv2d weight: (grad_weight, uncertain).

    The predictor computes the weight gradient from x quantised to `x_bits` and grad_out to
    `g_bits` (symmetric max-abs, one scale per tensor; see pyeff.ops.psg); `uncertain` =
    |g_pred| <= threshold; grad_weight = where(uncertain, exact, g_pred), with exact =
    torch.nn.grad.conv2d_weight(x, weight_shape, grad_out, stride, padding, dilation, groups).

    Args:
        x: the conv's input [N, C, H, W], float32 or float64.
        grad_out: the gradient of its output [N, K, OH, OW], same dtype and device as x.
        weight_shape: (K, C / groups, kh, kw).
        stride, padding, dilation: int or pair, as in F.conv2d (padding >= 0, no strings).
        groups: divides C and K.
        x_bits, g_bits: 2-16 (the paper: 4 and 16).
        threshold: >= 0, inf allowed (0: the predictor everywhere except its zeros; inf: exact everywhere).
        backend: "auto", "native", "triton" or "reference" (PYEFF_BACKEND_PSG_CONV2D_WEIGHT_GRAD /
            PYEFF_BACKEND).

    Returns (grad_weight [K, C/groups, kh, kw] in x's dtype, uncertain: bool of the same shape).
    The native and triton backends compute the predictor with int8 GEMMs (torch._int_mm), then the
    exact values either for the output channels holding an uncertain entry (one GEMM) or, when few
    entries are uncertain, for those entries alone (the psg_exact_entries kernel: C++ / CUDA, or
    Triton); PYEFF_PSG_EXACT=rows|entries forces one.

    Example:
        >>> x, g = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8) * 1e-3
        >>> gw, unc = psg_conv2d_weight_grad(x, g, (4, 3, 3, 3), padding=1, threshold=1e-3)
        >>> gw.shape, unc.dtype
        (torch.Size([4, 3, 3, 3]), torch.bool)
    """
    check_tensor(OP, "x", x, dtypes=DTYPES)
    check_tensor(OP, "grad_out", grad_out, dtypes=DTYPES)
    if x.dim() != 4:
        raise ValueError(f"pyeff.ops.{OP}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if grad_out.dim() != 4:
        raise ValueError(f"pyeff.ops.{OP}: grad_out must be 4-D [N, K, OH, OW], got shape {tuple(grad_out.shape)}")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"pyeff.ops.{OP}: grad_out has dtype {grad_out.dtype} but x has {x.dtype}; they must match")
    check_same_device(OP, x=x, grad_out=grad_out)
    weight_shape = _weight_shape(weight_shape)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"pyeff.ops.{OP}: groups must be a positive integer, got {groups!r}")
    groups = int(groups)
    K, Cg = weight_shape[:2]
    if K % groups:
        raise ValueError(f"pyeff.ops.{OP}: weight_shape[0]={K} output channels are not divisible by groups={groups}")
    if x.shape[1] != Cg * groups:
        raise ValueError(f"pyeff.ops.{OP}: x has {x.shape[1]} channels but weight_shape expects {Cg} x "
                         f"groups={groups} = {Cg * groups}")
    stride, padding, dilation = (_pair(OP, "stride", stride, 1), _pair(OP, "padding", padding, 0),
                                 _pair(OP, "dilation", dilation, 1))
    x_bits = check_bits(OP, "x_bits", x_bits, 2, 16)
    g_bits = check_bits(OP, "g_bits", g_bits, 2, 16)
    threshold = _threshold(threshold)
    OH, OW = conv_out_hw(x.shape[-2:], weight_shape[-2:], stride, padding, dilation)
    if OH < 1 or OW < 1:
        raise ValueError(f"pyeff.ops.{OP}: x's {tuple(x.shape[-2:])} pixels (padded by {padding}) are fewer than "
                         f"the dilated kernel {tuple(weight_shape[-2:])} needs")
    expected = (x.shape[0], K, OH, OW)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"pyeff.ops.{OP}: grad_out has shape {tuple(grad_out.shape)}; the conv of x "
                         f"{tuple(x.shape)} with weight_shape {tuple(weight_shape)} (stride {stride}, padding "
                         f"{padding}, dilation {dilation}) has output shape {expected}")
    check_backend(OP, backend)
    backend = backend or "auto"
    if torch.compiler.is_compiling():
        return psg_conv2d_weight_grad_op(x, grad_out, weight_shape, stride, padding, dilation, groups, x_bits,
                                         g_bits, threshold, backend)
    # eager: the kernels directly (the custom op's dispatch costs ~0.1 ms a call)
    return run(x, grad_out, weight_shape, stride, padding, dilation, groups, x_bits, g_bits, threshold,
               resolve(x.device, backend))
