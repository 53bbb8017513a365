"""`convert(model)`: a network with DDI's two kinds of dynamic inference.

    net = pyeff.ddi.convert(pyeff.models.create_model("resnet38"), cost="flops")
    logits, aux = net(x)     # aux["cost"]: [N] fraction of the dense network's cost: in training in
                             #   x's dtype and differentiable; at inference float64, exact
                             # aux["execute"]: [N, G] layer decisions; aux["channels"]: [N, G] fractions
                             # aux["exits"]: early-exit logits (training)
    net.set_budget(0.3)      # inference: no sample spends more than 30% of the dense cost

Input-dependent (MGL2S): every residual block but the first gets a layer decision from one shared
recurrent gate (SkipNet's) and a channel gate over its inner channels. Resource-dependent: an exit
classifier after every stage but the last; under a budget the network halts at an exit and
tightens the gates of each sample (fewer channels, then skipping) so that its cost stays within
the budget. Costs come from a per-layer table (pyeff.ddi.costs) in FLOPs, energy or measured
latency.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyeff.ddi.block import DDIBlock
from pyeff.ddi.config import DDIConfig
from pyeff.energy import EnergyModel
from pyeff.ddi.costs import CostTable, build_table
from pyeff.dynamic import straight_through
from pyeff.dynamic.net import Controller, DynamicNet


class ExitHead(nn.Module):
    """An early-exit classifier: conv3x3 (stride 2 above 8x8 maps) - BN - ReLU - pool - linear."""

    def __init__(self, channels: int, num_classes: int, spatial: int):
        super().__init__()
        stride = 2 if spatial > 8 else 1
        width = 2 * channels
        self.conv = nn.Conv2d(channels, width, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1))


def _parts(model: nn.Module):
    """(stem, stages, head) of a supported network; modules are shared with `model`."""
    if hasattr(model, "stages") and hasattr(model, "stem") and hasattr(model, "head"):
        return model.stem, list(model.stages()), model.head
    try:
        from torchvision.models import ResNet
    except ImportError:
        ResNet = None
    if ResNet is not None and isinstance(model, ResNet):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        return stem, [model.layer1, model.layer2, model.layer3, model.layer4], head
    raise TypeError(f"pyeff.ddi.convert: {type(model).__name__} is not supported; use pyeff's CIFAR ResNets and "
                    "DenseNets or a torchvision ResNet (a network with stem, stages() and head)")


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _scale_grad(x: Tensor, scale: float) -> Tensor:
    """x forward; its gradient multiplied by `scale` backward."""
    return _ScaleGrad.apply(x, float(scale))


class DDIController(Controller):
    """Per-forward state shared by the blocks of one DDINet: the costs spent so far, the decisions
    made, forced decisions, and the budget logic that tightens them."""

    def __init__(self, net: "DDINet"):
        super().__init__()
        self.net = net
        self.open = False               # every block executed with every channel (no gates consulted)
        self.forced_execute: Tensor | None = None   # [G] or [N, G] bool
        self.forced_channels: list | None = None    # per block: bool [N, width] or None
        self.reset(0, torch.device("cpu"))

    def reset(self, n: int, device) -> None:
        gate = getattr(self.net, "gate", None)  # (None while the net is being built)
        if gate is not None:
            gate.reset()
        self.spent: Tensor | float = 0.0     # [N] in table units, differentiable in training
        self.spent_exact = torch.zeros(n, dtype=torch.float64, device=device)  # for the budget
        self.execute: list[Tensor] = []
        self.channels: list[Tensor] = []

    def charge(self, cost: float) -> None:
        self.spent = self.spent + cost
        self.spent_exact += cost

    def run_block(self, blk: DDIBlock, x: Tensor) -> Tensor:
        net, n, training = self.net, x.shape[0], self.training
        table: CostTable | None = net.table
        if self.open:
            if table is not None:
                self.charge(table.blocks[blk.index].full)
            return blk.exec_path(x)
        cb = table.blocks[blk.index]
        layer_gated = net.layer_gates and blk.layer_gated
        # one pooling for both gates, none when the block has neither (e.g. halting alone)
        pooled = x.mean((2, 3)) if layer_gated or blk.channel_gate is not None else None
        # layer decision
        layer_w = None
        if layer_gated:
            g = net.gate(x, net._gate_step[blk.index], pooled)
            execute = g.decisions == 1
            layer_w = g.weights if training else None
        else:
            execute = torch.ones(n, dtype=torch.bool, device=x.device)
        if self.forced_execute is not None:
            f = self.forced_execute
            execute = (f[:, blk.index] if f.dim() == 2 else f[blk.index].expand(n)).to(x.device)
            layer_w = None
        if blk.channel_mode == "width":
            return self._run_width(blk, cb, x, pooled, execute, layer_w)
        # channel decision
        soft = hard = scores = None
        if blk.channel_gate is not None:
            scores = blk.channel_gate.scores(x, pooled)
            hard = scores > blk.channel_gate.threshold
            soft = straight_through(hard.to(scores.dtype), scores) if training else hard.to(scores.dtype)
        if self.forced_channels is not None and self.forced_channels[blk.index] is not None:
            hard = self.forced_channels[blk.index].to(x.device)
            soft = hard.to(x.dtype)
        if net.budget is not None and net.tighten and not training:
            execute, hard = self._fit_budget(blk, cb, execute, hard, scores)
            soft = None if hard is None else hard.to(x.dtype)
        if soft is None:
            r = torch.ones(n, dtype=x.dtype, device=x.device)
        elif training:  # the cost reaches each channel's logit at the scale it reaches the layer gate's
            r = _scale_grad(soft, soft.shape[1]).mean(1)
        else:
            r = soft.mean(1)
        self._account(cb, execute, layer_w, r)
        if not training and not x.is_contiguous() and not net.channels_last:
            x = x.contiguous()  # NCHW throughout (see DDINet.channels_last; masked groups turn in exec_path)
        return blk.run(x, execute, layer_w, soft, hard, training, self._mode(), inplace=self.inplace_skip)

    def _mode(self) -> str:
        """Training in "all" mode runs both paths for every sample (each decision's logit gets the
        gradient of its own path's output); inference runs what `execution` says."""
        if self.training:
            return "masked" if self.net.train_mode == "all" else "routed"
        return self.execution

    def _account(self, cb, execute, layer_w, r) -> None:
        w = layer_w[:, 1] if layer_w is not None else execute.to(r.dtype)
        self.spent = self.spent + (cb.fixed + w * cb.exec_cost(r))
        self.spent_exact += cb.fixed + execute.double() * cb.exec_cost(r.detach().double())
        self.execute.append(execute)
        self.channels.append(r.detach() * execute)

    def _run_width(self, blk, cb, x, pooled, execute, layer_w):
        """Width mode: the block's gate picks how many inner channels (a prefix) each sample runs."""
        training, net = self.training, self.net
        g = blk.channel_gate(x, pooled)
        choice, width_w = g.decisions, (g.weights if training else None)
        if self.forced_channels is not None and self.forced_channels[blk.index] is not None:
            choice, width_w = self.forced_channels[blk.index].to(x.device), None
        if net.budget is not None and net.tighten and not training:
            execute, choice = self._fit_budget_width(blk, cb, execute, choice)
        P = blk.width
        if width_w is not None:  # straight-through: forward = the chosen prefix, backward = every width's
            soft = width_w @ blk.prefix
            r = soft.mean(1)
        else:
            soft = blk.prefix[choice]
            r = blk.counts[choice].to(x.dtype) / P
        self._account(cb, execute, layer_w, r)
        if training or self.execution == "masked":
            return blk.run(x, execute, layer_w, soft, soft > 0.5, training, self._mode())
        return blk.run_width(x, torch.where(execute, choice + 1, torch.zeros_like(choice)),
                             inplace=self.inplace_skip)

    def _fit_budget_width(self, blk, cb, execute, choice):
        k_max = self._affordable(blk, cb)
        counts = blk.counts.to(k_max.device)
        allowed = counts[None, :] <= torch.minimum(k_max, counts[choice])[:, None]  # [N, K]
        best = torch.where(allowed, torch.arange(len(counts), device=k_max.device)[None, :], -1).max(1).values
        return execute & (best >= 0), best.clamp(min=0)

    def _affordable(self, blk, cb) -> Tensor:
        """[N] the most inner channels each sample can still run here and reach its exit within the
        budget (-1: not even the block's constant part fits)."""
        net = self.net
        avail = net.budget * net.table.dense - self.spent_exact - cb.fixed - net.table.reserve_after(blk.index, net.halt_stage)
        P = blk.width
        k = torch.arange(P + 1, device=avail.device, dtype=torch.float64)
        fits = cb.exec_cost(k / P)[None, :] <= avail[:, None] * (1 + 1e-9) + 1e-12  # cost is increasing in k
        return fits.sum(1) - 1

    def _fit_budget(self, blk, cb, execute, hard, scores):
        """Tighten this block's decisions so that every sample can still reach its exit within the
        budget: keep the highest-scoring channels that fit, skip the block when none fits."""
        P = blk.width
        k_max = self._affordable(blk, cb)
        if hard is None:                                            # no channel gate: all or nothing
            return execute & (k_max >= P), None
        k_want = hard.sum(1)
        execute = execute & (k_max >= k_want.clamp(max=1))
        over = execute & (k_want > k_max)
        if bool(over.any()):
            if scores is None:  # forced masks without a gate: keep the lowest-numbered channels
                scores = hard.to(torch.float64) - torch.arange(P, device=hard.device) / (2.0 * P)
            rank = scores.argsort(1, descending=True).argsort(1)
            hard = torch.where(over[:, None], hard & (rank < k_max[:, None]), hard)
        return execute, hard


class DDINet(DynamicNet):
    """A converted network. Attributes: `model` (its gated blocks wrapped in DDIBlocks), `gate`
    (the shared layer gate), `exits` (early-exit heads), `config` (the DDIConfig it was built
    from), `table` (the CostTable of `cost`), `budget` (None or a fraction of the dense cost) and
    `halt_stage`."""

    method = "pyeff.ddi"
    config_class = DDIConfig

    def __init__(self, model: nn.Module, config: DDIConfig):
        super().__init__(model, config)
        self.table: CostTable | None = None
        stem, stages, _ = _parts(model)
        stage_of = {id(m): s for s, stage in enumerate(stages) for m in stage.modules()}
        found = [(n, b) for n, b in self._found() if id(b) in stage_of]
        if len(found) < 2:
            raise TypeError(f"pyeff.ddi.convert: {type(model).__name__} has {len(found)} registered block(s) in its "
                            "stages; DDI needs at least two (the first stays static)")
        if config.channel_gates and config.channel_mode == "width":
            from pyeff.ddi.prune import sort_inner_channels
            sort_inner_channels(model)  # a prefix of the inner channels = the most important ones
        self._stage_of = [stage_of[id(b)] for _, b in found]
        wrapped = self._install([n for n, _ in found], [b for _, b in found])
        for d in wrapped:
            # a block with a projection shortcut changes the resolution or width: skipping it replaces
            # the block by a 1x1 conv, which costs accuracy out of proportion (measured); by default it
            # always runs (its inner channels stay gated), as ConvNet-AIG does
            d.layer_gated = config.layer_gates and (config.skip_downsampling or not d.projection_shortcut)
        self.__dict__["parts"] = _parts(model)  # views, not registered twice (after the stem was wrapped)
        stem, stages, head = self.parts
        # the layer gate covers only the blocks it decides (no parameter without a gradient, which
        # DDP rejects); none at all without layer gating
        layer_gated = [d for d in wrapped if d.layer_gated]
        self._gate_step = {d.index: k for k, d in enumerate(layer_gated)}
        self.gate = self._make_gate(config.gate_bias, config.embed_dim, config.hidden_dim, layer_gated) \
            if layer_gated else None
        self._register_load_state_dict_pre_hook(self._old_gate_keys)
        # exit heads after every stage but the last (their sizes from a probe of the dense network)
        self.exits = nn.ModuleList()
        self.input_size = tuple(config.input_size)
        if config.exits:
            probe = torch.zeros(2, *self.input_size)
            with self.probing(), self.all_open():
                h = stem(probe)
                for stage in stages[:-1]:
                    h = stage(h)
                    self.exits.append(ExitHead(h.shape[1], self._num_classes(head), h.shape[-1]))
            self.exits.train(model.training)
        self.budget: float | None = None
        self._budget_warned = False
        self.tighten = True
        self.halt_stage = len(stages) - 1
        self.collect_exits = False
        # inference on the CPU: the stem and the ungated first block run channels_last (oneDNN is
        # 2-4x faster there at 16 channels than on NCHW, measured); `channels_last` keeps a gated
        # block in that layout; a group of executed samples whose channel masks run turns to NCHW
        # (masked_conv2d is 2-6% faster there; only that group is copied, not the batch). False:
        # every gated block runs NCHW. A/B on ResNet-38, batch 128, in docs/ddi.md.
        self.stem_channels_last = True
        self.channels_last = True
        self.cost_unit = config.cost
        self.energy = config.energy
        self.table = self.measure_costs(config.cost, energy=config.energy)
        self.budget_exits: dict | None = None  # budget -> best exit, from tune_budget

    def _make_controller(self):
        return DDIController(self)

    def _old_gate_keys(self, state_dict, prefix, *args):
        """Checkpoints written when the layer gate had a projection for every gated block: keep
        those of the blocks it decides, renumbered."""
        old = [k for k in state_dict if k.startswith(prefix + "gate.proj.")]
        if len({k[len(prefix + "gate.proj."):].split(".")[0] for k in old}) != len(self.blocks) \
                or len(self._gate_step) == len(self.blocks):
            return
        for k in old:
            i, rest = k[len(prefix + "gate.proj."):].split(".", 1)
            v = state_dict.pop(k)
            if int(i) in self._gate_step:
                state_dict[f"{prefix}gate.proj.{self._gate_step[int(i)]}.{rest}"] = v
        if self.gate is None:
            for k in [k for k in state_dict if k.startswith(prefix + "gate.")]:
                state_dict.pop(k)

    def _wrap(self, block: nn.Module, index: int) -> DDIBlock:
        c = self.config
        return DDIBlock(block, index=index, stage=self._stage_of[index + 1], channel_gate=c.channel_gates,
                        channel_mode=c.channel_mode, widths=c.widths)

    def _num_choices(self) -> int:
        return 2

    # the config's switches, read where the blocks and the recipe look for them
    layer_gates = property(lambda self: self.config.layer_gates)
    channel_gates = property(lambda self: self.config.channel_gates)
    channel_mode = property(lambda self: self.config.channel_mode)
    widths = property(lambda self: self.config.widths)

    @staticmethod
    def _num_classes(head: nn.Module) -> int:
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TypeError("pyeff.ddi: the network's head has no nn.Linear to size the exit classifiers from")
        return linears[-1].out_features

    # -- costs --------------------------------------------------------------------------------
    def measure_costs(self, unit: str | None = None, batch: int = 64, energy: EnergyModel | None = None,
                      x: Tensor | None = None) -> CostTable:
        """(Re)build the cost table in `unit` ("flops", "energy", or "latency": timed here, on
        `x` or a random batch of `batch`) and make it this net's cost."""
        unit = unit or self.cost_unit
        if x is None:
            x = torch.randn(batch if unit == "latency" else 1, *self.input_size,
                            device=next(self.parameters()).device)
        self._check_input(x)
        with self.probing():  # measuring changes no BatchNorm statistics (nor works on a batch of 1)
            self.table = build_table(self, x, unit, energy or self.energy)
        self.input_size = tuple(x.shape[1:])
        self.cost_unit = unit
        return self.table

    @contextlib.contextmanager
    def all_open(self):
        """Every block executes with every channel (the dense network; gates are not consulted)."""
        with self._forcing(open=True):
            yield self

    @torch.no_grad()
    def eval_all_exits(self, x: Tensor):
        """Run the network once through every stage and every exit head (for cost measurement)."""
        stem, stages, head = self.parts
        self._ctl.reset(x.shape[0], x.device)
        h = stem(x)
        for i, stage in enumerate(stages):
            h = stage(h)
            if i < len(self.exits):
                self.exits[i](h)
        return head(h)

    # -- forward ------------------------------------------------------------------------------
    def _check_input_size(self, x: Tensor) -> None:
        """The cost table's per-layer costs hold for inputs of `input_size` only (a subclass whose
        costs do not depend on the input size, E2-Train's SLU, accepts any)."""
        if tuple(x.shape[1:]) != self.input_size:
            raise ValueError(f"pyeff.ddi: this net's cost table is for inputs of size {self.input_size} (C, H, W), "
                             f"got {tuple(x.shape[1:])}; convert with input_size={tuple(x.shape[1:])} or call "
                             "net.measure_costs(x=a_batch) to re-cost it")

    def forward(self, x: Tensor):
        self._check_input(x)
        self._check_input_size(x)
        stem, stages, head = self.parts
        ctl, t = self._ctl, self.table
        ctl.reset(x.shape[0], x.device)
        ctl.training = self.training
        halt = self.halt_stage if (self.budget is not None and not self.training) else len(stages) - 1
        want_exits = self.training or self.collect_exits
        exit_logits = []
        if self.stem_channels_last and not self.training and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # see __init__
        h = stem(x)
        logits = None
        for i, stage in enumerate(stages):
            ctl.charge(t.ungated[i])
            h = stage(h)
            if i < len(self.exits) and (want_exits or i == halt):
                out = self.exits[i](h)
                exit_logits.append(out)
                if i == halt:
                    ctl.charge(t.exits[i])
                    logits = out
                    break
        if logits is None:
            logits = head(h)
            ctl.charge(t.head)
        n = x.shape[0]
        if self.training and self.budget is not None and not self._budget_warned:
            self._budget_warned = True
            warnings.warn("pyeff.ddi: the budget applies at inference (eval mode); a training forward is steered by "
                          "the cost hinge toward the recipe's target instead", stacklevel=2)
        if self.training:  # differentiable through the gates' straight-through weights
            spent = ctl.spent if isinstance(ctl.spent, Tensor) else torch.full((n,), float(ctl.spent), device=x.device)
        else:  # exact (float64) accounting of what ran
            spent = ctl.spent_exact
        G, ran = len(self.blocks), len(ctl.execute)  # blocks after a halting exit did not run
        execute = torch.zeros(n, G, dtype=torch.bool, device=x.device)
        channels = torch.zeros(n, G, device=x.device)
        if ran:
            execute[:, :ran], channels[:, :ran] = torch.stack(ctl.execute, 1), torch.stack(ctl.channels, 1)
        aux = {"cost": spent / t.dense, "execute": execute, "channels": channels, "exits": exit_logits,
               "halted_at": halt}
        ctl.reset(0, x.device)
        return logits, aux

    # -- budgets ------------------------------------------------------------------------------
    def min_budget(self, stage: int | None = None) -> float:
        """The smallest budget (fraction of the dense cost) that halting after `stage` (default:
        the cheapest exit) can meet."""
        stages = range(len(self.parts[1])) if stage is None else [stage]
        return min(self.table.mandatory(s) for s in stages) / self.table.dense

    def set_budget(self, budget: float | None, exit: int | str = "auto", tighten: bool = True) -> "DDINet":
        """At inference, keep every sample's cost within `budget` (a fraction of the dense network's
        cost in the table's unit; None removes the budget).

        exit: the stage after which to halt (0-based; the last stage = the final classifier), or
            "auto": the best exit measured by `tune_budget` for the largest tuned budget <= `budget`,
            else the deepest exit that fits.
        tighten: True (default): per sample, fewer channels and then skipped blocks wherever the
            gates' choice would overrun the budget. False: halting alone: the deepest exit whose
            cost with every block in full fits, and the gates as they are."""
        if budget is None:
            self.budget, self.halt_stage, self.tighten = None, len(self.parts[1]) - 1, True
            return self
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= 1:
            raise ValueError(f"pyeff.ddi: budget is a fraction of the dense cost in (0, 1] (e.g. 0.5; 1 is the dense "
                             f"network, which no sample exceeds), got {budget!r}")
        last = len(self.parts[1]) - 1
        need = self.table.mandatory if tighten else self.table.full_to
        feasible = [s for s in range(last + 1) if need(s) <= budget * self.table.dense * (1 + 1e-9)
                    and (s == last or s < len(self.exits))]
        if not feasible:
            cheapest = min(need(s) for s in range(len(self.exits) + 1) if s == last or s < len(self.exits))
            raise ValueError(f"pyeff.ddi: a budget of {100 * budget:.1f}% is below the cheapest exit's cost "
                             f"({100 * cheapest / self.table.dense:.1f}% of the dense {self.table.unit}"
                             f"{'' if tighten else ' with every block in full'})")
        if exit == "auto":
            stage = max(feasible)
            if self.budget_exits and tighten:
                tuned = [b for b in self.budget_exits if b <= budget + 1e-12]
                if tuned and self.budget_exits[max(tuned)] in feasible:
                    stage = self.budget_exits[max(tuned)]
        else:
            if not isinstance(exit, int) or isinstance(exit, bool) or not 0 <= exit <= last:
                raise ValueError(f"pyeff.ddi: exit must be 'auto' or a stage in [0, {last}], got {exit!r}")
            if exit not in feasible:
                raise ValueError(f"pyeff.ddi: halting after stage {exit} costs at least "
                                 f"{100 * need(exit) / self.table.dense:.1f}%, above the budget {100 * budget:.1f}%")
            stage = exit
        self.budget, self.halt_stage, self.tighten = float(budget), stage, tighten
        return self

    @torch.no_grad()
    def tune_budget(self, loader, budgets: Iterable[float], tighten: bool = True) -> dict:
        """For each budget, measure the accuracy of halting at every feasible exit on `loader`
        (held-out data) and remember the best, so that `set_budget(b)` picks it. Returns
        {budget: {"exit": stage, "accuracy": acc, "per_exit": {stage: acc}}}."""
        result, best = {}, {}
        old = (self.budget, self.halt_stage, self.tighten)
        try:
            for b in budgets:
                per = {}
                for s in range(len(self.parts[1])):
                    try:
                        self.set_budget(b, exit=s, tighten=tighten)
                    except ValueError:
                        continue
                    per[s] = self.evaluate(loader)["accuracy"]
                if per:
                    s_best = max(per, key=lambda s: (per[s], s))
                    best[float(b)] = s_best
                    result[float(b)] = {"exit": s_best, "accuracy": per[s_best], "per_exit": per}
        finally:
            self.budget, self.halt_stage, self.tighten = old
        if tighten:
            self.budget_exits = best
        return result

    # -- forced decisions (benchmarks, tests) -------------------------------------------------
    @contextlib.contextmanager
    def forced(self, execute=None, channels=None):
        """Within the block, layer decisions are `execute` (bool [G] or [N, G]) and the inner
        channel masks are `channels` (a list of G bool [N, width] tensors, in width mode int64 [N]
        width indices, or None); the gates still run (their cost is real), only their answers are
        replaced."""
        G = len(self.blocks)
        if execute is not None:
            execute = torch.as_tensor(execute)
            if execute.dtype != torch.bool or execute.shape[-1] != G or execute.dim() not in (1, 2):
                raise ValueError(f"execute must be a bool tensor of shape [{G}] or [N, {G}], got "
                                 f"{execute.dtype} {tuple(execute.shape)}")
        if channels is not None:
            if len(channels) != G:
                raise ValueError(f"channels needs one entry per gated block ({G}), got {len(channels)}")
            for blk, m in zip(self.blocks, channels):
                if m is None:
                    continue
                if blk.channel_mode == "width":
                    K = len(blk.counts)
                    if m.dtype != torch.int64 or m.dim() != 1 or (m.numel() and not 0 <= int(m.min()) <= int(m.max()) < K):
                        raise ValueError(f"channels[{blk.index}] must be int64 [N] width indices in [0, {K}) in "
                                         f"width mode, got {m.dtype} {tuple(m.shape)}")
                elif m.dtype != torch.bool or m.dim() != 2 or m.shape[1] != blk.width:
                    raise ValueError(f"channels[{blk.index}] must be bool [N, {blk.width}], got {m.dtype} "
                                     f"{tuple(m.shape)}")
        with self._forcing(forced_execute=execute, forced_channels=channels):
            yield self

    # -- parameters and statistics ------------------------------------------------------------
    def gate_parameters(self):
        if self.gate is not None:
            yield from self.gate.parameters()
        for b in self.blocks:
            if b.channel_gate is not None:
                yield from b.channel_gate.parameters()

    # evaluate(loader) (the base's): accuracy, mean and max cost %, and per gated block the
    # execution rate and the mean channel fraction of the samples that executed it
    def _stats_begin(self):
        G = len(self.blocks)
        return torch.zeros(G, dtype=torch.float64), torch.zeros(G, dtype=torch.float64)

    def _stats_batch(self, acc, aux: dict) -> None:
        acc[0].add_(aux["execute"].double().sum(0).cpu())
        acc[1].add_(aux["channels"].double().sum(0).cpu())

    def _stats_end(self, acc, n: int) -> dict:
        execs, chans = acc
        return {"execute_rate": (execs / n).tolist(), "channel_fraction": (chans / torch.clamp(execs, min=1)).tolist(),
                "unit": self.table.unit, "budget": self.budget, "halt_stage": self.halt_stage}


def convert(model: nn.Module, config: DDIConfig | None = None, *, copy_model: bool = True, **overrides) -> DDINet:
    """Give `model` DDI's layer gates, channel gates and early exits.

    Args:
        model: a network with stages of registered blocks: pyeff's CIFAR ResNets / pre-activation
            ResNets / DenseNets (stem, stages(), head), a torchvision ResNet, or your own blocks
            registered with pyeff.dynamic.register_block in such a network.
        config: a DDIConfig (default: DDIConfig()); `overrides` replace its fields, e.g.
            convert(model, cost="energy", channel_mode="width"). See DDIConfig for each field.
        copy_model: convert a deep copy (default) rather than `model` itself.

    The converted net is in the model's mode (train or eval). Sizing the exits and building the
    cost table run forwards in eval mode without autograd: conversion changes no BatchNorm
    statistics.
    """
    hint = " (give the cost as convert(model, cost=...))" if isinstance(config, str) else ""
    return DDINet.convert(model, config, copy_model=copy_model, misuse=hint, **overrides)
