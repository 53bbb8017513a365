"""Which channels a BatchNorm mask lets us remove, found on Torch-Pruning's dependency graph.

A mask (`keep`) says, per BatchNorm2d layer, which of its channels stay: {bn name: bool tensor}.
Its meaning is the *masked network*: every masked channel's BatchNorm output is zero (its scale and
shift set to 0, as Network Slimming and Early-Bird do). Channels are coupled: a residual addition
ties the channels of every conv writing into it, a concatenation ties a layer's outputs to slices
of every later reader. Torch-Pruning's `DependencyGraph` finds these groups; this module decides,
per group and per channel, whether removing it computes exactly what the masked network computes:

    removable  every BatchNorm of the group masks the channel, and either
               (a) every conv writing the channel feeds a BatchNorm of the group (so the channel is
                   zero wherever it is produced: plain ResNets, VGG, MobileNet), or
               (b) every conv or linear layer reading the channel reads it through a BatchNorm of
                   the group (so nobody sees its value: DenseNet's concatenations, the tail of a
                   pre-activation stream).
    zeroed     masked by its BatchNorm but tied to channels that stay: it stays, with that
               BatchNorm's scale and shift at 0 (the masked network, exactly).

A pre-activation stream whose projection shortcut reads the stream raw satisfies neither rule, so
it stays whole; its masked channels are zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

def bn_layers(model: nn.Module) -> dict:
    """{name: module} of the BatchNorm2d layers with a scale (affine), in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}


def check_keep(model: nn.Module, keep: dict, what: str = "pyeff.prune") -> dict:
    """`keep` validated against `model`: {bn name: bool tensor on the CPU}; every BatchNorm2d the
    mask does not name keeps all its channels."""
    bns = bn_layers(model)
    if not bns:
        raise ValueError(f"{what}: {type(model).__name__} has no BatchNorm2d layer with a scale; channel masks "
                         "rank and zero channels by their BatchNorm, so every pruned conv must be followed by one")
    if not isinstance(keep, dict):
        raise TypeError(f"{what}: keep must be a dict {{BatchNorm2d name: bool tensor of channels to keep}} "
                        f"(e.g. EarlyBird.mask(0.5)), got {type(keep).__name__}")
    unknown = sorted(set(keep) - set(bns))
    if unknown:
        raise ValueError(f"{what}: keep names {unknown[:5]}, which are not BatchNorm2d layers of the model; "
                         f"its BatchNorm2d layers are e.g. {list(bns)[:5]}")
    out = {}
    for name, bn in bns.items():
        k = keep.get(name)
        if k is None:
            out[name] = torch.ones(bn.num_features, dtype=torch.bool)
            continue
        k = torch.as_tensor(k)
        if k.dtype != torch.bool or k.shape != (bn.num_features,):
            raise ValueError(f"{what}: keep[{name!r}] must be a bool tensor of shape ({bn.num_features},), "
                             f"got {k.dtype} of shape {tuple(k.shape)}")
        if not bool(k.any()):
            raise ValueError(f"{what}: keep[{name!r}] removes every channel of {name} ({bn.num_features}); a layer "
                             "must keep at least one channel (EarlyBird's masks always keep each layer's largest)")
        out[name] = k.detach().cpu()
    return out


@dataclass
class GroupPlan:
    """One coupled group: its root (module, pruning function), its size, the channels (root
    indices) to remove, and its items as (module name, kind, local indices, root indices)."""
    root: nn.Module
    root_fn: object
    size: int
    remove: torch.Tensor
    items: list = field(default_factory=list)
    rule: str = ""


@dataclass
class ChannelPlan:
    """The result of `channel_plan`: the groups, the dependency graph they came from, and per
    module the channel positions that stay (`out_keep`, `in_keep`: LongTensors; absent = all)."""
    graph: object
    groups: list
    keep: dict
    out_keep: dict = field(default_factory=dict)
    in_keep: dict = field(default_factory=dict)

    def removed(self) -> int:
        return int(sum(int(g.remove.sum()) for g in self.groups))

    def zeroed(self) -> dict:
        """{bn name: bool tensor}: channels masked by `keep` that stay (tied), to be zeroed."""
        out = {}
        for name, k in self.keep.items():
            stay = torch.zeros_like(k)
            idx = self.out_keep.get(name)
            stay[idx if idx is not None else slice(None)] = True
            z = stay & ~k
            if z.any():
                out[name] = z
        return out


def build_graph(model: nn.Module, example_input):
    """Torch-Pruning's DependencyGraph of `model`, traced in eval mode (so the trace leaves the
    BatchNorm statistics alone)."""
    try:
        import torch_pruning as tp
    except ImportError as exc:  # a dependency in requirements.txt; a clear message for pip installs without it
        raise ImportError("pyeff.prune needs Torch-Pruning: pip install torch-pruning") from exc
    was = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces through autograd
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    finally:
        model.train(was)


