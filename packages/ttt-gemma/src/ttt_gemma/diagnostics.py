"""Per-TTT-layer training diagnostics (gate, inner loss before/after, gradient norm) and plots."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from .layer import TTTBranch


def _full(t: Tensor) -> Tensor:
    """A tensor, or a sharded DTensor (FSDP2) gathered whole."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class TTTDiagnostics:
    """Watches the TTT branches of an expert. Inside ``capture(True)`` each branch's forward
    records, on this process's batch: the mean |AdaRMS gate| ``g_t`` (None without one), the mean
    |tanh(alpha)| of the layer's own gate (None without one), and the inner loss of the chunk's
    tokens at the fast weights before and after the update (``TTTLayer.inner_loss_report``).
    The hook runs inside the layer's forward, where FSDP2 has the layer's weights gathered.

    Args:
        expert: the (unwrapped) :class:`ActionExpert`.
    """

    def __init__(self, expert: nn.Module):
        self.branches = {i: layer.ttt for i, layer in enumerate(expert.layers)
                         if layer.ttt is not None}  # fmt: skip
        self._active = False
        self._seen: dict[int, dict] = {}
        for i, branch in self.branches.items():
            branch.register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def record(branch: TTTBranch, args, output) -> None:
            if not self._active or index in self._seen:  # a recomputation (checkpointing): skip
                return
            x, cond = args
            _, gate = output
            with torch.no_grad():
                inner = branch.layer.inner_loss_report(branch.norm(x, cond)[0])
                alpha = getattr(branch.layer, "gate_alpha", None)
                self._seen[index] = {
                    "layer": index,
                    "gate_abs": None if gate is None else float(gate.abs().float().mean()),
                    "tanh_alpha_abs": None if alpha is None else float(_full(alpha).tanh().abs().mean()),
                    "inner_loss_before": float(inner["before"]),
                    "inner_loss_after": float(inner["after"]),
                }  # fmt: skip

        return record

    @contextlib.contextmanager
    def capture(self, enabled: bool):
        """Record the branches' diagnostics during the forward inside (if ``enabled``)."""
        self._active, self._seen = enabled, {}
        try:
            yield
        finally:
            self._active = False

    def grad_norms(self) -> dict[int, float]:
        """Each branch's gradient norm (after the backward; all its parameters together)."""
        out = {}
        for i, branch in self.branches.items():
            grads = [_full(p.grad).float() for p in branch.parameters() if p.grad is not None]
            out[i] = (
                float(torch.stack([g.pow(2).sum() for g in grads]).sum().sqrt()) if grads else 0.0
            )
        return out

    def records(self, grad_norms: dict[int, float]) -> list[dict]:
        """One record per branch: the captured forward values and the gradient norm."""
        return [{**self._seen.get(i, {"layer": i}), "grad_norm": grad_norms.get(i)}
                for i in self.branches]  # fmt: skip


def plot_metrics(metrics: Path, out: Path) -> None:
    """Loss, mean |gate| and inner loss before/after per TTT layer from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], lw=0.8)
    axes[0].set(yscale="log", xlabel="step", title="flow-matching loss")
    layered = [r for r in rows if r.get("ttt_layers")]
    for i, layer in enumerate(layered[0]["ttt_layers"] if layered else []):
        xs = [r["step"] for r in layered]
        per = [r["ttt_layers"][i] for r in layered]
        gate = [p.get("gate_abs") if p.get("gate_abs") is not None else p.get("tanh_alpha_abs")
                for p in per]  # fmt: skip
        axes[1].plot(
            xs, [math.nan if g is None else g for g in gate], label=f"layer {layer['layer']}"
        )
        line = axes[2].plot(xs, [p.get("inner_loss_before") for p in per], lw=0.8)[0]
        axes[2].plot(xs, [p.get("inner_loss_after") for p in per], ls="--", lw=0.8,
                     color=line.get_color())  # fmt: skip
    axes[1].set(xlabel="step", title="mean |TTT gate|")
    axes[2].set(xlabel="step", title="inner loss before (solid) / after (dashed) the update")
    if layered:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
