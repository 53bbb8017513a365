"""Which route the native CPU backend takes: decided here and nowhere else.

  "direct": one oneDNN int8 convolution with the dequantisation, bias and ReLU fused (<= 8 bits
            both, float32-exact output: not for float64 inputs);
  "sliced": one oneDNN int8 convolution per activation byte slice with unit scales, combined by
            pyeff's epilogue; needs every slice accumulator below 2^24, exact in oneDNN's float32
            output (checked from the weights' L1 norms and the zero-point digits);
  "gemm":   pyeff's im2col of the digits, at::_int_mm (int32 accumulation) and epilogue: exact in
            float64 for every width; with "float", the only routes without VNNI/AMX (where oneDNN
            halves int8 weights to dodge 16-bit saturation, which is not exact) or oneDNN;
  "depthwise": pyeff's C++ depthwise kernel (groups == channels): the integer sum over each window
            in float64 (exact for every width), scales, bias and ReLU fused; the fixed rules' first
            choice for depthwise convolutions above 8 bits, where oneDNN's int8 slices are slow;
  "float":  the integer convolution sum (q - zp) * w_level as a float convolution (F.conv2d) on
            integer-valued tensors: exact in float32 while every partial sum stays below 2^24, else
            in float64 (below 2^53: always, for 16-bit operands). Fast where oneDNN's int8 kernels
            are weak: depthwise, tiny planes, wide operands.
`candidates` lists the routes that are exact for the operands (oneDNN's only where its geometry is
safe). By default the fixed rules take the first candidate. With PYEFF_QUANT_CONV_AUTOTUNE=1 the
choice is measured (`pick`): the first call of a shape times each candidate and keeps the fastest
for that shape in this process (off by default: see autotune_enabled).
PYEFF_QUANT_CONV_CPU_PATH=direct|sliced|gemm|depthwise|float forces a route where it is exact (tests,
benchmarks); auto and onednn leave the choice to the rules or the measurement. `tracing()` shows
which route each call took.
"""
import functools
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from pyeff.ops._shapes import conv_out_hw
from pyeff.ops.quant_conv.reference import activation_params, fixed_range
from pyeff.ops.quant_conv.slicing import act_slices, digit_max, zero_point_digits
from pyeff.ops.quant_conv.weights import WeightForms, digits

CPU_PATH_ENV = "PYEFF_QUANT_CONV_CPU_PATH"
CPU_PATHS = ("auto", "onednn", "direct", "sliced", "gemm", "depthwise", "float")
ROUTES = ("direct", "sliced", "gemm", "depthwise", "float")
_SMALL_M = 1024  # output positions up to which gemm beats sliced above 8 bits (bench/quant_conv_space)
_EXACT_F32 = 1 << 24  # integers below this are exact in float32


@functools.lru_cache(maxsize=None)
def cpu_has_int8_dot() -> bool:
    """True where oneDNN's int8 kernels are exact: AVX512-VNNI, AVX-VNNI or AMX-INT8."""
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
def onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qconv2d_pointwise") \
        and torch.backends.mkldnn.is_available()


def _forced() -> str:
    forced = os.environ.get(CPU_PATH_ENV, "auto").lower()
    if forced not in CPU_PATHS:
        raise ValueError(f"pyeff.ops.quant_conv2d: {CPU_PATH_ENV} must be one of {', '.join(CPU_PATHS)}, "
                         f"got {forced!r}")
    return forced


def _onednn_allowed() -> bool:
    return _forced() not in ("gemm", "depthwise", "float") and cpu_has_int8_dot() and onednn_available()


def float_dtype(x_dtype: torch.dtype, amax: int, l1max: int) -> torch.dtype:
    """The float type in which the float route's convolution is exact: every partial sum is an
    integer of magnitude <= amax * l1max (activation range times the largest filter L1 norm of the
    weight levels); float32 holds integers below 2^24 exactly, float64 below 2^53 (always, for
    16-bit operands and reductions of up to 2^17)."""
    return torch.float32 if x_dtype != torch.float64 and amax * l1max < _EXACT_F32 else torch.float64


def _single_slice(x_dtype: torch.dtype, w_bits: int, a_bits: int) -> bool:
    return a_bits <= 8 and w_bits <= 8 and x_dtype != torch.float64


@functools.lru_cache(maxsize=4096)
def _windows_reach_input(size: int, kernel: int, stride: int, padding: int, dilation: int, out: int) -> bool:
    """Whether every output window along one axis has a tap on the input (not only on padding)."""
    for o in range(out):
        first = o * stride - padding
        # the taps first + k * dilation, k < kernel: is one of them in [0, size)?
        k = 0 if first >= 0 else (-first + dilation - 1) // dilation  # the first tap at or after 0
        if k >= kernel or first + k * dilation >= size:
            return False
    return True


