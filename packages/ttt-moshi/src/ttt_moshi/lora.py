"""LoRA on the attention and feed-forward linears of a Moshi LM, with moshi's own `LoRALinear`.

``y = W x + scaling * B (A x)``, A [rank, in] (Kaiming-uniform init), B [out, rank] (zero init, so
the adapted model starts with the base model's logits). The TTT blocks are not adapted: they are
new and trained in full. `merge_lora` folds ``W + scaling * B A`` back into plain linears (moshi's
`replace_lora_with_linear`), giving a plain Moshi model.
"""

from __future__ import annotations

import math

import torch
from moshi.modules.lora import LoRALinear, replace_all_linear_with_lora, replace_lora_with_linear
from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn

__all__ = ["add_lora", "lora_info", "merge_lora"]


def _adapted_blocks(lm: nn.Module) -> list[nn.Module]:
    """Self-attention and feed-forward modules of every Moshi layer (main and depformer)."""
    blocks = []
    for layer in lm.modules():
        if isinstance(layer, StreamingTransformerLayer):
            blocks.append(layer.self_attn)
            for name in ("gating", "linear1", "linear2"):  # SiLU gating, or the plain FFN
                if isinstance(getattr(layer, name, None), nn.Module):
                    blocks.append(getattr(layer, name))
    return blocks


def add_lora(lm: nn.Module, rank: int, scaling: float) -> list[str]:
    """Replace the attention/FFN linears of ``lm`` by `LoRALinear` (in place); returns their names.

    Args:
        lm: a moshi `LMModel` (patched or not), not adapted yet.
        rank: r of A [r, in] and B [out, r].
        scaling: the factor of ``B A``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling!r}")
    if lora_info(lm) is not None:
        raise ValueError("lm already has LoRA adapters")
    for block in _adapted_blocks(lm):
        replace_all_linear_with_lora(block, rank, scaling)
    names = []
    for name, m in lm.named_modules():
        if isinstance(m, LoRALinear):
            nn.init.kaiming_uniform_(m.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(m.lora_B.weight)
            names.append(name)
    if not names:
        raise ValueError("lm has no attention/feed-forward linears to adapt")
    return names


def lora_info(lm: nn.Module) -> dict[str, float] | None:
    """``{"rank", "scaling"}`` of ``lm``'s adapters, or None without LoRA."""
    for m in lm.modules():
        if isinstance(m, LoRALinear):
            return {"rank": int(m.rank), "scaling": float(m.scaling)}
    return None


@torch.no_grad()
def merge_lora(lm: nn.Module) -> nn.Module:
    """Fold every adapter into its linear, ``W <- W + scaling * B A`` (in place); returns ``lm``."""
    replace_lora_with_linear(lm)
    return lm
