"""Atomic checkpoints of a patched Moshi LM, and model building from a config.

A checkpoint is one ``torch.save`` file written with ttt-core's `atomic_save` (a temp file beside
it, fsync, ``os.replace``; on any error, a full disk included, the temp file is removed and an
older file of that name is left as it was). It holds the full state dict (TTT blocks and LoRA
adapters included), the `LMModel` constructor arguments, the patch description (`patch_info`) and
the LoRA shape, so `load_checkpoint(path)` rebuilds the same model and gives bit-identical logits.
It is read back with `safe_load` (``weights_only``: a crafted file cannot run code).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel
from torch import nn

from ttt_core import TTTConfig
from ttt_core.runfiles import atomic_save, reading, safe_load

from .config import ttt_block_config
from .lora import add_lora, lora_info
from .patch import apply_patch_info, patch_info, set_attention_contexts, transformer_of

__all__ = [
    "build_lm",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "ttt_config_for",
]


def build_lm(
    lm_kwargs: dict[str, Any],
    moshi_weights: str | os.PathLike | None = None,
) -> LMModel:
    """A moshi `LMModel(**lm_kwargs)`, with a plain Moshi checkpoint loaded if given (strict)."""
    if not isinstance(lm_kwargs, dict) or not lm_kwargs:
        raise ValueError("lm_kwargs must be a non-empty mapping of moshi LMModel arguments")
    lm = LMModel(**lm_kwargs)
    if moshi_weights is not None:
        from safetensors.torch import load_file

        path = Path(moshi_weights)
        if path.suffix != ".safetensors":
            raise ValueError(f"moshi_weights must be a .safetensors file, got {path.name!r}")
        with reading(path, "moshi_weights file") as p:
            state = load_file(str(p))
        lm.load_state_dict(state, strict=True)
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
    """The TTTConfig of a TTT block for ``lm``'s width (`ttt_block_config`): causal, tanh(alpha)
    gate, learnable per-token eta, a quarter of the model's heads of the attention head dim.

    The TTT block's projections are read for every streamed token, so its width sets its share of
    a streaming step: at a quarter width the block adds about 10-20% to a step
    (``benchmarks/moshi.py``), at full width 30-50%. Pass ``num_heads`` (and ``head_dim``) for
    another width, any other `TTTConfig` field as a keyword.
    """
    attn = transformer_of(lm).layers[0].self_attn
    fields = dict(
        inner=inner,
        num_heads=num_heads,
        mini_batch_size=mini_batch_size,
        base_lr=base_lr,
        gate_init=gate_init,
        **extra,
    )
    return ttt_block_config(int(attn.embed_dim), int(attn.num_heads), fields)


def save_checkpoint(
    path: str | os.PathLike,
    lm: nn.Module,
    lm_kwargs: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    model_state: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write the model (+ optimizer/scheduler state) atomically with `atomic_save`.

    Args:
        model_state: the full state dict to store (default ``lm.state_dict()``; a sharded model
            passes its gathered one).
        optimizer_state: the optimizer's state dict (default ``optimizer.state_dict()``).
    """
    payload = {
        "format": "ttt-moshi/1",
        "model": {k: v.detach().cpu() for k, v in (model_state or lm.state_dict()).items()},
        "lm_kwargs": dict(lm_kwargs),
        "patch": patch_info(lm),
        "lora": lora_info(lm),
        "step": int(step),
        "optimizer": optimizer_state
        if optimizer_state is not None
        else (optimizer.state_dict() if optimizer is not None else None),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra or {},
    }
    return atomic_save(payload, path)


def load_checkpoint(
    path: str | os.PathLike, lm: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a `save_checkpoint` file; returns ``(lm, payload)``.

    With ``lm=None`` a fresh `LMModel(**payload["lm_kwargs"])` is built and patched like the saved
    one; a given plain ``lm`` is patched in place; a given patched ``lm`` must match the layers.
    """
    payload = read_checkpoint(path, map_location)
    info = payload["patch"]
    if lm is None:
        lm = build_lm(payload["lm_kwargs"])
    lora = payload.get("lora")
    if lora is not None and lora_info(lm) is None:
        add_lora(lm, int(lora["rank"]), float(lora["scaling"]))
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


def read_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """The payload of a `save_checkpoint` file, loaded safely (ValueError naming a bad file)."""
    payload = safe_load(path, map_location=map_location)
    if not isinstance(payload, dict) or payload.get("format") != "ttt-moshi/1":
        raise ValueError(f"{str(path)!r} is not a ttt-moshi checkpoint")
    return payload
