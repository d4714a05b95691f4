"""Adaptive RMSNorm (AdaRMS) of pi0.5 and the gated residual."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AdaRMSNorm(nn.Module):
    """Gemma RMSNorm, optionally modulated by a condition (pi0.5's AdaRMS).

    Without a condition dim (plain Gemma): ``y = rms_norm(x) * (1 + weight)``, gate ``None``.
    With ``cond_dim``: ``[scale, shift, gate] = dense(cond)``, ``y = rms_norm(x) * (1 + scale) +
    shift``; the gate multiplies the branch output in the residual (:func:`gated_residual`).
    ``rms_norm(x) = x / sqrt(mean(x^2) + eps)`` is computed in fp32. Parameter names follow openpi's
    patched ``GemmaRMSNorm`` (``weight`` or ``dense.weight``/``dense.bias``), so checkpoints map 1:1.

    Args:
        dim: normalised size C.
        cond_dim: size of the condition vector, or None for a plain RMSNorm.
        eps: added to the mean square.
        zero_init: zero the dense weight *and* bias (scale = shift = gate = 0 at start). openpi
            zeroes only the weight; the TTT branch zeroes both so it starts switched off.
    """

    def __init__(
        self, dim: int, cond_dim: int | None = None, eps: float = 1e-6, zero_init: bool = False
    ):
        super().__init__()
        self.dim, self.cond_dim, self.eps = dim, cond_dim, eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.dense.weight)
            if zero_init:
                nn.init.zeros_(self.dense.bias)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Normalise ``x``.

        Args:
            x: [B, L, C].
            cond: [B, cond_dim] (required iff the norm has a dense layer).

        Returns:
            (y [B, L, C] in x's dtype, gate [B, 1, C] or None).
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: expected last dim {self.dim}, got shape {tuple(x.shape)}")
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, L, C)
        if self.dense is None:
            if cond is not None:
                raise ValueError("cond: this norm has no condition (cond_dim=None); pass None")
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None or cond.ndim != 2 or cond.shape[-1] != self.cond_dim:
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond: expected [B, {self.cond_dim}], got {got}")
        mod = self.dense(cond).unsqueeze(1)  # (B, 1, 3C)
        scale, shift, gate = mod.chunk(3, dim=-1)  # each (B, 1, C)
        y = normed * (1.0 + scale.float()) + shift.float()
        return y.to(x.dtype), gate.to(x.dtype)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    """``x + y`` (gate None) or ``x + gate * y`` with gate [B, 1, C] broadcast over tokens."""
    return x + y if gate is None else x + y * gate
