"""Gates that make per-sample execution decisions, with hard decisions forward and a
straight-through gradient backward.

- `RecurrentGate`: the SkipNet/DFS gate shared by all blocks: per block, average-pool the feature
  map, a 1x1 conv to an embedding, one LSTM cell carried from block to block, a linear head with
  one logit per choice. Block i's output decides block i+1.
- `ChannelGate`: per block, pool + a small MLP + sigmoid, thresholded to a channel mask (DDI).
- `WidthGate`: per block, pool + a small MLP + a choice among widths (how many channels run).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """`hard` in the forward pass, the gradient of `soft` in the backward pass."""
    return hard - soft.detach() + soft


class GateOutput:
    """A gate's answer for a batch: `decisions` [N] int64 choice per sample, `probs` [N, K] softmax,
    `weights` [N, K] one-hot forward with the straight-through softmax gradient backward. At
    inference `probs` and `weights` are computed only if asked for (most callers need only the
    decisions: a single image's gate is then half the ops)."""

    __slots__ = ("decisions", "_logits", "_probs", "_weights")

    def __init__(self, decisions: Tensor, weights: Tensor | None = None, probs: Tensor | None = None,
                 logits: Tensor | None = None):
        if probs is None and logits is None:
            raise ValueError("GateOutput needs probs or logits")
        self.decisions, self._weights, self._probs, self._logits = decisions, weights, probs, logits

    @property
    def probs(self) -> Tensor:
        if self._probs is None:
            self._probs = self._logits.softmax(dim=1)
        return self._probs

    @property
    def weights(self) -> Tensor:
        if self._weights is None:
            hard = F.one_hot(self.decisions, self.probs.shape[1]).to(self.probs.dtype)
            self._weights = straight_through(hard, self.probs)
        return self._weights


class RecurrentGate(nn.Module):
    """One gate shared by `len(channels)` blocks, choosing among `num_choices` paths.

    Call `reset()` before each batch, then `gate(feature_map, block_index)` in block order.
    Decisions are the argmax (deterministic) in eval mode; in training, `mode="argmax"` keeps the
    argmax (DFS, SkipNet's hybrid training) and `mode="sample"` draws from the softmax.
    `bias` initialises the head's bias, e.g. to favour full execution at the start.
    """

    def __init__(self, channels: Sequence[int], num_choices: int, embed_dim: int = 10,
                 hidden_dim: int = 10, mode: str = "argmax", bias: Sequence[float] | None = None):
        super().__init__()
        if num_choices < 2:
            raise ValueError(f"a gate needs at least 2 choices, got {num_choices}")
        if mode not in ("argmax", "sample"):
            raise ValueError(f"mode must be 'argmax' or 'sample', got {mode!r}")
        self.num_choices, self.mode = num_choices, mode
        self.proj = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in channels)
        self.cell = nn.LSTMCell(embed_dim, hidden_dim)
        self.head = nn.Linear(hidden_dim, num_choices)
        if bias is not None:
            if len(bias) != num_choices:
                raise ValueError(f"bias needs {num_choices} values, got {len(bias)}")
            with torch.no_grad():
                self.head.bias.copy_(torch.as_tensor(bias, dtype=self.head.bias.dtype))
        self._state = None

    def reset(self) -> None:
        self._state = None

    def forward(self, feature: Tensor, block: int, pooled: Tensor | None = None) -> GateOutput:
        """`pooled`: the feature map's global average [N, C] when the caller already has it (DDI
        shares one pooling between its layer and channel gates)."""
        if feature.dim() != 4:
            raise ValueError(f"the gate expects a feature map [N, C, H, W], got shape {tuple(feature.shape)}")
        if not 0 <= block < len(self.proj):
            raise IndexError(f"block {block} out of range for a gate over {len(self.proj)} blocks")
        if pooled is None:
            pooled = feature.mean((2, 3))
        proj = self.proj[block]
        e = F.linear(pooled, proj.weight.flatten(1), proj.bias)
        if self._state is not None and self._state[0].shape[0] != e.shape[0]:
            raise RuntimeError("batch size changed between blocks: call gate.reset() before each batch")
        if not (self.training or torch.is_grad_enabled()):  # inference: the decisions, few ops
            cell = self.cell
            state = self._state
            if state is None:
                z = e.new_zeros(e.shape[0], cell.hidden_size)
                state = (z, z)
            h, c = torch.lstm_cell(e, state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
            self._state = (h, c)
            logits = F.linear(h, self.head.weight, self.head.bias)
            return GateOutput(logits.argmax(dim=1), logits=logits)
        h, c = self.cell(e, self._state)
        self._state = (h, c)
        logits = self.head(h)
        probs = logits.softmax(dim=1)
        if self.training and self.mode == "sample":
            decisions = torch.multinomial(probs.detach(), 1).squeeze(1)
        else:
            decisions = logits.argmax(dim=1)  # == probs.argmax, and exactly the inference path's
        hard = F.one_hot(decisions, self.num_choices).to(probs.dtype)
        return GateOutput(decisions, straight_through(hard, probs), probs)


class ChannelGate(nn.Module):
    """Per-sample output-channel mask for one block: pool, Linear-ReLU-Linear, sigmoid, then a
    hard threshold with a straight-through gradient. Returns ([N, C] float mask, [N, C] bool)."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4, threshold: float = 0.5,
                 init_open: float = 3.0):
        super().__init__()
        hidden = max(4, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        self.threshold = threshold
        with torch.no_grad():  # start with every channel open
            self.fc2.bias.fill_(init_open)

    def scores(self, feature: Tensor, pooled: Tensor | None = None) -> Tensor:
        """[N, C] sigmoid scores; a channel is kept where its score is above the threshold.
        `pooled`: the feature map's global average [N, C] if the caller already has it."""
        if feature.dim() != 4:
            raise ValueError(f"the channel gate expects a feature map [N, C, H, W], got shape {tuple(feature.shape)}")
        if pooled is None:
            pooled = F.adaptive_avg_pool2d(feature, 1).flatten(1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        s = self.scores(feature)
        keep = s > self.threshold
        return straight_through(keep.to(s.dtype), s), keep


class WidthGate(nn.Module):
    """Per-sample choice among `num_choices` widths of a block (how many of its channels run): pool,
    Linear-ReLU-Linear, one logit per width; argmax forward, straight-through softmax backward.
    `bias` initialises the logits (default: favour the widest)."""

    def __init__(self, in_channels: int, num_choices: int, reduction: int = 4, bias: Sequence[float] | None = None):
        super().__init__()
        if num_choices < 1:
            raise ValueError(f"a width gate needs at least one width, got {num_choices}")
        hidden = max(4, in_channels // reduction)
        self.num_choices = num_choices
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, num_choices)
        with torch.no_grad():
            self.fc2.bias.copy_(torch.as_tensor(bias if bias is not None else [0.0] * (num_choices - 1) + [2.0]))

    def forward(self, feature: Tensor, pooled: Tensor | None = None) -> GateOutput:
        if feature.dim() != 4:
            raise ValueError(f"the width gate expects a feature map [N, C, H, W], got shape {tuple(feature.shape)}")
        if pooled is None:
            pooled = F.adaptive_avg_pool2d(feature, 1).flatten(1)
        probs = self.fc2(F.relu(self.fc1(pooled))).softmax(dim=1)
        decisions = probs.argmax(dim=1)
        hard = F.one_hot(decisions, self.num_choices).to(probs.dtype)
        return GateOutput(decisions, straight_through(hard, probs), probs)
