"""PSGConv2d and `psg_`: E2-Train's predictive sign gradient (PSG, arXiv 1910.13349) as a layer.

    model = pyeff.nn.psg_(model, x_bits=4, g_bits=16, threshold=5e-5)   # every nn.Conv2d -> PSGConv2d
    hooks = [pyeff.nn.PSGSignHook()]                                     # the signSGD-style update
    Trainer(model, cfg, train_set, test_set, hooks=hooks).fit()

A PSGConv2d is an nn.Conv2d whose
  * forward runs pyeff.ops.quant_conv2d at `w_bits` / `a_bits` (8 / 8: the paper's 8-bit forward),
    exactly as QuantConv2d does;
  * input gradient (and bias gradient) is quant_conv2d's own straight-through gradient, unchanged
    (the paper keeps input gradients exact);
  * weight gradient is pyeff.ops.psg_conv2d_weight_grad(x, grad_out, ...): a predictor from x at
    `x_bits` and grad_out at `g_bits`, trusted where |g_pred| > threshold, the full-precision value
    elsewhere (computed for the output channels holding an uncertain entry, or, when few entries
    are uncertain, for those entries alone). x is the layer's float input (the same tensor the
    forward quantises).
Every backward appends what ran to `layer.psg_log` (dicts: `samples`, `positions` N*OH*OW,
`uncertain`, `entries`, `exact_rows`, `exact_entries`, `rows`, `predictor`, `seconds`) and adds to `layer.psg_totals`; the
energy-account hook (pyeff.e2train.energy_hook) drains the log. `uncertain_fraction` is the last
backward's share of uncertain entries.

The update (`PSGSignHook`, an `after_backward` hook on the shared Trainer): every PSG weight's
gradient is replaced by `scale * sign(grad)` before the optimizer step, which then applies its own
momentum and weight decay (the paper: SGD lr 0.1, momentum 0.9, weight decay 1e-4 on the sign).
All other parameters (BatchNorm, biases, linear heads, convs left float, SLU's gate) keep their
ordinary gradient: plain SGD, as in the reference, which signs the conv weights only.
"""
from __future__ import annotations

import copy
import math
import numbers
import time
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from pyeff.nn.quant import QuantConv2d, _bits, _padded
from pyeff.ops.packs import packs_of
from pyeff.ops import psg as psg_op
from pyeff.ops.psg import psg_conv2d_weight_grad
from pyeff.ops.quant_conv import quant_conv2d
from pyeff.train.hooks import Hook

WHO = "pyeff.nn.psg_"


def check_psg_bits(name: str, v, who: str = WHO) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 2 <= v <= 16:
        raise ValueError(f"{who}: {name} must be an integer number of bits in [2, 16], got {name}={v!r}")
    return int(v)


def check_threshold(v, who: str = WHO) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or math.isnan(v) or v < 0:
        raise ValueError(f"{who}: threshold must be a real number >= 0 (inf allowed: the exact gradient "
                         f"everywhere), got threshold={v!r}")
    return float(v)


class _PSGWeightGrad(torch.autograd.Function):
    """Identity on the forward output y; its backward passes grad_out on to y (quant_conv2d's own
    graph: input and bias gradients) and gives the weight PSG's gradient."""

    @staticmethod
    def forward(ctx, y, weight, x, layer, padding):
        ctx.save_for_backward(x)
        ctx.layer, ctx.padding = layer, padding
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_out):
        grad_w = None
        if ctx.needs_input_grad[1]:
            (x,) = ctx.saved_tensors
            layer = ctx.layer
            t0 = time.perf_counter()
            grad_w, uncertain = psg_conv2d_weight_grad(
                x, grad_out.to(x.dtype), tuple(layer.weight.shape), layer.stride, ctx.padding, layer.dilation,
                layer.groups, x_bits=layer.x_bits, g_bits=layer.g_bits, threshold=layer.threshold,
                backend=layer.backend)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            layer._record(x, uncertain, time.perf_counter() - t0, grad_out)
            grad_w = grad_w.to(layer.weight.dtype)
        return grad_out, grad_w, None, None, None


