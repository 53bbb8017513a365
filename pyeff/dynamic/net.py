"""The base of every converted dynamic network (DFSNet, DDINet, and the methods to come).

`DynamicNet(model, config)` finds the model's registered blocks (`pyeff.dynamic.blocks`), keeps the
first one static (as DFS and DDI both do), wraps the others in the method's gated block, and gives
them one shared `RecurrentGate` and one `Controller`: the per-forward state the blocks consult
(training or inference, the execution mode, forced decisions, BN folding). What it provides:

  * execution modes: `with net.execution("masked")` runs every path and masks (the papers' way);
  * forced decisions: the method's `forced(...)` context replaces the gates' answers;
  * calibration: `net.calibrate(batches)` runs inference-mode forwards that only observe;
  * evaluation: `net.evaluate(loader)` (accuracy, mean/max cost and the method's statistics);
  * `net.to_dense()`: the plain network again (parameters copied), e.g. as a speed baseline.

Nothing is patched on the user's modules: the static first block and a `Sequential` stem are
wrapped in modules that run BatchNorm folded into the convs at inference (`StaticBlock`,
`FusedSequential`); training runs the modules as written.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.dynamic.blocks import BlockSpec, block_spec, find_supported, supported_blocks
from pyeff.dynamic.gates import RecurrentGate
from pyeff.dynamic.modules import (batch_norm, bn_foldable, fold_bn, fused_sequential, relu_, replace_submodule,
                                   swapped)

EXECUTIONS = ("routed", "masked")
# training: "all" paths on every sample, then the decisions as straight-through masks (the
# papers'), or "routed": only the chosen path per sample
TRAIN_MODES = ("all", "routed")


class Controller:
    """What the blocks of one dynamic net share during a forward (a plain object, not a module)."""

    def __init__(self):
        self.training = False
        self.execution = "routed"    # inference: "routed" (only the chosen path) or "masked"
        self.inplace_skip = True     # inference: identity-skip blocks write into their input
        self.fold_bn = True          # inference: BatchNorm folded into the conv before it
        self.channels_last = False   # inference: the gated blocks' activation layout


class DynamicBlock(nn.Module):
    """A registered block (kept as `self.block`, parameters shared) driven by its net's controller."""

    def __init__(self, block: nn.Module, index: int, method: str = "pyeff.dynamic"):
        super().__init__()
        spec = block_spec(block)
        if spec is None:
            raise TypeError(f"{method}: {type(block).__name__} is not a supported residual block: its type is not "
                            f"registered (registered: {', '.join(supported_blocks())}; add yours with "
                            "pyeff.dynamic.register_block)")
        spec.check(block)
        self.block, self.index = block, index
        self._ctl: Controller | None = None

    @property
    def spec(self) -> BlockSpec:
        """The registered description of `block`, as it was when first used (looked up once; not
        pickled, since a user's `pre` function need not be picklable: a copy looks it up again)."""
        spec = self.__dict__.get("_spec")
        if spec is None:
            spec = self.__dict__["_spec"] = block_spec(self.block)
        return spec

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_spec", None)
        return state

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels(self.block)

    @property
    def width(self) -> int:
        """Number of inner channels."""
        return self.spec.inner_width(self.block)

    def _folding(self) -> bool:
        return self._ctl is None or self._ctl.fold_bn

    def folded_conv(self, i: int, x: Tensor) -> Tensor:
        """Conv i of the chain with its BN and ReLU; an eval BN folded into the conv at inference."""
        spec, b = self.spec, self.block
        m, bn, relu = spec.conv(b, i), spec.bn(b, i), spec.convs[i].relu
        if bn is not None and self._folding() and bn_foldable(bn) and m.padding_mode == "zeros":
            w, bias = fold_bn(m, bn)
            y = F.conv2d(x, w, bias, m.stride, m.padding, m.dilation, m.groups)
        else:
            y = m(x)
            if bn is not None:
                y = batch_norm(bn, y)
        return relu_(y) if relu else y

    def run_full(self, x: Tensor) -> Tensor:
        """The whole block at full precision (BN folded at inference)."""
        spec = self.spec
        return spec.combine_fn()(spec.residual(self.block, x, self.folded_conv), spec.shortcut_out(self.block, x))


