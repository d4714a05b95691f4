"""Gemma pieces from `transformers` and pi0.5's joint prefix/action attention (mask, positions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GemmaConfig

# openpi's additive mask value (finite, so a fully masked padding row stays finite: uniform weights)
MASK_VALUE = -2.3819763e38


def gemma_config(
    *,
    width: int,
    mlp_dim: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    depth: int,
    rms_eps: float,
    rope_theta: float,
) -> GemmaConfig:
    """A `transformers.GemmaConfig` for the Gemma modules we reuse (MLP, attention projections,
    rotary embedding). Vocabulary and embeddings are not used (the expert takes embeddings)."""
    return GemmaConfig(
        vocab_size=8,
        hidden_size=width,
        intermediate_size=mlp_dim,
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=rms_eps,
        rope_theta=rope_theta,
        attention_bias=False,
        use_bidirectional_attention=True,
    )


def make_att_2d_masks(pad_masks: Tensor, ar_masks: Tensor) -> Tensor:
    """openpi's block mask: token i sees token j iff ``cumsum(ar)[j] <= cumsum(ar)[i]`` and both
    are real tokens.

    Args:
        pad_masks: [B, N] bool, True for real tokens.
        ar_masks: [B, N] or [N] int/bool; 1 starts a new block that earlier blocks cannot see.

    Returns:
        [B, N, N] bool, True where query i may attend key j.
    """
    if pad_masks.ndim != 2:
        raise ValueError(f"pad_masks: expected [B, N], got {tuple(pad_masks.shape)}")
    ar = ar_masks.long().expand_as(pad_masks)
    cum = ar.cumsum(dim=1)  # (B, N)
    att = cum[:, None, :] <= cum[:, :, None]  # (B, N, N)
    pad = pad_masks[:, None, :] & pad_masks[:, :, None]  # (B, N, N)
    return att & pad


def pi05_attention_mask(prefix_pad_mask: Tensor, num_actions: int) -> Tensor:
    """The full pi0.5 mask over ``[prefix; actions]``: the prefix is one bidirectional block, the
    action chunk a second block that sees the prefix and itself; the prefix never sees actions.

    Args:
        prefix_pad_mask: [B, P] bool.
        num_actions: A, the action horizon (pi0.5 has no state token in the suffix).

    Returns:
        [B, P + A, P + A] bool.
    """
    B, P = prefix_pad_mask.shape
    dev = prefix_pad_mask.device
    pad = torch.cat([prefix_pad_mask, torch.ones(B, num_actions, dtype=torch.bool, device=dev)], 1)
    ar = torch.zeros(P + num_actions, dtype=torch.long, device=dev)
    ar[P] = 1  # the action block starts here
    return make_att_2d_masks(pad, ar)


def positions(prefix_pad_mask: Tensor | None, batch: int, num_actions: int, device) -> tuple:
    """RoPE positions ``cumsum(pad) - 1`` of the prefix and of the actions (which continue after
    the last real prefix token).

    Returns:
        (prefix positions [B, P] or None, action positions [B, A]) long tensors.
    """
    ar = torch.arange(num_actions, device=device)[None].expand(batch, -1)  # (B, A)
    if prefix_pad_mask is None:
        return None, ar
    prefix_pos = prefix_pad_mask.long().cumsum(1) - 1  # (B, P)
    return prefix_pos, ar + prefix_pad_mask.long().sum(1, keepdim=True)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Masked multi-query attention ``softmax(q k^T * scale + mask) v``.

    Args:
        q: [B, H, Lq, D]; k, v: [B, KV, Lk, D] with H a multiple of KV.
        mask: [B, Lq, Lk] bool, True = may attend.

    Returns:
        [B, Lq, H * D].
    """
    B, H, Lq, D = q.shape
    bias = torch.where(mask, 0.0, MASK_VALUE).to(q.dtype)[:, None]  # (B, 1, Lq, Lk)
    out = F.scaled_dot_product_attention(  # (B, H, Lq, D); KV heads shared by groups of queries
        q, k, v, attn_mask=bias, scale=scale, enable_gqa=k.shape[1] != H
    )
    return out.transpose(1, 2).reshape(B, Lq, H * D)
