"""Backbones: per-step embeddings e (B, L, C) -> causal features h (B, L, C).

- ``LSTMBackbone``: stacked LSTM.
- ``TransformerBackbone``: pre-norm causal Transformer encoder with learned positions.
- ``TitansBackbone``: the attention branch of Titans (MAG): causal *sliding-window* attention over
  the last ``window`` steps plus ``n_persistent`` learnable persistent-memory tokens that every
  query can attend to. The long-term neural memory branch is the forecaster's ``NeuralMemory``,
  gated in after this backbone (``ContinualForecaster``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Backbone(nn.Module):
    """Interface: ``forward(e: (B, L, C)) -> h: (B, L, C)``, causal in L."""

    d_model: int


class LSTMBackbone(Backbone):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.lstm = nn.LSTM(
            cfg.d_model,
            cfg.d_model,
            num_layers=cfg.n_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0,
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(e)  # (B, L, C)
        return self.norm(h + e)


class _Block(nn.Module):
    """Pre-norm block: x + Attn(LN x, mask) ; x + MLP(LN x). Optional persistent tokens."""

    def __init__(self, cfg: ModelConfig, n_persistent: int = 0) -> None:
        super().__init__()
        c = cfg.d_model
        if c % cfg.n_heads:
            raise ValueError(f"d_model ({c}) must be divisible by n_heads ({cfg.n_heads})")
        self.n_heads = cfg.n_heads
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.drop = nn.Dropout(cfg.dropout)
        self.persistent = (
            nn.Parameter(0.02 * torch.randn(n_persistent, c)) if n_persistent > 0 else None
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        hd = c // self.n_heads
        y = self.ln1(x)
        if self.persistent is not None:
            y = torch.cat([self.persistent.expand(b, -1, -1), y], dim=1)  # (B, P+L, C)
        q, k, v = self.qkv(y).split(c, dim=-1)
        q, k, v = (t.view(b, -1, self.n_heads, hd).transpose(1, 2) for t in (q, k, v))
        q = q[:, :, -n:]  # queries only for the real steps: (B, nh, L, hd)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, L, hd)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


def _window_mask(n: int, window: int | None, n_persistent: int, device) -> torch.Tensor:
    """Boolean (L, P+L) mask: step i sees persistent tokens and steps j with i-window < j <= i."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    m = j <= i
    if window is not None:
        m = m & (j > i - window)
    if n_persistent:
        m = torch.cat([torch.ones(n, n_persistent, dtype=torch.bool, device=device), m], dim=1)
    return m


class TransformerBackbone(Backbone):
    """Causal pre-norm Transformer with learned positions (full causal attention)."""

    max_len = 4096

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.d_model = cfg.d_model
        self.pos = nn.Parameter(0.02 * torch.randn(self.max_len, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def _mask(self, n: int, device) -> torch.Tensor:
        return _window_mask(n, None, 0, device)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        n = e.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length {n} exceeds max_len {self.max_len}")
        x = e + self.pos[:n]  # (B, L, C)
        mask = self._mask(n, e.device)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x)


class TitansBackbone(TransformerBackbone):
    """Sliding-window causal attention + persistent-memory tokens (Titans' attention branch)."""

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)
        if cfg.window < 1:
            raise ValueError(f"model.window must be >= 1, got {cfg.window}")
        self.d_model = cfg.d_model
        self.window, self.n_persistent = cfg.window, cfg.n_persistent
        self.pos = nn.Parameter(0.02 * torch.randn(self.max_len, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg, cfg.n_persistent) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def _mask(self, n: int, device) -> torch.Tensor:
        return _window_mask(n, self.window, self.n_persistent, device)


def build_backbone(cfg: ModelConfig) -> Backbone:
    kinds = {"lstm": LSTMBackbone, "transformer": TransformerBackbone, "titans": TitansBackbone}
    if cfg.backbone not in kinds:
        raise ValueError(f"model.backbone must be one of {sorted(kinds)}, got {cfg.backbone!r}")
    return kinds[cfg.backbone](cfg)
