"""Why TTT does or does not carry information past the attention window: three measurements.

1. **Recall of recurring names** (`name_recurrence`, `category_losses`): the per-token loss on the
   bytes of names (identifiers of 4+ characters, after their first byte) whose previous occurrence
   in the sequence lies wholly beyond the attention's reach -- only a memory other than attention
   (the TTT fast weights) can copy them -- against names whose previous occurrence attention can
   see, and names seen for the first time (nothing to recall: the control). If the TTT layers
   recall names, the TTT variant gains more on the first kind than on the control.
2. **The gates** (`gate_report`): ``tanh(alpha)`` of each TTT block after training and the size
   of the block's output against the residual stream it is added to, ``rms(gate * TTT(norm(x))) /
   rms(x)``: whether the rest of the model listens to the TTT block at all.
3. **The inner loop** (`inner_loss_by_mini_batch`): the inner (reconstruction) loss of each
   mini-batch's tokens at the fast weights' learned init ``W0`` ("fresh"), at the weights after all
   earlier mini-batches ("before": what the memory knows of these tokens from the past) and after
   the mini-batch's own update ("after"), and at the weights built from another window's earlier
   mini-batches (the control). ``before`` below the control means the fast weights hold this
   window's own content; ``before`` below ``fresh`` but equal to the control means they only
   adapt to what all windows share; ``after < before`` alone only means they fit the current
   mini-batch.
4. **The carried memory, ablated** (`fast_weights_reset_every_mini_batch`): the trained TTT model
   with every mini-batch read from ``W0``, nothing carried from one mini-batch to the next
   (attention and everything else unchanged); the loss it loses, by name category, is what the
   model takes from the fast-weight memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import TTTStreamingTransformerLayer
from .losses import token_losses
from .patch import get_ttt_gates, transformer_of, ttt_layer_indices

__all__ = [
    "NAME_CATEGORIES",
    "category_differences",
    "category_losses",
    "fast_weights_reset_every_mini_batch",
    "gate_report",
    "inner_loss_by_mini_batch",
    "name_recurrence",
    "text_token_losses",
    "ttt_inputs",
]

NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{3,}")  # identifiers and words of 4+ characters
NAME_CATEGORIES = ("recurring beyond reach", "recurring within reach", "first occurrence")


def name_recurrence(tokens: np.ndarray, reach: int) -> dict[str, np.ndarray]:
    """Masks [N, T] of the name bytes of byte windows ``tokens`` [N, T] by where the name last
    occurred in the same window (`NAME_CATEGORIES`).

    A name at ``[s, s + n)`` contributes its bytes ``s + 1 .. s + n - 1`` (the first byte cannot be
    recalled from the name itself). The byte at ``t`` is predicted from the bytes before it, and
    local attention stacked to a receptive field of ``reach`` steps sees back to ``t - 1 - reach``.
    With ``p`` the start of the previous occurrence:

    - "recurring beyond reach": ``p + n <= s - reach`` -- no byte of it is visible even from
      ``s + 1``, the earliest byte counted;
    - "recurring within reach": ``p >= s + n - 2 - reach`` -- all of it is visible from ``s + n - 1``,
      the last byte counted (names whose previous occurrence straddles the edge are left out);
    - "first occurrence": the name does not occur earlier in the window.
    """
    masks = {c: np.zeros(tokens.shape, dtype=bool) for c in NAME_CATEGORIES}
    for row, window in enumerate(tokens):
        last_start: dict[bytes, int] = {}
        for m in NAME.finditer(window.astype(np.uint8).tobytes()):
            s, e, name = m.start(), m.end(), m.group()
            n, p = e - s, last_start.get(name)
            if p is None:
                category = "first occurrence"
            elif p + n <= s - reach:
                category = "recurring beyond reach"
            elif p >= s + n - 2 - reach:
                category = "recurring within reach"
            else:
                category = None
            if category is not None:
                masks[category][row, s + 1 : e] = True
            last_start[name] = s
    return masks


@torch.no_grad()
def text_token_losses(lm: nn.Module, windows: Tensor, batch_size: int = 8) -> np.ndarray:
    """CE of every text token of ``windows`` [N, K, T] (teacher forcing): [N, T] (NaN where the
    token is masked)."""
    was_training = lm.training
    lm.eval()
    rows = []
    for s in range(0, windows.shape[0], batch_size):
        tl = token_losses(lm, windows[s : s + batch_size])
        rows.append(torch.where(tl.text_mask, tl.text, torch.nan)[:, 0].double())  # (b, T)
    lm.train(was_training)
    return torch.cat(rows).cpu().numpy()


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def category_losses(losses: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean loss and token count of ``losses`` [N, T] under each mask, and over all tokens (loss
    None where a mask holds no token)."""
    out = {}
    for name, mask in {"all tokens": np.isfinite(losses), **masks}.items():
        values = losses[mask & np.isfinite(losses)]
        out[name] = {"loss": _mean(values), "tokens": int(values.size)}
    return out


def category_differences(
    losses: np.ndarray, reference: np.ndarray, masks: dict[str, np.ndarray]
) -> dict[str, Any]:
    """``losses - reference`` (both [N, T], the same tokens) under each mask and over all tokens:
    the mean and its standard error over the tokens (``std / sqrt(count)``; tokens of a window
    are not independent, so seeds give the honest spread; None where a mask holds no token)."""
    diff = losses - reference  # (N, T)
    out = {}
    for name, mask in {"all tokens": np.isfinite(diff), **masks}.items():
        d = diff[mask & np.isfinite(diff)]
        stderr = float(d.std() / np.sqrt(d.size)) if d.size else None
        out[name] = {"mean": _mean(d), "stderr": stderr}
    return out


