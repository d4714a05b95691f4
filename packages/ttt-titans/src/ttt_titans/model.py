"""ContinualForecaster: embedding -> backbone -> (neural memory, written at meta-learned rates)
-> gated fusion -> prediction head.

    e = Embed(x)                          (B, L, C)     per-step embedding of the lookback window
    h = Backbone(e)                       (B, L, C)
    theta, eta, alpha = Meta(h) | const   (B, Hm, L)    meta_ttt | simple_ttt
    m = NeuralMemory(e; rates, state)     (B, L, C)     long-term memory read-out
    z = h + sigmoid(W_g [h; m]) * m       (B, L, C)     gated fusion (Titans MAG); baseline: z = h
    y = W_o z_L + W_s x_{1..L}^{target}   (B, horizon)  head on the last step + linear skip

The memory writes the step embeddings e (not h), so every step of the stream is written once
when the caller carries the memory state across windows (see ``train.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ttt_core import TTTState

from .backbones import build_backbone
from .config import ExperimentConfig
from .memory import NeuralMemory
from .meta import MetaLearner


class ContinualForecaster(nn.Module):
    def __init__(self, cfg: ExperimentConfig, n_inputs: int, target_in: int | None) -> None:
        """n_inputs: V_in input columns; target_in: index of the target among them (skip path)."""
        super().__init__()
        c = cfg.model.d_model
        self.mode = cfg.mode
        self.horizon = cfg.data.horizon
        self.lookback = cfg.data.lookback
        self.target_in = target_in
        self.embed = nn.Linear(n_inputs, c)
        self.backbone = build_backbone(cfg.model)
        self.memory: NeuralMemory | None = None
        self.meta: MetaLearner | None = None
        if self.mode != "baseline":
            self.memory = NeuralMemory(c, cfg.memory)
            self.gate = nn.Linear(2 * c, c)
            nn.init.constant_(self.gate.bias, -1.0)
            mc = cfg.memory
            self.register_buffer("fixed_rates", torch.tensor([mc.theta, mc.eta, mc.alpha]))
        if self.mode == "meta_ttt":
            self.meta = MetaLearner(c, cfg.memory.num_heads, cfg.meta)
        self.head = nn.Linear(c, self.horizon)
        self.skip = nn.Linear(self.lookback, self.horizon) if target_in is not None else None

    def rates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write rates theta, eta, alpha, each (B, Hm, L)."""
        if self.meta is not None:
            return self.meta(h)
        assert self.memory is not None
        b, n, _ = h.shape
        shape = (b, self.memory.num_heads, n)
        th, et, al = self.fixed_rates
        return th.expand(shape), et.expand(shape), al.expand(shape)

    def forward(
        self, x: torch.Tensor, state: TTTState | None = None, commit: int = 0
    ) -> tuple[torch.Tensor, TTTState | None]:
        """x: (B, L, V_in) -> prediction (B, horizon, 1), memory state after ``commit`` steps.

        ``state``: memory state to start from (None: the memory's initial weights).
        """
        if x.ndim != 3 or x.shape[1] != self.lookback:
            raise ValueError(f"x must be (B, lookback={self.lookback}, V), got {tuple(x.shape)}")
        e = self.embed(x)  # (B, L, C)
        h = self.backbone(e)  # (B, L, C)
        new_state = None
        if self.memory is not None:
            theta, eta, alpha = self.rates(h)  # (B, Hm, L) each
            m, new_state = self.memory(e, theta, eta, alpha, state, commit)  # (B, L, C)
            z = h + torch.sigmoid(self.gate(torch.cat([h, m], dim=-1))) * m
        else:
            z = h
        y = self.head(z[:, -1])  # (B, horizon)
        if self.skip is not None:
            y = y + self.skip(x[:, :, self.target_in])
        return y.unsqueeze(-1), new_state  # (B, horizon, 1)

    def outer_parameters(self) -> list[nn.Parameter]:
        """Everything the outer optimiser trains (the memory's fast weights are buffers)."""
        return [p for p in self.parameters() if p.requires_grad]