def onednn_geometry_ok(in_hw, kernel, stride, padding, dilation, out_hw) -> bool:
    """False where oneDNN's int8 convolution is not safe (found by tests/test_fuzz_quant_conv.py;
    pyeff's GEMM route is exact there):
    - an output window that sees only padding (padding as wide as the dilated kernel, or a dilated
      kernel stepping over a tiny input): it crashed (segfault) on tiny inputs with stride /
      padding / dilation mixed per axis;
    - a single output along a strided axis: with 2-3 taps there and enough taps along the other
      axis (2x3, 3x3, 4x2 kernels seen) it returned garbage (uninitialised values, different from
      run to run); no tap count was found safe for all kernels, so every such plane takes gemm."""
    for a in range(2):
        if not _windows_reach_input(int(in_hw[a]), int(kernel[a]), int(stride[a]), int(padding[a]),
                                    int(dilation[a]), int(out_hw[a])):
            return False
        if out_hw[a] == 1 and stride[a] > 1:
            return False
    return True


def onednn_groups_ok(groups: int, outputs_per_group: int) -> bool:
    """False where oneDNN's int8 grouped convolution is not trusted: more than one group and more
    than 16 outputs per group (a channel multiplier, or the sliced route's two stacked weight
    digits). Found by tests/test_fuzz_quant_conv.py; in sweeps of 50,000 shapes it returned wrong
    values only there, mostly with 1-3, 5-7 or 9 channels per group, but also once with 8 (34
    stacked outputs per group, a 2x2 kernel); one group, or 16 outputs per group or fewer, never
    failed. The cause is not known, so the rule is the whole region."""
    return not (groups > 1 and outputs_per_group > 16)


def sliced_ok(channels_per_group: int, stride) -> bool:
    """False where the sliced route's oneDNN convolutions (unit scales, an input zero point) are not
    exact: depthwise with a width stride returned wrong accumulators on one thread
    (torch.set_num_threads(1); found by tests/test_fuzz_quant_conv.py)."""
    return not (channels_per_group == 1 and stride[1] > 1)


def candidates(x_dtype: torch.dtype, w_bits: int, a_bits: int, zp: int, qmax: int, l1max,
               geometry_ok: bool = True, slices_ok: bool = True, depthwise: bool = False,
               out_positions: int = 1 << 30) -> list:
    """The routes that are exact for these operands, fastest-first by the fixed rules. `l1max()`:
    the weights' largest stacked-filter L1 norm, asked only when the sliced route is in question
    (it needs the digit pack). `geometry_ok`: onednn_geometry_ok of the convolution; `slices_ok`:
    sliced_ok; `depthwise`: one input channel per group (the depthwise route applies);
    `out_positions`: N * OH * OW. gemm and float are exact everywhere, depthwise wherever it
    applies. The order is the one measured fastest in bench/quant_conv_space.py
    (docs/quant_conv.md): above 8 bits the depthwise kernel first where it applies, and gemm
    ahead of sliced for a few output positions (oneDNN's per-slice calls cost more than the
    products there)."""
    wide = not _single_slice(x_dtype, w_bits, a_bits)
    out = ["depthwise"] if depthwise and wide else []
    sliced = False
    if geometry_ok and _onednn_allowed():
        if not wide:
            out.append("direct")
        elif slices_ok:
            amax = max(max(z, digit_max(qmax, j) - z)
                       for j, z in enumerate(zero_point_digits(zp, act_slices(a_bits))))
            sliced = amax * l1max() < _EXACT_F32
    if sliced:
        out += ["gemm", "sliced"] if out_positions <= _SMALL_M else ["sliced", "gemm"]
    else:
        out.append("gemm")
    if depthwise and not wide:
        out.append("depthwise")
    return out + ["float"]


def conv_candidates(x: Tensor, weight_shape, stride, padding, dilation, out_hw, w_bits: int, a_bits: int, zp: int,
                    qmax: int, l1max) -> list:
    """`candidates` for one convolution: its oneDNN geometry, slice safety, depthwise-ness and
    output size, from the input, the weight's shape and the output's plane `out_hw`."""
    kernel, cg = tuple(weight_shape[-2:]), weight_shape[1]
    groups = x.shape[1] // cg
    kg = weight_shape[0] // groups  # outputs per group; the sliced route stacks 2 weight digits
    geometry = (onednn_geometry_ok(x.shape[-2:], kernel, stride, padding, dilation, out_hw)
                and onednn_groups_ok(groups, kg * (2 if w_bits > 8 else 1)))
    return candidates(x.dtype, w_bits, a_bits, zp, qmax, l1max, geometry, sliced_ok(cg, stride), cg == 1,
                      x.shape[0] * out_hw[0] * out_hw[1])


# ---------------------------------------------------------------------------------------------
# the measured choice: the first call of a shape times every exact route and keeps the fastest

AUTOTUNE_ENV = "PYEFF_QUANT_CONV_AUTOTUNE"
_TUNED: dict = {}
_TUNE_RUNS = 2  # timed runs per candidate after its first (untimed: builds the weight forms)


