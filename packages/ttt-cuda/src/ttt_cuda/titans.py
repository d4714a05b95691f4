"""Fused TTT-Linear in the Titans form (momentum/decay), behind ``fused_ttt_linear``.

Rule (DESIGN.md, causal): S_j = m_j S_{j-1} - eta_j grad l_j(W_start),
W_j = (1 - a_j) W_{j-1} + S_j, o_j = q_j + LN_h(q_j W_j + b_j) (without q_j when
``output_residual`` is False; the target of l_j is v_j - k_j or v_j); S starts at zero and is carried
across mini-batches and in the state (``momentum``; ``current`` = W_j when the state is cut inside
a mini-batch). token_scale does not apply.
"""

from __future__ import annotations

from typing import Any

import torch

from ttt_cuda.common import acc_dtype, op_layout, state_layout
from ttt_cuda.ops.titans import titans_fwd

__all__ = ["titans_linear"]

NAMES = ("W1", "b1")


def titans_linear(q, k, v, eta, ln_weight, ln_bias, *, momentum, decay, state: Any,
                  output_final_state: bool, eps: float, options=("residual", True)):  # fmt: skip
    """Validated inputs from ``state`` (a ``TTTState``; see ``fused_ttt_linear``); ``options``:
    ``(reconstruction_target, output_residual)``. Returns ``(o, state or None)``."""
    B, H, L, _ = q.shape
    acc = acc_dtype(q.dtype)
    zeros = torch.zeros(B, H, L, device=q.device, dtype=acc)
    mom = zeros if momentum is None else momentum.to(acc)  # (B, H, L)
    dec = zeros if decay is None else decay.to(acc)
    W0, b0 = op_layout(state.params, acc)  # P: (B, H, D, D), (B, H, D)
    C0, cb0 = (W0, b0) if state.current is None else op_layout(state.current, acc)
    if state.momentum is None:
        S0, sb0 = torch.zeros_like(W0), torch.zeros_like(b0)
    else:
        S0, sb0 = op_layout(state.momentum, acc)
    b = state.block_size(L)
    o, W_end, b_end, S_end, sb_end, W_starts, b_starts, _, _ = titans_fwd(
        q, k, v, eta.to(acc), mom, dec, W0, b0, C0, cb0, S0, sb0, ln_weight.to(acc),
        ln_bias.to(acc), b, float(eps), state.offset, state.mini_batch_size is None, *options,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    current = state_layout(NAMES, (W_end, b_end))  # (B, H, D, D), (B, H, 1, D)
    momentum_out = state_layout(NAMES, (S_end, sb_end))
    at_boundary = state.end_offset(L) == 0  # there P = W
    params = (
        current if at_boundary else state_layout(NAMES, (W_starts[:, :, -1], b_starts[:, :, -1]))
    )
    return o, state.advance(L, params=params, momentum=momentum_out, current=current)
