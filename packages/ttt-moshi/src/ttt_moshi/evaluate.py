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
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .losses import token_losses

__all__ = ["loss_slope", "per_position_loss", "plot_loss_curves", "smooth"]


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
    total = torch.zeros(windows.shape[-1], dtype=torch.float64)
    count = torch.zeros(windows.shape[-1], dtype=torch.float64)
    starts = range(0, windows.shape[0], batch_size)
    for s in tqdm(starts, desc="eval", disable=not progress, leave=False):
        sums, n = token_losses(lm, windows[s : s + batch_size]).per_position()
        total += sums.double().cpu()
        count += n.double().cpu()
    lm.train(was_training)
    return (total / count.clamp_min(1)).numpy()


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
    """Centered moving average (edges use the available points)."""
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