def autotune_enabled() -> bool:
    """Off by default: routes round the last bit differently (oneDNN's fused float32 epilogue, the
    float route's float32 scales, the float64 epilogue), so a measured choice, which may differ
    between batch sizes and between processes, would make a sample's output depend on them; after
    a later quantiser that can be one level. The fixed rules depend on the operands only."""
    v = os.environ.get(AUTOTUNE_ENV, "0").strip().lower()
    if v not in ("0", "1", "off", "on", "false", "true"):
        raise ValueError(f"pyeff.ops.quant_conv2d: {AUTOTUNE_ENV} must be 0 (default) or 1, got {v!r}")
    return v in ("1", "on", "true")


def tune_key(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, w_bits: int, a_bits: int) -> tuple:
    """What the fastest route depends on: the batch (rounded up to a power of two, so that the
    varying group sizes of a dynamic network share entries), the input's other sizes and layout,
    the convolution, the widths, the dtype and the thread count."""
    n = max(1, x.shape[0])
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (1 << (n - 1).bit_length(), tuple(x.shape[1:]), cl, tuple(weight.shape), tuple(stride), tuple(padding),
            tuple(dilation), groups, w_bits, a_bits, x.dtype, torch.get_num_threads())


def pick(cands: list, key: tuple, run) -> tuple:
    """(route, output or None): CPU_PATH_ENV's route where it is a candidate; else the tuned
    route of `key`; else, with autotuning on (the default) and more than one candidate, each
    candidate is run (`run(route)`) once to build its weight forms and _TUNE_RUNS times timed,
    the fastest is kept for `key`, and its last output is returned (no extra call). Every
    candidate is exact against the reference up to the op's stated rounding. With autotuning off
    (the default): the first candidate (the fixed rules)."""
    forced = _forced()
    if forced in cands:
        return forced, None
    tuned = _TUNED.get(key)
    if tuned in cands:
        return tuned, None
    if len(cands) == 1 or not autotune_enabled():
        return cands[0], None
    best = None
    for r in cands:
        run(r)
        for _ in range(_TUNE_RUNS):
            t0 = time.perf_counter()
            out = run(r)
            dt = time.perf_counter() - t0
            if best is None or dt < best[1]:
                best = (r, dt, out)
    _TUNED[key] = best[0]
    return best[0], best[2]


def tuned_routes() -> dict:
    """{tune_key: route} of the shapes measured so far in this process."""
    return dict(_TUNED)


# ---------------------------------------------------------------------------------------------
# which route ran: routes.tracing() collects one record per native CPU call

_TRACE = None


class tracing:
    """Context manager: `with tracing() as calls:` appends one dict per native CPU quant_conv2d /
    quant_linear call made inside (input shape, weight shape, groups, bits, dtype, layout, route)."""

    def __enter__(self):
        global _TRACE
        self._outer, _TRACE = _TRACE, []
        return _TRACE

    def __exit__(self, *exc):
        global _TRACE
        _TRACE = self._outer
        return False


def record(x: Tensor, weight: Tensor, groups: int, w_bits: int, a_bits: int, route: str) -> None:
    if _TRACE is not None:
        _TRACE.append({"x": tuple(x.shape), "weight": tuple(weight.shape), "groups": groups, "w_bits": w_bits,
                       "a_bits": a_bits, "dtype": str(x.dtype).replace("torch.", ""),
                       "channels_last": x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                       and not x.is_contiguous(), "route": route})


def cpu_route(x: Tensor, weight: Tensor, *, w_bits: int = 8, a_bits: int = 8, groups: int = 1, a_range=None,
              stride=(1, 1), padding=(0, 0), dilation=(1, 1), measured: bool = True) -> str:
    """The route ("direct", "sliced", "gemm", "depthwise" or "float") that quant_conv2d's native CPU backend
    takes for these operands (quant_linear: a [out, in] weight) under the current CPU_PATH_ENV and
    AUTOTUNE_ENV. Where the choice is measured and this shape has not been measured yet, this
    makes that first call (on x and weight) and reports what it chose; `measured=False` gives the
    fixed rules' route instead (what AUTOTUNE_ENV=0 takes). The native CUDA backend always takes
    "gemm"."""
    if x.device.type != "cpu":
        return "gemm"
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    _, _, zp, qmax = activation_params(x, a_bits, None if a_range is None else fixed_range(a_range))
    key = tune_key(x, weight, stride, padding, dilation, groups, w_bits, a_bits)
    cands = conv_candidates(x, weight.shape, stride, padding, dilation,
                            conv_out_hw(x.shape[-2:], weight.shape[-2:], stride, padding, dilation), w_bits, a_bits,
                            int(zp.item()), qmax, lambda: digits(WeightForms(None, weight), weight, w_bits, groups).l1max)
    if _forced() in cands:
        return _forced()
    if not measured or len(cands) == 1 or not autotune_enabled():
        return cands[0]
    if _TUNED.get(key) in cands:
        return _TUNED[key]
    from pyeff.ops.quant_conv.api import quant_conv2d

    with tracing() as calls:
        quant_conv2d(x, weight, None, stride, padding, dilation, groups, w_bits=w_bits, a_bits=a_bits,
                     a_range=a_range, backend="native")
    return calls[-1]["route"]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)
