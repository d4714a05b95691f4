"""Figures (matplotlib, Agg): forecast vs truth on a test stretch, cumulative online MSE."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _stretch(windows: list[list[float]], n: int) -> np.ndarray:
    """Concatenate the first windows' horizons (stride = horizon gives a contiguous stretch)."""
    flat = np.concatenate([np.asarray(w) for w in windows]) if windows else np.zeros(0)
    return flat[:n]


def plot_forecast(results: dict[str, dict], path: str | Path, n_points: int = 240) -> Path:
    """results: mode -> {"pred": [[...]], "true": [[...]]}; one line per mode + the truth."""
    fig, ax = plt.subplots(figsize=(10, 3.5))
    truth = None
    for mode, r in results.items():
        truth = _stretch(r["true"], n_points)
        ax.plot(_stretch(r["pred"], n_points), label=mode, lw=1.0)
    if truth is not None:
        ax.plot(truth, label="truth", color="k", lw=1.4, alpha=0.7)
    ax.set_xlabel("test step (consecutive horizons)")
    ax.set_ylabel("target (normalised)")
    ax.set_title("Online forecasts vs truth")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_cumulative_mse(results: dict[str, dict], path: str | Path) -> Path:
    """Cumulative mean of the per-window MSE over the online stream, one line per mode."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for mode, r in results.items():
        err = np.mean((np.asarray(r["pred"]) - np.asarray(r["true"])) ** 2, axis=1)
        ax.plot(np.cumsum(err) / np.arange(1, len(err) + 1), label=mode)
    ax.set_xlabel("online window")
    ax.set_ylabel("cumulative MSE")
    ax.set_title("Cumulative online MSE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
