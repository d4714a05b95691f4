"""Atomic checkpoints of a patched Moshi LM, and model building from a config.

A checkpoint is one ``torch.save`` file written to ``<path>.tmp`` and moved into place with
``os.replace`` (a crash never leaves a half-written checkpoint). It holds the full state dict (TTT
blocks included), the `LMModel` constructor arguments and the patch description (`patch_info`), so
`load_checkpoint(path)` rebuilds the same model and gives bit-identical logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel
from torch import nn

from ttt_core import TTTConfig

from .patch import apply_patch_info, patch_info, set_attention_contexts, transformer_of

__all__ = ["build_lm", "load_checkpoint", "save_checkpoint", "ttt_config_for"]


def build_lm(lm_kwargs: dict[str, Any], moshi_weights: str | os.PathLike | None = None) -> LMModel:
    """A moshi `LMModel(**lm_kwargs)`, with a plain Moshi checkpoint loaded if given (strict)."""
    if not isinstance(lm_kwargs, dict) or not lm_kwargs:
        raise ValueError("lm_kwargs must be a non-empty mapping of moshi LMModel arguments")
    lm = LMModel(**lm_kwargs)
    if moshi_weights is not None:
        from safetensors.torch import load_file

        path = Path(moshi_weights)
        if path.suffix != ".safetensors":
            raise ValueError(f"moshi_weights must be a .safetensors file, got {path.name!r}")
        lm.load_state_dict(load_file(str(path)), strict=True)
    return lm


def ttt_config_for(
    lm: nn.Module,
    *,
    inner: str = "linear",
    num_heads: int | None = None,
    mini_batch_size: int = 16,
    base_lr: float = 1.0,
    gate_init: float = 0.1,
    **extra: Any,
) -> TTTConfig:
    """The TTTConfig matching ``lm``'s width: causal, tanh(alpha) gate, learnable per-token eta.

    Default TTT width: a quarter of the model's heads (at least one), each of the attention's head
    dim, so the inner width is ``dim / 4`` (Moshi 7B: 8 TTT heads of 128). The TTT block's
    projections are read for every streamed token, so its width sets its share of a streaming step:
    at a quarter width the block adds about 10-20% to a step (``benchmarks/moshi.py``), at full
    width 30-50%. Pass ``num_heads`` (and ``head_dim``) for another width.
    """
    layer0 = transformer_of(lm).layers[0]
    dim = int(layer0.self_attn.embed_dim)
    attn_heads = int(layer0.self_attn.num_heads)
    heads = int(num_heads or max(1, attn_heads // 4))
    extra.setdefault("head_dim", dim // attn_heads)
    return TTTConfig(
        hidden_size=dim,
        num_heads=heads,
        inner=inner,
        mini_batch_size=mini_batch_size,
        causal=True,
        base_lr=base_lr,
        gate="tanh_alpha",
        gate_init=gate_init,
        **extra,
    )


def save_checkpoint(
    path: str | os.PathLike,
    lm: nn.Module,
    lm_kwargs: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the model (+ optimizer/scheduler state) atomically: tmp file, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": "ttt-moshi/1",
        "model": {k: v.detach().cpu() for k, v in lm.state_dict().items()},
        "lm_kwargs": dict(lm_kwargs),
        "patch": patch_info(lm),
        "step": int(step),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(
    path: str | os.PathLike, lm: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a `save_checkpoint` file; returns ``(lm, payload)``.

    With ``lm=None`` a fresh `LMModel(**payload["lm_kwargs"])` is built and patched like the saved
    one; a given plain ``lm`` is patched in place; a given patched ``lm`` must match the layers.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "ttt-moshi/1":
        raise ValueError(f"{path} is not a ttt-moshi checkpoint")
    info = payload["patch"]
    if lm is None:
        lm = build_lm(payload["lm_kwargs"])
    current = patch_info(lm)
    if not current["layers"]:
        apply_patch_info(lm, info)
    elif current["layers"] != info["layers"]:
        raise ValueError(
            f"lm has TTT in layers {current['layers']}, the checkpoint in {info['layers']}"
        )
    else:
        set_attention_contexts(lm, dict(enumerate(info["attention_context"])))
    lm.load_state_dict(payload["model"], strict=True)
    return lm, payload