class PSGConv2d(QuantConv2d):
    """nn.Conv2d with an 8-bit forward (quant_conv2d, as QuantConv2d), the exact straight-through input
    gradient, and E2-Train's predictive-sign weight gradient (pyeff.ops.psg_conv2d_weight_grad).

    Extra arguments: w_bits, a_bits (forward widths, 2-16 / 1-16; default 8, 8), x_bits, g_bits (the
    predictor's widths, 2-16; the paper: 4 and 16), threshold (>= 0, inf: the exact gradient),
    backend (the ops' backend). Weights and state_dict keys are nn.Conv2d's."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, w_bits: int = 8, a_bits: int = 8,
                 x_bits: int = 4, g_bits: int = 16, threshold: float = 5e-5, backend=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, w_bits=w_bits, a_bits=a_bits, backend=backend)
        if self.w_bits == 32 or self.a_bits == 32:
            raise ValueError("pyeff.nn.PSGConv2d: w_bits and a_bits must be integer widths (2-16 / 1-16); "
                             "the PSG forward is the integer quant_conv2d")
        self.x_bits = check_psg_bits("x_bits", x_bits, "pyeff.nn.PSGConv2d")
        self.g_bits = check_psg_bits("g_bits", g_bits, "pyeff.nn.PSGConv2d")
        self.threshold = check_threshold(threshold, "pyeff.nn.PSGConv2d")
        self.psg_log: list = []
        self.psg_totals = {"calls": 0, "uncertain": 0, "entries": 0, "exact_rows": 0, "exact_entries": 0, "rows": 0}
        self.uncertain_fraction = float("nan")

    @classmethod
    def from_float(cls, module: nn.Conv2d, w_bits: int = 8, a_bits: int = 8, x_bits: int = 4, g_bits: int = 16,
                   threshold: float = 5e-5, backend=None) -> "PSGConv2d":
        """A PSGConv2d with the configuration and (shared) parameters of an nn.Conv2d."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"PSGConv2d.from_float expects an nn.Conv2d, got {type(module).__name__}")
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode,
                device=module.weight.device, dtype=module.weight.dtype, w_bits=w_bits, a_bits=a_bits,
                x_bits=x_bits, g_bits=g_bits, threshold=threshold, backend=backend)
        q.weight = module.weight
        q.bias = module.bias
        return q

    def _record(self, x: Tensor, uncertain: Tensor, seconds: float, grad_out: Tensor) -> None:
        K = uncertain.shape[0]
        n_unc = int(uncertain.sum())
        predictor = not math.isinf(self.threshold)
        # what the op's exact step computed: whole rows, or (few uncertain) single entries
        exact_rows, exact_entries = (psg_op.exact_work(uncertain, self.groups, x.device, self.backend) if predictor
                                     else (K, 0))
        entry = {"samples": int(x.shape[0]), "positions": int(grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3]),
                 "uncertain": n_unc, "entries": uncertain.numel(), "exact_rows": exact_rows,
                 "exact_entries": exact_entries, "rows": K, "predictor": predictor, "seconds": seconds}
        self.psg_log.append(entry)
        if len(self.psg_log) > 10000:  # nobody drains it: keep memory bounded
            del self.psg_log[:5000]
        t = self.psg_totals
        t["calls"] += 1
        t["uncertain"] += n_unc
        t["entries"] += entry["entries"]
        t["exact_rows"] += exact_rows
        t["exact_entries"] += exact_entries
        t["rows"] += K
        self.uncertain_fraction = n_unc / max(1, entry["entries"])

    def forward(self, x: Tensor, w_bits=None, a_bits=None) -> Tensor:
        wb = self.w_bits if w_bits is None else _bits("w_bits", w_bits, 2)
        ab = self.a_bits if a_bits is None else _bits("a_bits", a_bits, 1)
        if wb == 32 or ab == 32:
            raise ValueError("pyeff.nn.PSGConv2d: w_bits and a_bits must be integer widths; no float forward")
        x, padding = _padded(self, x)
        track = torch.is_grad_enabled() and self.weight.requires_grad
        y = quant_conv2d(x, self.weight.detach() if track else self.weight, self.bias, self.stride, padding,
                         self.dilation, self.groups, w_bits=wb, a_bits=ab, backend=self.backend,
                         packs=packs_of(self))
        if not track:
            return y
        return _PSGWeightGrad.apply(y, self.weight, x.detach(), self, tuple(padding))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", x_bits={self.x_bits}, g_bits={self.g_bits}, "
                f"threshold={self.threshold:g}")