def _ttt_layers(lm: nn.Module) -> dict[int, TTTStreamingTransformerLayer]:
    """The TTT layers of the main transformer by index."""
    layers = transformer_of(lm).layers
    return {i: layers[i] for i in ttt_layer_indices(lm)}


@torch.no_grad()
def ttt_inputs(lm: nn.Module, windows: Tensor) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """One forward pass over ``windows`` [N, K, T]; for each TTT layer (by index in the main
    transformer) its residual input ``x``, the TTT block's input ``norm_ttt(x)`` and its gated
    output, each [N, T, C]."""
    captured: dict[int, dict[str, Tensor]] = {i: {} for i in _ttt_layers(lm)}
    hooks = []
    for i, layer in _ttt_layers(lm).items():
        rec = captured[i]
        hooks.append(
            layer.norm_ttt.register_forward_hook(
                lambda _m, args, out, rec=rec: rec.update(x=args[0], h=out)
            )
        )
        hooks.append(layer.ttt.register_forward_hook(
            lambda _m, _args, out, rec=rec: rec.update(y=out[0])))  # fmt: skip
    was_training = lm.training
    lm.eval()
    try:
        token_losses(lm, windows)
    finally:
        for h in hooks:
            h.remove()
        lm.train(was_training)
    return {i: (r["x"], r["h"], r["y"]) for i, r in captured.items()}


def _rms(t: Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def gate_report(lm: nn.Module, inputs: dict[int, tuple[Tensor, Tensor, Tensor]]) -> dict[str, Any]:
    """Per TTT layer: ``tanh(alpha)`` (mean |.|, max |.|; init `TTTConfig.gate_init`) and
    ``rms(gated TTT output) / rms(residual input)`` on the captured inputs (`ttt_inputs`)."""
    out = {}
    layers = _ttt_layers(lm)
    for i, alpha in get_ttt_gates(lm).items():
        gate = torch.tanh(alpha.double())  # (C,)
        x, _, y = inputs[i]
        out[f"layer{i}"] = {
            "gate_init": layers[i].ttt.config.gate_init,
            "gate_abs_mean": float(gate.abs().mean()),
            "gate_abs_max": float(gate.abs().max()),
            "output_rms_over_residual_rms": _rms(y) / _rms(x),
        }
    return out


@torch.no_grad()
def inner_loss_by_mini_batch(layer: TTTStreamingTransformerLayer, h: Tensor) -> dict[str, list]:
    """Mean inner loss of each mini-batch of the TTT block's inputs ``h`` [N, T, C] (`ttt_inputs`,
    N >= 2): lists over the mini-batches of

    - ``fresh``: at the learned init W0 (the mini-batch read alone);
    - ``before``: at the weights after the earlier mini-batches of the same window;
    - ``before_other_window``: at the weights after the earlier mini-batches of another window
      (window ``n - 1``): the control for ``before`` -- if the fast weights hold this window's
      content rather than statistics shared by all windows, ``before`` is the lower;
    - ``after``: after the mini-batch's own update;

    and ``start``, the first position of each mini-batch.

    ``TTTLayer.inner_loss_report`` gives the mean over a whole (causal) sequence, so a mini-batch
    ``[s, e)`` is the difference of the sums over the prefixes ``[:e]`` and ``[:s]`` (the sum over
    all windows of the ``[:s]`` prefixes is the same for ``h`` and for ``h`` rolled by a window)."""
    ttt = layer.ttt
    T = h.shape[1]
    b = ttt.config.mini_batch_size or T
    ends = [*range(b, T, b), T]
    starts = [0, *ends[:-1]]

    def prefix_sums(x: Tensor) -> dict[str, float]:
        rep = ttt.inner_loss_report(x)  # means over N * heads * x.shape[1] tokens
        return {k: float(v) * x.shape[1] for k, v in rep.items()}

    other = h.roll(1, dims=0)  # (N, T, C): window n - 1 in row n
    sums = [{"before": 0.0, "after": 0.0}] + [prefix_sums(h[:, :e]) for e in ends]
    out: dict[str, list] = {k: [] for k in ("fresh", "before", "before_other_window", "after")}
    for j, (s, e) in enumerate(zip(starts, ends)):
        for k in ("before", "after"):
            out[k].append((sums[j + 1][k] - sums[j][k]) / (e - s))
        mixed = prefix_sums(torch.cat([other[:, :s], h[:, s:e]], dim=1))  # (N, e, C)
        out["before_other_window"].append((mixed["before"] - sums[j]["before"]) / (e - s))
        out["fresh"].append(float(ttt.inner_loss_report(h[:, s:e])["before"]))
    return {"start": starts, **out}


def _reset_every_mini_batch(ttt: nn.Module, args: tuple, out: tuple) -> tuple:
    """Forward hook of a `TTTLayer` (not streaming): its output recomputed with every mini-batch
    of its input read as a sequence of its own."""
    h = args[0]  # (B, T, C)
    B, T, C = h.shape
    b = ttt.config.mini_batch_size or T
    pad = (-T) % b  # zeros after the end: causal, they change nothing before them
    chunks = F.pad(h, (0, 0, 0, pad)).reshape(B * (T + pad) // b, b, C)  # (B * n_mb, b, C)
    y, _ = ttt.forward(chunks)  # .forward: not through this hook again
    return y.reshape(B, T + pad, -1)[:, :T], out[1]


@contextmanager
def fast_weights_reset_every_mini_batch(lm: nn.Module) -> Iterator[None]:
    """Inside the block, every TTT layer of ``lm`` reads each mini-batch from its fast weights'
    learned init W0: nothing is carried from one mini-batch to the next (whole sequences, not
    streaming)."""
    hooks = [m.ttt.register_forward_hook(_reset_every_mini_batch) for m in _ttt_layers(lm).values()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
