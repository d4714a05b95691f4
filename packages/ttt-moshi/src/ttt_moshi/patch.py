"""Patch a Moshi `LMModel` in place: TTT in chosen layers, local attention windows per layer.

The setup we support (issue 5): memory of the long past lives in the TTT fast weights while
attention only looks at a short local window, e.g. TTT layers attend 50 tokens, the others 100::

    from ttt_core import TTTConfig
    cfg = TTTConfig(hidden_size=lm.dim, num_heads=32, gate="tanh_alpha", gate_init=0.0)
    patch_lm(lm, layers=range(0, 32, 4), ttt=cfg, attention_context=100, ttt_attention_context=50)
    ...fine-tune...
    plain = export_plain_state_dict(lm)      # loads into a plain moshi LMModel (strict=True)

`unpatch_lm` strips the TTT blocks again (the Moshi weights were never copied: conversion changes
the class of the existing layer objects and adds two sub-modules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer
from torch import Tensor, nn

from ttt_core import TTTConfig

from .layer import TTTStreamingTransformerLayer, convert_layer, revert_layer

__all__ = [
    "export_plain_state_dict",
    "get_ttt_gates",
    "patch_info",
    "patch_lm",
    "set_attention_contexts",
    "set_ttt_gates",
    "transformer_of",
    "ttt_layer_indices",
    "unpatch_lm",
]


def transformer_of(lm: nn.Module) -> StreamingTransformer:
    """The main (temporal) `StreamingTransformer` of an `LMModel` (or the transformer itself)."""
    if isinstance(lm, StreamingTransformer):
        return lm
    tr = getattr(lm, "transformer", None)
    if not isinstance(tr, StreamingTransformer):
        raise TypeError(
            "lm must be a moshi LMModel (with a .transformer) or a StreamingTransformer, "
            f"got {type(lm)}"
        )
    return tr


def ttt_layer_indices(lm: nn.Module) -> list[int]:
    """Indices of the main transformer's layers that carry a TTT block."""
    layers = transformer_of(lm).layers
    return [i for i, layer in enumerate(layers) if isinstance(layer, TTTStreamingTransformerLayer)]


def set_attention_contexts(
    lm: nn.Module,
    attention_context: int | Mapping[int, int | None] | None = None,
    ttt_attention_context: int | None = None,
) -> list[int | None]:
    """Set the self-attention window (in steps) of every layer of the main transformer.

    Args:
        lm: an `LMModel` or `StreamingTransformer`, not streaming (the KV ring cache is sized from
            the context when streaming starts).
        attention_context: ``None`` keeps the current windows; an int sets every layer; a mapping
            ``{layer_index: context}`` sets the listed layers.
        ttt_attention_context: if given, the window of every TTT layer (applied last).

    Returns:
        the window of every layer after the change.
    """
    tr = transformer_of(lm)
    if tr.is_streaming:
        raise ValueError("lm is streaming: change attention contexts outside of `lm.streaming()`")
    n = len(tr.layers)
    per_layer: dict[int, int | None] = {}
    if isinstance(attention_context, Mapping):
        for i, c in attention_context.items():
            if not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"attention_context has layer index {i!r}; valid are 0..{n - 1}")
            per_layer[i] = _check_context("attention_context", c)
    elif attention_context is not None:
        c = _check_context("attention_context", attention_context)
        per_layer = dict.fromkeys(range(n), c)
    if ttt_attention_context is not None:
        c = _check_context("ttt_attention_context", ttt_attention_context)
        for i, layer in enumerate(tr.layers):
            if isinstance(layer, TTTStreamingTransformerLayer):
                per_layer[i] = c
    for i, c in per_layer.items():
        tr.layers[i].self_attn.context = c
    return [layer.self_attn.context for layer in tr.layers]


def _check_context(name: str, c: Any) -> int | None:
    if c is None:
        return None
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"{name} must be a positive int (steps) or None, got {c!r}")
    return c


def patch_lm(
    lm: nn.Module,
    layers: Iterable[int],
    ttt: TTTConfig,
    attention_context: int | Mapping[int, int | None] | None = None,
    ttt_attention_context: int | None = None,
) -> nn.Module:
    """Give the chosen layers of ``lm``'s main transformer a TTT block, in place.

    Args:
        lm: a moshi `LMModel` (or `StreamingTransformer`), not streaming.
        layers: indices of the layers to convert (0-based, distinct, not converted yet).
        ttt: the TTT block config; ``hidden_size`` must equal the model width, ``causal`` True.
            Exact start from a pretrained checkpoint: ``gate="tanh_alpha", gate_init=0.0``.
        attention_context: attention windows, see `set_attention_contexts` (e.g. 100).
        ttt_attention_context: window of the TTT layers (e.g. 50).

    Returns:
        ``lm`` itself.
    """
    tr = transformer_of(lm)
    if tr.is_streaming:
        raise ValueError("lm is streaming: patch it outside of `with lm.streaming(...)`")
    if not isinstance(ttt, TTTConfig):
        raise TypeError(f"ttt must be a ttt_core.TTTConfig, got {type(ttt)}")
    n = len(tr.layers)
    idx = list(layers)
    for i in idx:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"layers must hold indices in 0..{n - 1}, got {i!r}")
    if len(set(idx)) != len(idx):
        raise ValueError(f"layers has duplicates: {idx}")
    for i in idx:
        if isinstance(tr.layers[i], TTTStreamingTransformerLayer):
            raise ValueError(f"layer {i} already has a TTT block")
    for i in idx:
        convert_layer(tr.layers[i], ttt)
    tr._cached_children = None  # moshi caches the streaming children list
    set_attention_contexts(lm, attention_context, ttt_attention_context)
    return lm


