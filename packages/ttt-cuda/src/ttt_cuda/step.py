"""The single-token streaming step: ttt-core's public step entry calls it through the backend
(``ttt_linear_step`` / ``ttt_mlp_step``), one call of the fused op per token and layer, from a
``TTTState`` to the next (the op finishes or continues the state's mini-batch: its offset,
start weights and grad_sum; Titans: momentum and current weights).

Shapes: q, k, v [B, H, 1, D]; eta (momentum, decay) [B, H, 1]; returns ``(o [B, H, 1, D],
TTTState)``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ttt_cuda.linear import linear_call
from ttt_cuda.mlp import mlp_call

__all__ = ["linear_step", "mlp_step"]


def linear_step(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, W1: Tensor, b1: Tensor,
                ln_weight: Tensor, ln_bias: Tensor, *, state: Any, **kwargs: Any):  # fmt: skip
    """One token of TTT-Linear (plain or Titans form) from ``state`` (validated, supported)."""
    return linear_call(q, k, v, eta, W1, b1, ln_weight, ln_bias, causal=True,
                       initial_state=state, output_final_state=True, **kwargs)  # fmt: skip


def mlp_step(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, W1: Tensor, b1: Tensor, W2: Tensor,
             b2: Tensor, ln_weight: Tensor, ln_bias: Tensor, *, state: Any, **kwargs: Any):  # fmt: skip
    """One token of TTT-MLP from ``state`` (validated, supported)."""
    return mlp_call(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, causal=True,
                    initial_state=state, output_final_state=True, **kwargs)  # fmt: skip
