"""The pi0.5 Gemma action expert with TTT branches."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .adarms import AdaRMSNorm
from .attention import positions
from .config import ActionExpertConfig
from .layer import gemma_stack
from .prefix import PrefixKV


class ActionExpert(nn.Module):
    """The Gemma action expert: ``depth`` :class:`GemmaBlock` layers over the action tokens, each
    attending to the prefix's keys/values of the same layer and to all action tokens, then a final
    (Ada)RMSNorm.

    Action tokens are at RoPE positions ``n_prefix + j`` (n_prefix = number of real prefix tokens),
    as in openpi. Layers listed by ``config.ttt_layers()`` carry a TTT branch.

    Args:
        config: an :class:`ActionExpertConfig`.

    Examples:
        >>> cfg = ActionExpertConfig.tiny(use_ttt=True)
        >>> expert = ActionExpert(cfg)
        >>> h = expert(torch.randn(2, 16, cfg.width), torch.randn(2, cfg.width))
        >>> tuple(h.shape)
        (2, 16, 64)
    """

    def __init__(self, config: ActionExpertConfig):
        super().__init__()
        self.config = c = config
        cond_dim = c.width if c.use_adarms else None
        self.rotary, self.layers = gemma_stack(c, cond_dim=cond_dim, ttt_layers=c.ttt_layers())
        self.norm = AdaRMSNorm(c.width, cond_dim, c.rms_eps)
        # recompute each layer in the backward instead of keeping its activations (training only)
        self.gradient_checkpointing = False

    def ttt_parameter_names(self) -> list[str]:
        """Names (as in ``state_dict``) of the parameters that the TTT branches add."""
        return [n for n, _ in self.named_parameters() if ".ttt." in n]

    def _check(self, x: Tensor, cond: Tensor | None, prefix: PrefixKV | None) -> None:
        c = self.config
        if x.ndim != 3 or x.shape[-1] != c.width:
            raise ValueError(f"x: expected [B, A, {c.width}], got {tuple(x.shape)}")
        if c.use_adarms and (cond is None or cond.shape != (x.shape[0], c.width)):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"cond: expected [{x.shape[0]}, {c.width}] (AdaRMS), got {got}")
        if not c.use_adarms and cond is not None:
            raise ValueError("cond: this expert has no AdaRMS (use_adarms=False); pass None")
        if prefix is not None:
            if len(prefix.keys) != c.depth:
                raise ValueError(f"prefix: {len(prefix.keys)} layers of keys, expert has {c.depth}")
            k = prefix.keys[0]
            if k.shape[0] != x.shape[0] or k.shape[1] != c.num_kv_heads or k.shape[3] != c.head_dim:
                raise ValueError(
                    f"prefix.keys: expected [B={x.shape[0]}, KV={c.num_kv_heads}, P, "
                    f"D={c.head_dim}], got {tuple(k.shape)}"
                )

    def forward(self, x: Tensor, cond: Tensor | None, prefix: PrefixKV | None = None) -> Tensor:
        """Run the expert on action tokens.

        Args:
            x: [B, A, C] action-token embeddings.
            cond: [B, C] AdaRMS condition (time embedding), or None when ``use_adarms=False``.
            prefix: per-layer prefix keys/values, or None (actions attend only to each other).

        Returns:
            [B, A, C] normalised hidden states.
        """
        self._check(x, cond, prefix)
        B, A, _ = x.shape
        pad = None if prefix is None else prefix.pad_mask
        _, pos = positions(pad, B, A, x.device)  # (B, A)
        cos, sin = self.rotary(x, pos)  # (B, A, D)
        mask = torch.ones(B, A, A, dtype=torch.bool, device=x.device)  # actions see all actions
        if pad is not None:
            mask = torch.cat([pad[:, None, :].expand(B, A, -1), mask], dim=2)  # (B, A, P + A)
        h = x
        for i, layer in enumerate(self.layers):
            pk = pv = None
            if prefix is not None:
                pk, pv = prefix.keys[i], prefix.values[i]
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, cond, cos, sin, pk, pv, mask, use_reentrant=False)
            else:
                h = layer(h, cond, cos, sin, pk, pv, mask)
        return self.norm(h, cond)[0]
