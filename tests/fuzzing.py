"""Shared pieces of the property-based fuzz tests (tests/test_fuzz_*.py): hypothesis settings,
strategies over dtypes, shapes, conv geometry, memory layouts, bit widths, masks and value classes,
the backends to run, and the tolerances of each op's docs.

Determinism: every fuzz test runs derandomized (the examples follow from the test's source), with
no example database, so CI sees the same cases every run; failures found once are kept as explicit
regression tables in the test files. `PYEFF_FUZZ_EXAMPLES` sets the number of generated cases per
op (default 1000); `PYEFF_FUZZ_RANDOM=1` switches derandomization off for long exploratory runs;
`PYEFF_FUZZ_LOG=path` writes each case before it runs (a crash's input is the last line).
"""
import contextlib
import math
import os

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from pyeff.ops import _backend

EXAMPLES = int(os.environ.get("PYEFF_FUZZ_EXAMPLES", "1000"))
RANDOM = os.environ.get("PYEFF_FUZZ_RANDOM", "0") == "1"
_LOG = os.environ.get("PYEFF_FUZZ_LOG")


def fuzz_settings(examples: int = None):
    """hypothesis settings of a fuzz test: `examples` generated cases (default EXAMPLES)."""
    return settings(max_examples=EXAMPLES if examples is None else examples, derandomize=not RANDOM,
                    database=None, deadline=None, print_blob=True,
                    phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
                    suppress_health_check=list(HealthCheck))


def log_case(case) -> None:
    """With PYEFF_FUZZ_LOG=path, append each case before it runs (the last line names the input of a
    crash that takes the process down)."""
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(repr(case) + "\n")


# --------------------------------------------------------------------------------------------
# backends

def cpu_backends(triton: bool = False):
    """The backends usable on the CPU: reference and native always; Triton (interpreted) on request."""
    out = ["reference"]
    if _backend.available("native", torch.device("cpu"))[0]:
        out.append("native")
    if triton and _backend.triton_available() and _backend.triton_interpreted():
        out.append("triton")
    return out


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


threads = st.sampled_from([1, 2])


@contextlib.contextmanager
def env(name: str, value: str):
    """Environment variable `name` set to `value` inside (an op's route switch, for one case)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old

# --------------------------------------------------------------------------------------------
# dtypes, values

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
dtypes = st.sampled_from(FLOAT_DTYPES)

# value classes; the EXTREME_KINDS only where the op's output can hold them (fake_quant)
VALUE_KINDS = ("normal", "uniform", "constant", "zeros", "signed_zeros", "denormal", "huge_range",
               "outlier", "integers", "one_value", "tiny_range")
EXTREME_KINDS = ("extremes", "extreme_one_sided", "extreme_mixed")


def make_values(shape, dtype, kind: str, seed: int, scale_exp: int = 0) -> torch.Tensor:
    """A contiguous tensor of `shape` and `dtype` drawn from value class `kind` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    fi = torch.finfo(dtype)
    scale = 10.0 ** scale_exp
    f64 = dict(dtype=torch.float64, generator=g)
    if kind == "normal":
        v = torch.randn(n, **f64) * scale + (torch.rand((), **f64) - 0.5) * 4 * scale
    elif kind == "uniform":
        v = torch.rand(n, **f64) * scale  # one-signed
    elif kind == "constant":
        c = [1.5, -3.0, 0.1, 7.0, -1e-3][seed % 5] * scale
        v = torch.full((n,), c, dtype=torch.float64)
    elif kind == "zeros":
        v = torch.zeros(n, dtype=torch.float64)
    elif kind == "signed_zeros":
        v = torch.where(torch.rand(n, **f64) < 0.5, -0.0, 0.0)
        if n > 1:
            v[int(torch.randint(n, (), generator=g))] = scale
    elif kind == "denormal":  # below the dtype's smallest normal
        v = torch.randn(n, **f64) * fi.smallest_normal * 0.25
    elif kind == "huge_range":  # magnitudes 1e-12 .. 1e12, both signs
        mags = 10.0 ** (torch.rand(n, **f64) * 24 - 12)
        v = mags * torch.where(torch.rand(n, **f64) < 0.5, -1.0, 1.0)
        v = v.clamp(-fi.max / 4, fi.max / 4)
    elif kind == "outlier":
        v = torch.randn(n, **f64) * 0.01
        v[int(torch.randint(n, (), generator=g))] = (1e4 if seed % 2 else -1e4) * scale
    elif kind == "integers":
        v = torch.randint(-8, 9, (n,), generator=g).double() * 0.5  # ties of the rounding
    elif kind == "one_value":
        v = torch.zeros(n, dtype=torch.float64)
        v[int(torch.randint(n, (), generator=g))] = -scale if seed % 2 else scale
    elif kind == "tiny_range":
        v = 1.0 + torch.rand(n, **f64) * 1e-6
    elif kind == "extremes":  # finite extremes of the dtype, both signs
        choice = torch.tensor([fi.max, -fi.max, fi.max * 0.999, -fi.max * 0.75, 0.0, 1.0], dtype=torch.float64)
        v = choice[torch.randint(len(choice), (n,), generator=g)]
        v[0] = fi.max if seed % 2 else -fi.max
    elif kind == "extreme_one_sided":
        v = torch.rand(n, **f64) * fi.max
        v[0] = fi.max
        if seed % 2:
            v = -v
    elif kind == "extreme_mixed":
        v = torch.randn(n, **f64)
        v[int(torch.randint(n, (), generator=g))] = fi.max if seed % 2 else -fi.max
        v[int(torch.randint(n, (), generator=g))] = -fi.max if seed % 3 else fi.max * 0.9
    else:
        raise ValueError(kind)
    v = v.double().clamp(-fi.max, fi.max)
    return v.to(dtype).reshape(shape)


