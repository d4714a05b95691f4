"""A Gemma decoder layer with AdaRMS conditioning and an optional TTT branch after attention."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import Tensor, nn
from transformers.models.gemma.modeling_gemma import (
    GemmaAttention,
    GemmaMLP,
    GemmaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from ttt_core import TTTConfig, TTTLayer

from .adarms import AdaRMSNorm, gated_residual
from .attention import attend, gemma_config
from .config import TTTOptions


class TTTBranch(nn.Module):
    """``(y, gate) = (TTT(AdaRMS_ttt(x, cond)), g_t)``: a ttt-core ``TTTLayer`` behind its own AdaRMS.

    The AdaRMS dense is zero-initialised (``scale = shift = gate = 0``), so the branch starts
    switched off. With gemma's defaults the layer is non-causal with ``mini_batch_size=None`` (the
    whole action chunk is one mini-batch: every token sees ``W' = W0 - sum_j eta_j grad l_j(W0)``)
    and has no positions, so it is permutation-equivariant over the action tokens.

    Args:
        width: model width C.
        cond_dim: AdaRMS condition size, or None (plain RMSNorm; gate None).
        options: the TTT options (``gating``: the AdaRMS gate, the layer's ``tanh(alpha)``, both).
        layer: the resolved ``TTTConfig`` of the layer (``ActionExpertConfig.ttt_layer_config()``).
        eps: RMSNorm eps.
    """

    def __init__(
        self, width: int, cond_dim: int | None, options: TTTOptions, layer: TTTConfig, eps: float
    ):
        super().__init__()
        self.use_adarms_gate = options.gating in ("adarms", "both")
        self.input = options.input  # "residual" | "attn_output": what the block feeds the branch
        self.norm = AdaRMSNorm(width, cond_dim, eps, zero_init=options.zero_init_adarms)
        self.layer = TTTLayer(layer)

    def forward(self, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x: [B, L, C]; cond: [B, C_cond] or None -> (y [B, L, C], gate [B, 1, C] or None)."""
        normed, gate = self.norm(x, cond)  # (B, L, C), (B, 1, C) | None
        y, _ = self.layer(normed)  # non-causal: no state
        return y, (gate if self.use_adarms_gate else None)


class GemmaBlock(nn.Module):
    """One decoder layer: attention -> gated residual -> [TTT branch] -> MLP -> gated residual.

    With ``ttt.input="residual"``: ``h1 = h + g_a * o_proj(Attn(AdaRMS_in(h)))``,
    ``h2 = h1 + g_t * TTT(AdaRMS_ttt(h1))``; with ``ttt.input="attn_output"``:
    ``a = o_proj(Attn(AdaRMS_in(h)))``, ``h2 = h + g_a * (a + g_t * TTT(AdaRMS_ttt(a)))``. Then
    ``out = h2 + g_m * MLP(AdaRMS_post(h2))``. Gates are [B, 1, C] with AdaRMS, else None
    (plain residual). Submodule names follow Gemma (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``) so pi0.5 weights load by name.

    The attention is split in two halves (:meth:`attn_in`, :meth:`attn_out`) so the same layer
    serves the cached-prefix path and the layer-by-layer joint path (:mod:`ttt_gemma.joint`).
    """

    def __init__(
        self,
        *,
        width: int,
        mlp_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rms_eps: float,
        rope_theta: float,
        cond_dim: int | None,
        ttt: TTTOptions | None = None,
        ttt_layer: TTTConfig | None = None,
        layer_idx: int = 0,
    ):
        super().__init__()
        cfg = gemma_config(
            width=width,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            depth=layer_idx + 1,
            rms_eps=rms_eps,
            rope_theta=rope_theta,
        )
        self.head_dim = head_dim
        self.input_layernorm = AdaRMSNorm(width, cond_dim, rms_eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.ttt = None if ttt is None else TTTBranch(width, cond_dim, ttt, ttt_layer, rms_eps)
        self.post_attention_layernorm = AdaRMSNorm(width, cond_dim, rms_eps)
        self.mlp = GemmaMLP(cfg)

    def attn_in(self, h: Tensor, cond: Tensor | None, cos: Tensor, sin: Tensor):
        """Normalise and project. h: [B, L, C]; cos, sin: [B, L, D].

        Returns:
            q [B, H, L, D], k [B, KV, L, D], v [B, KV, L, D] (q, k rotated), gate_attn.
        """
        x, gate = self.input_layernorm(h, cond)
        B, L, _ = x.shape
        a = self.self_attn
        q = a.q_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, H, L, D)
        k = a.k_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, KV, L, D)
        v = a.v_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)  # (B, KV, L, D)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v, gate

    def attn_out(self, h: Tensor, ctx: Tensor, gate_attn: Tensor | None, cond: Tensor | None):
        """Finish the layer from the attention context ctx [B, L, H*D]; returns [B, L, C]."""
        placement = None if self.ttt is None else self.ttt.input
        attn = self.self_attn.o_proj(ctx)  # (B, L, C)
        if placement == "attn_output":
            y, gate_ttt = self.ttt(attn, cond)
            attn = gated_residual(attn, y, gate_ttt)
        h = gated_residual(h, attn, gate_attn)
        if placement == "residual":
            y, gate_ttt = self.ttt(h, cond)
            h = gated_residual(h, y, gate_ttt)
        x, gate_mlp = self.post_attention_layernorm(h, cond)
        return gated_residual(h, self.mlp(x), gate_mlp)

    def forward(self, h, cond, cos, sin, prefix_k, prefix_v, mask):
        """h: [B, L, C]; prefix_k/v: [B, KV, P, D] or None; mask: [B, L, P + L] bool."""
        q, k, v, gate = self.attn_in(h, cond, cos, sin)
        if prefix_k is not None:
            k = torch.cat([prefix_k.to(k.dtype), k], dim=2)  # (B, KV, P + L, D)
            v = torch.cat([prefix_v.to(v.dtype), v], dim=2)
        ctx = attend(q, k, v, mask, self.head_dim**-0.5)  # (B, L, H*D)
        return self.attn_out(h, ctx, gate, cond)


def gemma_stack(
    c, *, cond_dim: int | None, ttt_layers: Collection[int] = ()
) -> tuple[GemmaRotaryEmbedding, nn.ModuleList]:
    """The RoPE table and the ``c.depth`` blocks of a Gemma stack.

    ``c`` is any config with width, mlp_dim, num_heads, num_kv_heads, head_dim, depth, rms_eps and
    rope_theta (the expert's and the stand-in prefix encoder's); the layers in ``ttt_layers`` get
    a TTT branch built from ``c.ttt`` and ``c.ttt_layer_config()`` (an ``ActionExpertConfig``)."""
    dims = dict(width=c.width, mlp_dim=c.mlp_dim, num_heads=c.num_heads,
                num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, rms_eps=c.rms_eps,
                rope_theta=c.rope_theta)  # fmt: skip
    rotary = GemmaRotaryEmbedding(gemma_config(depth=c.depth, **dims))
    ttt = dict(ttt=c.ttt, ttt_layer=c.ttt_layer_config()) if ttt_layers else {}
    layers = nn.ModuleList(
        GemmaBlock(**dims, cond_dim=cond_dim, **(ttt if i in ttt_layers else {}), layer_idx=i)
        for i in range(c.depth)
    )
    return rotary, layers