def default_input(model: nn.Module, size: int = 32) -> torch.Tensor:
    """A 1 x C x size x size input, C the in-channels of the model's first conv."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            p = m.weight
            return torch.randn(1, m.in_channels, size, size, dtype=p.dtype, device=p.device)
    raise ValueError(f"{type(model).__name__} has no Conv2d layer; pass example_input")


def _output_layers(dg) -> list:
    """Conv and linear layers whose output is the model's output (their channels are the answer)."""
    return [m for m, node in dg.module2node.items()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not node.outputs]


def _feeds_bn(dg, module, bns: set) -> bool:
    outs = dg.module2node[module].outputs
    return len(outs) == 1 and outs[0].module in bns


def _reads_through_bn(dg, module, bns: set) -> bool:
    import torch_pruning as tp

    node = dg.module2node[module]
    while len(node.inputs) == 1:
        node = node.inputs[0]
        if node.module in bns:
            return True
        if node.type != tp.ops.OPTYPE.ELEMENTWISE:  # ReLU, pooling: value-preserving for a zero-weight reader
            return False
    return False


def out_size(m) -> int:
    """Output channels of a Conv2d, BatchNorm2d or Linear layer."""
    return m.num_features if isinstance(m, nn.BatchNorm2d) else m.out_channels if isinstance(m, nn.Conv2d) \
        else m.out_features


def in_size(m) -> int:
    """Input channels of a Conv2d or Linear layer."""
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def channel_plan(model: nn.Module, keep: dict, example_input=None, graph=None) -> ChannelPlan:
    """The `ChannelPlan` of `keep` on `model` (see the module docstring for the rule)."""
    keep = check_keep(model, keep)
    x = example_input if example_input is not None else default_input(model)
    dg = graph if graph is not None else build_graph(model, x)
    names = dict(dg._module2name)
    bn_of = {m: n for n, m in bn_layers(model).items()}
    groups = []
    plan = ChannelPlan(dg, groups, keep)
    removed_out, removed_in = {}, {}
    for g in dg.get_all_groups(ignored_layers=_output_layers(dg), root_module_types=(nn.Conv2d, nn.Linear)):
        size = len(g[0].idxs)
        masked_everywhere = torch.ones(size, dtype=torch.bool)
        items, producers, readers, group_bns = [], [], [], set()
        for it in g:
            mod, fn = it.dep.target.module, it.dep.handler
            if not isinstance(mod, nn.Module) or next(mod.parameters(recurse=False), None) is None:
                continue  # parameter-free ops (additions, reshapes) and bare parameters carry indices only
            name = names.get(mod)
            idxs, roots = list(it.idxs), list(it.root_idxs)
            if isinstance(mod, nn.BatchNorm2d):
                kind = "bn"
                group_bns.add(mod)
                k = keep[bn_of[mod]] if mod in bn_of else torch.ones(mod.num_features, dtype=torch.bool)
                for i, r in zip(idxs, roots):
                    if k[i]:
                        masked_everywhere[r] = False
            elif isinstance(mod, nn.Conv2d) and mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1:
                kind = "dw"
                producers.append(mod)
                readers.append(mod)
            elif isinstance(mod, (nn.Conv2d, nn.Linear)):
                kind = "out" if dg.is_out_channel_pruning_fn(fn) else "in"
                (producers if kind == "out" else readers).append(mod)
            else:
                kind = "other"
                masked_everywhere[:] = False  # a parameterised layer pyeff's mask does not speak for
            items.append((name, kind, idxs, roots, mod))
        if not group_bns:
            masked_everywhere[:] = False
        produced_zero = all(_feeds_bn(dg, m, group_bns) for m in producers)
        read_masked = all(_reads_through_bn(dg, m, group_bns) for m in readers)
        rule = "zero where produced" if produced_zero else "read only through masked BN" if read_masked else "none"
        remove = masked_everywhere if (produced_zero or read_masked) else torch.zeros(size, dtype=torch.bool)
        groups.append(GroupPlan(g[0].dep.target.module, g[0].dep.handler, size, remove,
                                [(n, k, i, r) for n, k, i, r, _ in items], rule))
        for name, kind, idxs, roots, mod in items:
            gone = {i for i, r in zip(idxs, roots) if remove[r]}
            if kind in ("out", "bn", "dw"):
                removed_out.setdefault(name, (mod, set()))[1].update(gone)
            if kind in ("in", "dw"):
                removed_in.setdefault(name, (mod, set()))[1].update(gone)
    for table, removed, size in ((plan.out_keep, removed_out, out_size), (plan.in_keep, removed_in, in_size)):
        for name, (mod, gone) in removed.items():
            table[name] = torch.tensor([i for i in range(size(mod)) if i not in gone], dtype=torch.long)
    return plan