def values(kinds=VALUE_KINDS):
    """(kind, seed, scale exponent) of make_values."""
    return st.tuples(st.sampled_from(kinds), st.integers(0, 2 ** 31 - 1), st.integers(-3, 3))


# --------------------------------------------------------------------------------------------
# memory layouts

LAYOUTS = ("contiguous", "channels_last", "strided", "offset", "transposed")
layouts = st.sampled_from(LAYOUTS)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout (channels_last, a non-contiguous view with
    gaps, a view at a storage offset, or a transposed copy viewed back)."""
    if layout == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()
    if layout == "strided":  # every other element of the last axis of a wider tensor
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":  # at a storage offset inside a larger buffer
        buf = torch.zeros(t.numel() + 7, dtype=t.dtype)
        buf[5:5 + t.numel()] = t.reshape(-1)
        return buf[5:5 + t.numel()].view(t.shape)
    if layout == "transposed":  # memory order reversed, viewed back
        dims = list(range(t.dim()))[::-1]
        return t.permute(*dims).contiguous().permute(*dims)
    raise ValueError(layout)


# --------------------------------------------------------------------------------------------
# shapes and conv geometry

def small_shapes(max_dims: int = 4, max_side: int = 9):
    """Tensor shapes of 1..max_dims axes, sides 1..max_side (odd, tiny and one-element included)."""
    return st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims).map(tuple)


CHANNELS = st.sampled_from([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 24, 33])  # around vector widths


@st.composite
def conv_geometry(draw, depthwise_weight: float = 0.25, max_group_channels: int = 17):
    """One conv2d problem: N, C, K, groups, (kh, kw), stride, padding and dilation per axis (mixed,
    padding up to wider than the kernel), (H, W) at least the padded, dilated kernel. A dict."""
    N = draw(st.integers(1, 3))
    if draw(st.floats(0, 1)) < depthwise_weight:
        C = draw(CHANNELS)
        groups, K = C, C * draw(st.sampled_from([1, 1, 2]))
    else:
        groups = draw(st.sampled_from([1, 1, 1, 2, 3]))
        cg = draw(st.integers(1, max_group_channels))
        kg = draw(st.integers(1, max_group_channels))
        C, K = groups * cg, groups * kg
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 4)), draw(st.integers(0, 4)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    hw = []
    for a in range(2):
        need = max(1, dilation[a] * (kernel[a] - 1) + 1 - 2 * padding[a])
        hw.append(need + draw(st.integers(0, 5)))
    return dict(N=N, C=C, K=K, groups=groups, kernel=kernel, stride=stride, padding=padding,
                dilation=dilation, H=hw[0], W=hw[1])


def conv_kwargs(g: dict) -> dict:
    return dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"])


# --------------------------------------------------------------------------------------------
# masks

MASK_KINDS = ("none", "all_on", "all_off", "one_on", "random", "per_sample", "shared_1row")
mask_kinds = st.sampled_from(MASK_KINDS)


def make_mask(kind: str, n: int, channels: int, seed: int):
    """A bool mask ([n, channels] per sample, [channels] or [1, channels] shared) or None."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "all_on":
        return torch.ones(channels, dtype=torch.bool)
    if kind == "all_off":
        return torch.zeros(n, channels, dtype=torch.bool)
    if kind == "one_on":
        m = torch.zeros(channels, dtype=torch.bool)
        m[int(torch.randint(channels, (), generator=g))] = True
        return m
    if kind == "random":
        return torch.rand(channels, generator=g) < 0.5
    if kind == "shared_1row":
        return torch.rand(1, channels, generator=g) < 0.6
    return torch.rand(n, channels, generator=g) < 0.5


# --------------------------------------------------------------------------------------------
# tolerances (each op's docs)

def close_tol(ref: torch.Tensor, magnitude: float, rtol: float, atol: float) -> dict:
    """assert_close tolerances for a float computation whose terms reach `magnitude`: cancellation
    leaves an absolute error relative to the terms, not to the result."""
    return dict(rtol=rtol, atol=atol * (1.0 + magnitude))
