"""The prefix side: per-layer keys/values from a VLM, and a small stand-in encoder that makes them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adarms import AdaRMSNorm
from .attention import attend, make_att_2d_masks, positions
from .config import PrefixEncoderConfig
from .layer import gemma_stack


@dataclass
class PrefixKV:
    """The prefix's per-layer attention keys/values, as the action expert consumes them.

    In pi0.5 these come from PaliGemma's layers (images + language + discretised state); keys are
    already rotated with the prefix positions ``cumsum(pad_mask) - 1``.

    Attributes:
        keys: one [B, KV, P, D] tensor per expert layer.
        values: one [B, KV, P, D] tensor per expert layer.
        pad_mask: [B, P] bool, True for real prefix tokens.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    pad_mask: Tensor

    def __post_init__(self) -> None:
        self.keys, self.values = tuple(self.keys), tuple(self.values)
        if len(self.keys) != len(self.values):
            raise ValueError(f"keys/values: {len(self.keys)} vs {len(self.values)} layers")
        if self.pad_mask.ndim != 2 or self.pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask: expected [B, P] bool, got {tuple(self.pad_mask.shape)}")
        B, P = self.pad_mask.shape
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k.ndim != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[2] != P:
                raise ValueError(
                    f"keys[{i}]/values[{i}]: expected [B={B}, KV, P={P}, D] each, got "
                    f"{tuple(k.shape)} and {tuple(v.shape)}"
                )

    def detach(self) -> PrefixKV:
        return PrefixKV(
            tuple(k.detach() for k in self.keys),
            tuple(v.detach() for v in self.values),
            self.pad_mask,
        )

    def expand(self, repeats: int) -> PrefixKV:
        """Repeat every sample ``repeats`` times along the batch (e.g. several noise draws)."""
        rep = lambda t: t.repeat_interleave(repeats, dim=0)
        return PrefixKV(
            tuple(map(rep, self.keys)), tuple(map(rep, self.values)), rep(self.pad_mask)
        )


class StandInPrefixEncoder(nn.Module):
    """A small bidirectional Gemma encoder standing in for PaliGemma in tests, demos, benchmarks.

    ``h0 = in_proj(features)``; then plain Gemma layers (RMSNorm, multi-query attention with RoPE
    at positions ``cumsum(pad) - 1``, GeGLU MLP), all prefix tokens seeing each other. It returns
    each layer's rotated keys and values as a :class:`PrefixKV` (what the expert attends to).

    Args:
        config: a :class:`PrefixEncoderConfig` (use ``PrefixEncoderConfig.for_expert``).
    """

    def __init__(self, config: PrefixEncoderConfig):
        super().__init__()
        self.config = c = config
        self.in_proj = nn.Linear(c.feature_dim, c.width)
        self.rotary, self.layers = gemma_stack(c, cond_dim=None)
        self.norm = AdaRMSNorm(c.width, None, c.rms_eps)

    def embed(self, features: Tensor, pad_mask: Tensor | None):
        """Input tokens and their RoPE tables. features: [B, P, F] -> (h [B, P, C], pad, cos, sin)."""
        if features.ndim != 3 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"features: expected [B, P, {self.config.feature_dim}], got {tuple(features.shape)}"
            )
        B, P, _ = features.shape
        if pad_mask is None:
            pad_mask = torch.ones(B, P, dtype=torch.bool, device=features.device)
        if pad_mask.shape != (B, P) or pad_mask.dtype != torch.bool:
            raise ValueError(f"pad_mask: expected [{B}, {P}] bool, got {tuple(pad_mask.shape)}")
        h = self.in_proj(features)  # (B, P, C)
        pos, _ = positions(pad_mask, B, 0, features.device)  # (B, P)
        cos, sin = self.rotary(h, pos)  # (B, P, D) each
        return h, pad_mask, cos, sin

    def forward(self, features: Tensor, pad_mask: Tensor | None = None) -> PrefixKV:
        """features: [B, P, F]; pad_mask: [B, P] bool (None: all real) -> PrefixKV."""
        return self.encode(features, pad_mask)[0]

    def encode(self, features: Tensor, pad_mask: Tensor | None = None) -> tuple[PrefixKV, Tensor]:
        """Like :meth:`forward`, also returning the last layer's hidden states [B, P, C]."""
        h, pad_mask, cos, sin = self.embed(features, pad_mask)
        mask = make_att_2d_masks(pad_mask, torch.zeros_like(pad_mask[0], dtype=torch.long))
        keys, values = [], []
        for layer in self.layers:
            q, k, v, gate = layer.attn_in(h, None, cos, sin)  # gate None (no AdaRMS)
            keys.append(k)
            values.append(v)
            h = layer.attn_out(h, attend(q, k, v, mask, layer.head_dim**-0.5), gate, None)
        return PrefixKV(tuple(keys), tuple(values), pad_mask), h