def unpatch_lm(lm: nn.Module, attention_context: int | None = None) -> list[int]:
    """Remove every TTT block (the layers become plain Moshi layers); returns their indices.

    Args:
        attention_context: if given, reset every layer's window to it (e.g. the checkpoint's 3000).
    """
    tr = transformer_of(lm)
    removed = ttt_layer_indices(lm)
    for i in removed:
        revert_layer(tr.layers[i])
    tr._cached_children = None
    if attention_context is not None:
        set_attention_contexts(lm, attention_context)
    return removed


def _ttt_prefixes(lm: nn.Module) -> list[str]:
    prefixes = []
    for name, module in lm.named_modules():
        if isinstance(module, TTTStreamingTransformerLayer):
            base = f"{name}." if name else ""
            prefixes += [f"{base}ttt.", f"{base}norm_ttt."]
    return prefixes


def export_plain_state_dict(lm: nn.Module) -> dict[str, Tensor]:
    """The state dict of ``lm`` without the TTT blocks: loads into a plain moshi `LMModel`.

    The TTT parameters (``...layers.{i}.ttt.*``, ``...layers.{i}.norm_ttt.*``) are dropped; every
    other tensor is detached and cloned, so the export does not alias the live model.
    """
    prefixes = tuple(_ttt_prefixes(lm))
    return {
        k: v.detach().clone()
        for k, v in lm.state_dict().items()
        if not (prefixes and k.startswith(prefixes))
    }


def patch_info(lm: nn.Module) -> dict[str, Any]:
    """What `patch_lm` did, as plain data (stored in checkpoints to rebuild the same model)."""
    tr = transformer_of(lm)
    idx = ttt_layer_indices(lm)
    config = None
    if idx:
        config = dataclasses.asdict(tr.layers[idx[0]].ttt_config)
    return {
        "layers": idx,
        "ttt": config,
        "attention_context": [layer.self_attn.context for layer in tr.layers],
    }


def apply_patch_info(lm: nn.Module, info: Mapping[str, Any]) -> nn.Module:
    """Inverse of `patch_info`: patch a fresh (plain) model the same way."""
    tr = transformer_of(lm)
    ctx = list(info.get("attention_context") or [])
    if ctx and len(ctx) != len(tr.layers):
        raise ValueError(
            f"info['attention_context'] has {len(ctx)} entries for a model of "
            f"{len(tr.layers)} layers"
        )
    if info.get("layers"):
        patch_lm(lm, layers=info["layers"], ttt=TTTConfig(**info["ttt"]))
    if ctx:
        set_attention_contexts(lm, dict(enumerate(ctx)))
    return lm


def is_moshi_layer(module: nn.Module) -> bool:
    """True for any Moshi transformer layer (plain or TTT)."""
    return isinstance(module, StreamingTransformerLayer)


def _gated_layers(lm: nn.Module) -> dict[int, TTTStreamingTransformerLayer]:
    layers = transformer_of(lm).layers
    out = {i: layers[i] for i in ttt_layer_indices(lm)}
    for i, layer in out.items():
        if layer.ttt_config.gate != "tanh_alpha":
            raise ValueError(
                f"layer {i}'s TTT block has gate={layer.ttt_config.gate!r}; the gate accessors "
                "need gate='tanh_alpha' (the ttt_config_for default)"
            )
    return out


def get_ttt_gates(lm: nn.Module) -> dict[int, Tensor]:
    """The gate parameter ``alpha`` [C] of every TTT layer, ``{layer index: alpha}`` (detached copies).

    A TTT block adds ``tanh(alpha) * TTT(norm_ttt(x))`` to the residual stream (per channel), so
    ``alpha = 0`` switches the block off exactly and ``tanh(alpha)`` is the gate's value.
    """
    return {i: layer.ttt.gate_alpha.detach().clone() for i, layer in _gated_layers(lm).items()}


@torch.no_grad()
def set_ttt_gates(lm: nn.Module, alpha: float | Mapping[int, float | Tensor]) -> None:
    """Set the gate parameter ``alpha`` of TTT layers (in place; see `get_ttt_gates`).

    Args:
        alpha: a float for every channel of every TTT layer (``0.0``: every block off, the model
            computes what the unpatched model computes with the same attention windows), or
            ``{layer index: float or [C] tensor}`` for the listed layers.
    """
    layers = _gated_layers(lm)
    values = alpha if isinstance(alpha, Mapping) else dict.fromkeys(layers, alpha)
    for i, value in values.items():
        if i not in layers:
            raise ValueError(f"alpha names layer {i!r}; the TTT layers are {sorted(layers)}")
        target = layers[i].ttt.gate_alpha
        value = torch.as_tensor(value, dtype=target.dtype, device=target.device)
        if value.dim() not in (0, 1) or (value.dim() == 1 and value.shape != target.shape):
            raise ValueError(
                f"alpha[{i}] must be a float or a tensor of shape {list(target.shape)}, "
                f"got shape {list(value.shape)}"
            )
        target.copy_(value.expand_as(target))
