"""pi0.5's joint forward: prefix and action streams run layer by layer through one attention.

This is openpi's ``compute_layer_complete``: at each layer both streams project q/k/v with their
own weights, the concatenated sequence ``[prefix; actions]`` goes through one masked attention
(:func:`ttt_gemma.attention.pi05_attention_mask`), and each stream finishes the layer with its own
output projection, TTT branch and MLP. The cached path (:class:`ttt_gemma.expert.ActionExpert`
with a :class:`ttt_gemma.prefix.PrefixKV`) computes the same action outputs; this module is the
reference it is tested against, and shows that the prefix never depends on the actions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import attend, pi05_attention_mask, positions
from .expert import ActionExpert
from .prefix import StandInPrefixEncoder


def joint_forward(
    encoder: StandInPrefixEncoder,
    expert: ActionExpert,
    features: Tensor,
    action_tokens: Tensor,
    cond: Tensor | None,
    pad_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run prefix and actions jointly with the full pi0.5 mask.

    Args:
        encoder: the prefix model (its depth, KV heads and head dim match the expert's).
        expert: the action expert.
        features: [B, P, F] prefix input features.
        action_tokens: [B, A, C] action-token embeddings.
        cond: [B, C] AdaRMS condition or None.
        pad_mask: [B, P] bool or None.

    Returns:
        (prefix hidden [B, P, C_prefix] after the last layer, action hidden [B, A, C] after the
        expert's final norm).
    """
    if len(encoder.layers) != len(expert.layers):
        raise ValueError(
            f"encoder depth {len(encoder.layers)} != expert depth {len(expert.layers)}"
        )
    hp, pad, cos_p, sin_p = encoder.embed(features, pad_mask)  # (B, P, Cp)
    B, P, _ = hp.shape
    A = action_tokens.shape[1]
    _, pos_a = positions(pad, B, A, hp.device)  # (B, A)
    cos_a, sin_a = expert.rotary(action_tokens, pos_a)  # (B, A, D)
    mask = pi05_attention_mask(pad, A)  # (B, P + A, P + A)
    ha = action_tokens
    for enc_layer, exp_layer in zip(encoder.layers, expert.layers):
        qp, kp, vp, gp = enc_layer.attn_in(hp, None, cos_p, sin_p)
        qa, ka, va, ga = exp_layer.attn_in(ha, cond, cos_a, sin_a)
        q = torch.cat([qp, qa], dim=2)  # (B, H, P + A, D)
        k = torch.cat([kp, ka], dim=2)  # (B, KV, P + A, D)
        v = torch.cat([vp, va], dim=2)
        ctx = attend(q, k, v, mask, exp_layer.head_dim**-0.5)  # (B, P + A, H*D)
        hp = enc_layer.attn_out(hp, ctx[:, :P], gp, None)
        ha = exp_layer.attn_out(ha, ctx[:, P:], ga, cond)
    return hp, expert.norm(ha, cond)[0]