def psg_layers(model: nn.Module) -> list:
    """The PSGConv2d modules of `model`."""
    return [m for m in model.modules() if isinstance(m, PSGConv2d)]


def psg_(model: nn.Module, x_bits: int = 4, g_bits: int = 16, threshold: float = 5e-5,
         filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, inplace: bool = True, *,
         w_bits: int = 8, a_bits: int = 8, backend=None) -> nn.Module:
    """Swap every nn.Conv2d of `model` (those `filter_fn(module, name)` accepts) for a PSGConv2d with
    the same configuration and the *same* parameters (state_dict unchanged). Subclasses of nn.Conv2d
    (QuantConv2d, ...) are left alone. Returns the model (a converted deep copy with inplace=False; a
    model that is itself an nn.Conv2d is returned swapped). Pair it with PSGSignHook for the paper's
    sign update."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{WHO} expects an nn.Module, got {type(model).__name__}")
    kw = dict(x_bits=check_psg_bits("x_bits", x_bits), g_bits=check_psg_bits("g_bits", g_bits),
              threshold=check_threshold(threshold), w_bits=check_psg_bits("w_bits", w_bits),
              a_bits=check_psg_bits("a_bits", a_bits), backend=backend)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{WHO}: filter_fn must be callable (module, name) -> bool")
    if not inplace:
        model = copy.deepcopy(model)
    accept = filter_fn or (lambda m, name: True)
    if type(model) is nn.Conv2d:
        return PSGConv2d.from_float(model, **kw).train(model.training) if accept(model, "") else model
    for name, module in list(model.named_modules()):
        if name and type(module) is nn.Conv2d and accept(module, name):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, PSGConv2d.from_float(module, **kw).train(module.training))
    return model


class PSGSignHook(Hook):
    """The paper's signSGD-style update, as an `after_backward` hook: each PSGConv2d weight's gradient
    becomes `scale * sign(grad)` (0 stays 0); the optimizer then applies momentum and weight decay
    as usual. Other parameters keep their gradients. Metrics per epoch: psg_uncertain_pct (share of
    weight-gradient entries the full precision decided) and psg_exact_rows_pct (share of output
    channels whose exact gradient was computed), over the epoch's PSG backward calls."""

    def __init__(self, scale: float = 1.0):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"PSGSignHook: scale must be a finite number > 0, got scale={scale!r}")
        self.scale = float(scale)
        self._start = None

    def _layers(self, trainer):
        return psg_layers(getattr(trainer.model, "module", trainer.model))

    def on_epoch_begin(self, trainer, epoch: int) -> None:
        self._start = {id(m): dict(m.psg_totals) for m in self._layers(trainer)}

    def after_backward(self, trainer) -> None:
        sign_gradients_(getattr(trainer.model, "module", trainer.model), self.scale)

    def on_epoch_end(self, trainer, epoch: int, metrics: dict) -> None:
        unc = ent = er = rows = 0
        for m in self._layers(trainer):
            s = (self._start or {}).get(id(m), {"uncertain": 0, "entries": 0, "exact_rows": 0, "rows": 0})
            unc += m.psg_totals["uncertain"] - s["uncertain"]
            ent += m.psg_totals["entries"] - s["entries"]
            er += m.psg_totals["exact_rows"] - s["exact_rows"]
            rows += m.psg_totals["rows"] - s["rows"]
        metrics["psg_uncertain_pct"] = 100.0 * unc / ent if ent else float("nan")
        metrics["psg_exact_rows_pct"] = 100.0 * er / rows if rows else float("nan")

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state.get("scale", self.scale))


@torch.no_grad()
def sign_gradients_(model: nn.Module, scale: float = 1.0) -> int:
    """Replace every PSGConv2d weight gradient of `model` by scale * sign(grad), in place; returns how
    many were changed."""
    n = 0
    for m in psg_layers(model):
        g = m.weight.grad
        if g is not None:
            torch.sign(g, out=g)
            if scale != 1.0:
                g.mul_(scale)
            n += 1
    return n