class StaticBlock(DynamicBlock):
    """A block that always runs in full (the ungated first block): its own forward in training,
    BN folded and ReLU in place at inference."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled() or not self._folding():
            return self.block(x)
        return self.run_full(x)


class FusedSequential(nn.Sequential):
    """An nn.Sequential (same children, same state_dict keys) whose Conv2d -> eval BatchNorm2d pairs
    run as one conv at inference without autograd."""

    _ctl: Controller | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.training or torch.is_grad_enabled() or (self._ctl is not None and not self._ctl.fold_bn):
            return super().forward(x)
        return fused_sequential(self, x)


class DynamicNet(nn.Module):
    """Base of the converted networks. Subclasses set `method` and `config_class`, and define
    `_wrap(block, index)` (their gated block) and `_num_choices()` (the layer gate's choices)."""

    method = "pyeff.dynamic"
    config_class: type = None

    def __init__(self, model: nn.Module, config):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.method}.convert expects an nn.Module, got {type(model).__name__}")
        if isinstance(model, DynamicNet):
            raise TypeError(f"{self.method}.convert: the model is already a {type(model).__name__} (converted)")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{self.method}: config must be a {self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        self.config = config
        self.model = model
        self._ctl = self._make_controller()

    @classmethod
    def convert(cls, model: nn.Module, config=None, *, copy_model: bool = True, misuse: str = "", **overrides):
        """The opening every method's `convert` shares: `config` (default: the method's config with
        `overrides`; with a config, `overrides` replace its fields), a deep copy of `model` unless
        copy_model=False, and the converted net in the model's train/eval mode. `misuse`: a hint
        appended when `config` is not a config object (e.g. how to pass what it looks like)."""
        if config is None:
            config = cls.config_class(**overrides)
        elif not isinstance(config, cls.config_class):
            raise TypeError(f"{cls.method}.convert: config must be a {cls.config_class.__name__}, got "
                            f"{type(config).__name__}{misuse}")
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{cls.method}.convert expects an nn.Module, got {type(model).__name__}")
        was = model.training
        return cls(copy.deepcopy(model) if copy_model else model, config).train(was)

    # -- construction (called by subclasses) --------------------------------------------------
    def _found(self, root: nn.Module | None = None) -> list[tuple[str, nn.Module]]:
        found = find_supported(self.model if root is None else root)
        if len(found) < 2 and root is None:
            raise TypeError(f"{self.method}.convert: {type(self.model).__name__} has {len(found)} registered residual "
                            f"block(s); it needs at least two (the first stays static). Registered: "
                            f"{', '.join(supported_blocks())}; add your own with pyeff.dynamic.register_block")
        return found

    def _make_controller(self) -> Controller:
        return Controller()

    def _install(self, names: list[str], found: list[nn.Module]) -> list[nn.Module]:
        """Wrap found[0] as the static block and the others with `_wrap`; returns the gated ones."""
        static = StaticBlock(found[0], -1, self.method)
        static._ctl = self._ctl
        replace_submodule(self.model, names[0], static)
        self.static_names = [names[0]]
        wrapped = []
        for i, (name, blk) in enumerate(zip(names[1:], found[1:])):
            d = self._wrap(blk, i)
            d._ctl = self._ctl
            replace_submodule(self.model, name, d)
            wrapped.append(d)
        stem = getattr(self.model, "stem", None)
        if type(stem) is nn.Sequential:
            fused = FusedSequential(*stem)
            fused.train(stem.training)
            fused._ctl = self._ctl
            self.model.stem = fused
        self.__dict__["blocks"] = wrapped  # registered inside `model`, listed here in execution order
        self.block_names = names[1:]
        self._register_load_state_dict_pre_hook(self._old_keys)
        return wrapped

    def _make_gate(self, gate_bias, embed_dim: int, hidden_dim: int, blocks=None) -> RecurrentGate:
        """The recurrent gate over `blocks` (default: every gated block), in execution order."""
        blocks = self.blocks if blocks is None else blocks
        return RecurrentGate([d.in_channels for d in blocks], self._num_choices(), embed_dim, hidden_dim,
                             mode="argmax", bias=gate_bias)

    def _wrap(self, block: nn.Module, index: int) -> nn.Module:
        raise NotImplementedError

    def _num_choices(self) -> int:
        raise NotImplementedError

    def _old_keys(self, state_dict, prefix, *args):
        """Checkpoints written before the static block was wrapped name its parameters without the
        `.block` level: accept them."""
        for name in self.static_names:
            old, new = f"{prefix}model.{name}.", f"{prefix}model.{name}.block."
            for k in [k for k in state_dict if k.startswith(old) and not k.startswith(new)]:
                state_dict[new + k[len(old):]] = state_dict.pop(k)

    # -- modes --------------------------------------------------------------------------------
    @property
    def train_mode(self) -> str:
        return self.config.train_mode

    @train_mode.setter
    def train_mode(self, mode: str) -> None:
        self.config = self.config.replace(train_mode=mode)
        for b in self.blocks:
            if hasattr(b, "train_mode"):
                b.train_mode = mode

    @property
    def inplace_skip(self) -> bool:
        """At inference, a block whose skip is the identity writes its executed samples into its
        input tensor (an activation of this forward); False if your model reuses a block's input."""
        return self._ctl.inplace_skip

    @inplace_skip.setter
    def inplace_skip(self, value: bool) -> None:
        self._ctl.inplace_skip = bool(value)

    @contextlib.contextmanager
    def execution(self, mode: str):
        """Inference execution within the block: "routed" (default: only what was chosen runs) or
        "masked" (every path on every sample, then the decisions as masks: the papers' execution,
        for comparison; same outputs)."""
        if mode not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {mode!r}")
        with swapped(self._ctl, execution=mode):
            yield self

    @contextlib.contextmanager
    def unfused(self):
        """Within the block every conv runs as its module (forward hooks see it), BN unfolded."""
        with swapped(self._ctl, fold_bn=False):
            yield self

    @contextlib.contextmanager
    def probing(self):
        """Eval mode without autograd for the block's length, the modes restored after: forwards
        that measure or observe change no BatchNorm statistics and record no graph."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            for m, t in modes:
                m.training = t

    def _forcing(self, **values):
        return swapped(self._ctl, **values)

    # -- parameters ---------------------------------------------------------------------------
    def base_parameters(self):
        """The network's own parameters (gates excluded)."""
        return self.model.parameters()

    def gate_parameters(self):
        return self.gate.parameters()

    # -- calibration and evaluation -----------------------------------------------------------
    @staticmethod
    def _split(batch):
        if isinstance(batch, (tuple, list)):
            return batch[0], (batch[1] if len(batch) > 1 else None)
        return batch, None

    def calibrate(self, batches: Iterable, **options) -> "DynamicNet":
        """Observe `batches` (tensors or (x, y) pairs) at inference, changing no BatchNorm
        statistics: each method fills what it estimates from data (DFS: activation ranges)."""
        with self.probing():
            state = self._calibrate_begin(**options)
            try:
                for batch in batches:
                    self._calibrate_batch(self._split(batch)[0], state)
            finally:
                self._calibrate_end(state)
        return self

    def _calibrate_begin(self, **options):
        if options:
            raise TypeError(f"{type(self).__name__}.calibrate takes no options, got {sorted(options)}")

    def _calibrate_batch(self, x: Tensor, state) -> None:
        self(x)

    def _calibrate_end(self, state) -> None:
        pass

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Over `loader` (batches of x or (x, y)): accuracy (with labels), mean and max cost as a
        percentage of the dense network's, samples, and the method's own statistics."""
        was = self.training
        self.eval()
        n = correct = 0
        labelled = False
        cost_sum, cost_max = 0.0, 0.0
        acc = self._stats_begin()
        try:
            for batch in loader:
                x, y = self._split(batch)
                logits, aux = self(x)
                c = aux["cost"].double()
                cost_sum += float(c.sum())
                cost_max = max(cost_max, float(c.max())) if c.numel() else cost_max
                self._stats_batch(acc, aux)
                n += x.shape[0]
                if y is not None:
                    labelled = True
                    correct += int((logits.argmax(1) == y.to(logits.device)).sum())
        finally:
            self.train(was)
        out = {"samples": n, "cost_pct": 100 * cost_sum / max(n, 1), "max_cost_pct": 100 * cost_max}
        if labelled:
            out["accuracy"] = correct / max(n, 1)
        out.update(self._stats_end(acc, max(n, 1)))
        return out

    def _stats_begin(self):
        return None

    def _stats_batch(self, acc, aux: dict) -> None:
        pass

    def _stats_end(self, acc, n: int) -> dict:
        return {}

    # -- the dense network --------------------------------------------------------------------
    def to_dense(self) -> nn.Module:
        """A copy of the network with every wrapper removed: the plain model, parameters copied,
        in eval mode (e.g. the baseline a benchmark compares against)."""
        dense = copy.deepcopy(self.model)
        for name, m in list(dense.named_modules()):
            if isinstance(m, DynamicBlock):
                replace_submodule(dense, name, m.block)
        stem = getattr(dense, "stem", None)
        if isinstance(stem, FusedSequential):
            dense.stem = nn.Sequential(*stem)
        return dense.eval()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{self.method}: expected an image batch [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
