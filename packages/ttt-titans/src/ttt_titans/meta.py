"""MetaLearner: per-step, per-head write rates of the neural memory from backbone features.

    z_t = W_2 gelu(W_1 LN(h_t) + b_1) + b_2                      (B, L, 3 H)
    theta_t = lo_th + (hi_th - lo_th) sigmoid(z_t^theta)          inner lr      in [1e-5, 1e-2]
    eta_t   = lo_et + (hi_et - lo_et) sigmoid(z_t^eta)            momentum      in [0.8, 0.99]
    alpha_t = lo_al + (hi_al - lo_al) sigmoid(z_t^alpha)          forgetting    in [0, 1]

The output bias is set so the rates start at the middle of the theta/eta ranges and at
``alpha_init`` for alpha (little forgetting), and the last layer starts small so the rates start
nearly constant; the outer loss reaches W_1, W_2 through the memory's inner updates.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import MetaConfig


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class MetaLearner(nn.Module):
    def __init__(self, d_model: int, num_heads: int, cfg: MetaConfig) -> None:
        super().__init__()
        for name in ("theta_range", "eta_range", "alpha_range"):
            lo, hi = getattr(cfg, name)
            if not lo < hi:
                raise ValueError(f"meta.{name} must be (lo, hi) with lo < hi, got {(lo, hi)}")
        lo, hi = cfg.alpha_range
        if not lo <= cfg.alpha_init <= hi:
            raise ValueError(f"meta.alpha_init {cfg.alpha_init} outside alpha_range {(lo, hi)}")
        self.num_heads = num_heads
        self.net = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, cfg.hidden),
            nn.GELU(),
            nn.Linear(cfg.hidden, 3 * num_heads),
        )
        last = self.net[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            a = (cfg.alpha_init - lo) / (hi - lo)
            bias = torch.tensor([0.0, 0.0, _logit(a)]).repeat_interleave(num_heads)
            last.bias.copy_(bias)
        # per output unit (theta | eta | alpha, H each): rate = lo + (hi - lo) sigmoid(z), clamped
        # to [lo, hi] against rounding. Built in float64 (the config's numbers exactly) and cast
        # to the compute dtype in forward, so fp64 rates follow the formula to the last bit.
        ranges = (cfg.theta_range, cfg.eta_range, cfg.alpha_range)
        as_units = lambda vals: torch.tensor(vals, dtype=torch.float64).repeat_interleave(num_heads)
        self.register_buffer("lo", as_units([r[0] for r in ranges]), persistent=False)  # (3H,)
        self.register_buffer("hi", as_units([r[1] for r in ranges]), persistent=False)  # (3H,)
        self.register_buffer("span", as_units([r[1] - r[0] for r in ranges]), persistent=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: (B, L, C) -> theta, eta, alpha, each (B, H, L), contiguous (the memory's scan
        reads them in blocks; strided rates cost it copies)."""
        b, n, _ = h.shape
        z = self.net(h)  # (B, L, 3H)
        lo, hi, span = (t.to(z.dtype) for t in (self.lo, self.hi, self.span))  # (3H,) each
        rates = torch.addcmul(lo, span, torch.sigmoid(z)).clamp(lo, hi)  # (B, L, 3H)
        theta, eta, alpha = rates.view(b, n, 3, self.num_heads).permute(2, 0, 3, 1).contiguous()
        return theta, eta, alpha
