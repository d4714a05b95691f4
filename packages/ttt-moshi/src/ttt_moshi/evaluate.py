"""Long-context evaluation: per-position loss curves and their slope over context length.

As in LibriLight-style long-context evaluation, the loss at step t averaged over many held-out
windows, ``curve[t] = mean_{windows, codebooks} CE(t)``, shows whether the model keeps using context
far back: with attention limited to a local window, a model whose loss still falls beyond the window
is using another memory (here the TTT fast weights).

The slope is the least-squares fit ``curve[t] ~ a + slope * log2(t + 1)`` over a range of steps: the
change of loss per doubling of context (negative = longer context helps).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from moshi.models.lm_utils import _delay_sequence
from moshi.utils.compile import no_compile
from torch import Tensor, nn
from tqdm.auto import tqdm

from .losses import on_model_device, token_losses
from .patch import transformer_of

__all__ = [
    "loss_slope",
    "per_position_loss",
    "plot_loss_curves",
    "resident_bytes",
    "smooth",
    "streaming_per_position_loss",
]


@torch.no_grad()
def per_position_loss(
    lm: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = False
) -> np.ndarray:
    """Mean CE at every step over ``windows`` [N, K, T] (all valid tokens of that step): [T]."""
    if windows.dim() != 3:
        raise ValueError(f"windows must be [N, K, T], got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = lm.training
    lm.eval()
    total = torch.zeros(windows.shape[-1], dtype=torch.float64, device="cpu")  # host-side sums
    count = torch.zeros(windows.shape[-1], dtype=torch.float64, device="cpu")
    starts = range(0, windows.shape[0], batch_size)
    for s in tqdm(starts, desc="eval", disable=not progress, leave=False):
        sums, n = token_losses(lm, windows[s : s + batch_size]).per_position()
        total += sums.double().cpu()
        count += n.double().cpu()
    lm.train(was_training)
    return (total / count.clamp_min(1)).numpy()


@torch.no_grad()
def streaming_per_position_loss(
    lm: nn.Module,
    codes: Tensor,
    chunk: int = 1,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position CE of ``codes`` [B, K, T] read in streaming mode, ``chunk`` steps per call
    (1, as Moshi streams; a longer chunk needs every attention window to cover it, see README).

    The main transformer streams (KV ring cache of each layer's window, TTT fast weights carried
    in the layers' state), so memory does not grow with T beyond the [B, K, T] losses themselves:
    sequences many times the training length can be read. The losses are those of
    `token_losses` on the whole sequence (Moshi's delays, masks and the depformer's audio logits),
    which it equals where both fit (tested). ``on_step(steps_read)`` is called after each chunk
    (e.g. to sample the memory in use, `resident_bytes`).

    Returns:
        ``(sums, counts)``, both [T]: CE summed over batch and codebooks at each step, and the
        number of valid tokens; ``sums / counts`` is the per-position loss.
    """
    if codes.dim() != 3 or codes.shape[1] != lm.num_codebooks:
        raise ValueError(f"codes must be [B, {lm.num_codebooks}, T], got {tuple(codes.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    codes = on_model_device(lm, codes)
    B, _, T = codes.shape
    was_training = lm.training
    lm.eval()
    initial = lm._get_initial_token().expand(B, -1, -1)  # (B, K, 1)
    delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)  # (B,K,T+1)
    inputs, targets = (
        delayed[:, :, :-1],
        delayed[:, :, 1:],
    )  # targets[:, k, s] = codes[:, k, s - d_k]
    n_cb = 1 + (lm.dep_q if lm.depformer is not None else 0)  # text + depformer codebooks
    ce = torch.zeros(B, n_cb, T, dtype=torch.float64, device=codes.device)  # on the delayed axis
    with ExitStack() as stack:
        if codes.device.type != "cuda":
            stack.enter_context(no_compile())
        stack.enter_context(transformer_of(lm).streaming(B))  # the depformer runs per step
        starts = range(0, T, chunk)
        for s in tqdm(starts, desc="stream", disable=not progress, leave=False):
            x, tgt = inputs[:, :, s : s + chunk], targets[:, :, s : s + chunk]
            out, text_logits = lm.forward_text(x)  # (B, c, D), (B, 1, c, Vt)
            ce[:, 0, s : s + chunk] = _ce(text_logits[:, 0], tgt[:, 0])
            if n_cb > 1:
                logits = lm.forward_depformer_training(tgt, out)  # (B, dep_q, c, V)
                for k in range(lm.dep_q):
                    ce[:, 1 + k, s : s + chunk] = _ce(logits[:, k], tgt[:, 1 + k])
            if on_step is not None:
                on_step(min(s + chunk, T))
    lm.train(was_training)
    ce, codes = ce.cpu(), codes.cpu()  # the sums below are returned as numpy arrays
    sums = torch.zeros(T, dtype=torch.float64, device="cpu")
    counts = torch.zeros(T, dtype=torch.float64, device="cpu")
    for k in range(n_cb):
        cb = 0 if k == 0 else lm.audio_offset + k - 1  # codebook index in codes
        d = lm.delays[cb]
        valid = codes[:, cb, : T - d] != lm.zero_token_id  # (B, T - d): original steps t
        sums[: T - d] += (ce[:, k, d:] * valid).sum(0)
        counts[: T - d] += valid.sum(0)
    return sums.numpy(), counts.numpy()


def resident_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """CE per token: logits [B, c, V], target [B, c] -> [B, c] fp64 (ids outside the vocabulary,
    the -1 "no input" and the initial token of delayed steps, get a placeholder CE the caller
    masks out)."""
    safe = torch.where((target >= 0) & (target < logits.shape[-1]), target, 0)
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none")
    return ce.double()


def loss_slope(
    curve: Sequence[float] | np.ndarray, start: int = 0, end: int | None = None
) -> float:
    """Least-squares slope of ``curve[t]`` against ``log2(t + 1)`` for ``start <= t < end``."""
    c = np.asarray(curve, dtype=np.float64)
    end = len(c) if end is None else end
    if not 0 <= start < end <= len(c) or end - start < 2:
        raise ValueError(f"need 0 <= start < end <= {len(c)} with >= 2 points, got {start}, {end}")
    x = np.log2(np.arange(start, end) + 1.0)
    y = c[start:end]
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def smooth(curve: np.ndarray, width: int) -> np.ndarray:
    """Centered moving average (edges use the available points); as long as ``curve`` (a width
    past its length is cut to it)."""
    width = min(width, len(curve))
    if width <= 1:
        return np.asarray(curve, dtype=np.float64)
    kernel = np.ones(width)
    num = np.convolve(curve, kernel, mode="same")
    den = np.convolve(np.ones_like(curve), kernel, mode="same")
    return num / den


def plot_loss_curves(
    curves: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    windows: Mapping[str, int] | None = None,
    smooth_width: int = 9,
    title: str = "per-position loss",
) -> Path:
    """Plot per-position loss curves (smoothed) vs step, with attention windows as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        ax.plot(np.arange(len(c)), smooth(np.asarray(c), smooth_width), label=name)
    for label, w in (windows or {}).items():
        ax.axvline(w, ls="--", lw=0.8, color="gray")
        ax.text(w, ax.get_ylim()[1], f" {label}", va="top", fontsize=8, color="gray")
    ax.set_xlabel("position in the sequence (step)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
