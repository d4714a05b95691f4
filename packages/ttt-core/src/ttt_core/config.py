"""`TTTConfig`: every option of a :class:`~ttt_core.TTTLayer`, grouped in one dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ops.common import RECONSTRUCTION_TARGETS

__all__ = ["TTTConfig"]

INNER = ("linear", "mlp")
GATES = ("none", "gelu", "tanh_alpha")
TOKEN_SCALES = ("mean", "sum", "learnable")
_BOOL_FIELDS = ("causal", "titans", "qk_l2_norm", "normalize_target", "target_norm_affine",
                "output_residual", "bidirectional", "post_norm", "use_dual_form", "bias",
                "check_finite_state")  # fmt: skip


@dataclass
class TTTConfig:
    """Configuration of a TTT layer ``[B, L, C] -> [B, L, C]``."""

    hidden_size: int  # C, the model width
    num_heads: int  # H
    head_dim: int | None = None  # D; default C // H
    inner: str = "linear"  # fast model: "linear" (x W + b) or "mlp" (gelu MLP, F = mlp_ratio * D)
    mlp_ratio: int = 4  # F / D for the mlp fast model
    mini_batch_size: int | None = 16  # b; None: the whole sequence is one mini-batch
    causal: bool = (
        True  # False: batch-parallel update, every query sees the mini-batch's end weights
    )
    token_scale: str = "mean"  # s_i: "mean" 1/(i+1), "sum" 1, "learnable" (init 1/(i+1), needs b)
    base_lr: float = 1.0  # eta_j = base_lr * sigmoid(x_j W_lr + b_lr) / D
    titans: bool = False  # learnable per-token momentum and decay (Titans form; causal only)
    gate: str = (
        "none"  # "none" | "gelu" (g_proj, TTT paper) | "tanh_alpha" (static per-dim tanh(alpha))
    )
    gate_init: float = (
        0.1  # alpha at init for "tanh_alpha" (and the reverse pass); 0 -> output exactly 0
    )
    qk_l2_norm: bool = False  # L2-normalise q and k per head
    normalize_target: bool = False  # standardise the target per token (zero mean, unit var)
    target_norm_affine: bool = False  # with normalize_target: learnable per-head [H, D] weight
    # (init 1) and bias (init 0) applied after standardising (the video TTT code's target norm)
    reconstruction_target: str = "residual"  # the token loss's target: "residual" v - k, "value" v
    output_residual: bool = True  # o = q + LN(f(q)); False: o = LN(f(q))
    bidirectional: bool = False  # also run on the reversed sequence (same weights, own tanh gate)
    post_norm: bool = True  # LayerNorm over the heads' output before o_proj
    use_dual_form: bool = True  # False: primal form (same result; explicit per-token weights)
    bias: bool = False  # biases in the q/k/v/o projections
    ln_eps: float = 1e-6  # epsilon of the inner per-head LayerNorm
    init_std: float = 0.02  # std of projection and fast-weight init
    backend: str = "auto"  # "auto" | "torch" | "generic" | a registered backend
    # G: recompute groups of G mini-batches in the backward (gradient checkpointing); None: off
    checkpoint_group_size: int | None = None
    # raise when a carried state turns NaN/Inf (reads values: syncs a GPU)
    check_finite_state: bool = False

    def __post_init__(self) -> None:
        """Every field checked by type and range; errors name the field (``TTTConfig.<name>``).
        Bool fields take bools only (a YAML/CLI string "false" would otherwise switch one on)."""
        for name in ("hidden_size", "num_heads", "mlp_ratio"):
            _check_count(name, getattr(self, name))
        for name in ("head_dim", "mini_batch_size", "checkpoint_group_size"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name))
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TTTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        _check_number("base_lr", self.base_lr, "> 0", lambda v: v > 0)
        _check_number("ln_eps", self.ln_eps, "> 0", lambda v: v > 0)
        _check_number("init_std", self.init_std, ">= 0", lambda v: v >= 0)
        _check_number("gate_init", self.gate_init)
        for name, choices in (("inner", INNER), ("gate", GATES), ("token_scale", TOKEN_SCALES),
                              ("reconstruction_target", RECONSTRUCTION_TARGETS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"TTTConfig.{name} must be one of {choices}, got {getattr(self, name)!r}"
                )
        if not isinstance(self.backend, str):
            raise ValueError(f"TTTConfig.backend must be a backend name, got {self.backend!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"TTTConfig.hidden_size={self.hidden_size} is not divisible by "
                    f"num_heads={self.num_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.token_scale == "learnable" and self.mini_batch_size is None:
            raise ValueError("TTTConfig.token_scale='learnable' needs a finite mini_batch_size")
        if self.titans and not self.causal:
            raise ValueError("TTTConfig.titans=True (momentum/decay) needs causal=True")
        if self.target_norm_affine and not self.normalize_target:
            raise ValueError("TTTConfig.target_norm_affine=True needs normalize_target=True")

    @property
    def inner_width(self) -> int:
        """H * D, the width of the heads' concatenated output."""
        return self.num_heads * self.head_dim


def _check_count(name: str, value) -> None:
    """A positive int (not a bool), else ValueError naming ``TTTConfig.<name>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TTTConfig.{name} must be a positive int, got {value!r}")


def _check_number(name: str, value, rule: str = "", ok=None) -> None:
    """A finite int or float (not a bool) for which ``ok(value)`` holds (if given), else
    ValueError naming ``TTTConfig.<name>`` and ``rule``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        what = f"a finite number {rule}".rstrip()
        raise ValueError(f"TTTConfig.{name} must be {what}, got {value!r}")
    if ok is not None and not ok(value):
        raise ValueError(f"TTTConfig.{name} must be {rule}, got {value!r}")
