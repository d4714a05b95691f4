"""Fused TTT-Linear and TTT-MLP in the Titans form (momentum/decay), behind ``fused_ttt_linear``
and ``fused_ttt_mlp``.

Rule (DESIGN.md, causal), per fast layer: S_j = m_j S_{j-1} - eta_j grad l_j(W_start),
W_j = (1 - a_j) W_{j-1} + S_j, o_j = q_j + LN_h(f_{W_j}(q_j)) (without q_j when
``output_residual`` is False; the target of l_j is v_j - k_j or v_j); S starts at zero and is carried
across mini-batches and in the state (``momentum``; ``current`` = W_j when the state is cut inside
a mini-batch). token_scale does not apply. The linear model runs ``ttt::titans_fwd`` (CPU and
CUDA), the MLP ``ttt::titans_mlp_fwd`` (CPU only).
"""

from __future__ import annotations

from typing import Any

import torch

from ttt_cuda.common import acc_dtype, op_layout, state_layout
from ttt_cuda.ops.titans import titans_fwd
from ttt_cuda.ops.titans_mlp import titans_mlp_fwd

__all__ = ["titans_call"]


def titans_call(q, k, v, eta, ln_weight, ln_bias, *, momentum, decay, state: Any,
                output_final_state: bool, eps: float, options=("residual", True)):  # fmt: skip
    """Validated inputs from ``state`` (a ``TTTState`` whose params are the linear model's
    (W1, b1) or the MLP's (W1, b1, W2, b2); see ``fused_ttt_linear``); ``options``:
    ``(reconstruction_target, output_residual)``. Returns ``(o, state or None)``."""
    B, H, L, _ = q.shape
    acc = acc_dtype(q.dtype)
    names = tuple(state.params)
    nw = len(names)  # weights per group: 2 (linear) or 4 (MLP)
    zeros = torch.zeros(B, H, L, device=q.device, dtype=acc)
    mom = zeros if momentum is None else momentum.to(acc)  # (B, H, L)
    dec = zeros if decay is None else decay.to(acc)
    P = op_layout(state.params, acc)  # per weight: W (B, H, Din, Dout), b (B, H, Dout)
    C = P if state.current is None else op_layout(state.current, acc)
    if state.momentum is None:  # S starts at zero
        S = [torch.zeros_like(t) for t in P]
    else:
        S = op_layout(state.momentum, acc)
    fwd = titans_fwd if nw == 2 else titans_mlp_fwd
    o, *rest = fwd(
        q, k, v, eta.to(acc), mom, dec, *P, *C, *S, ln_weight.to(acc), ln_bias.to(acc),
        state.block_size(L), float(eps), state.offset, state.ends_inside(L), *options,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    W_end, S_end, P_starts = rest[:nw], rest[nw : 2 * nw], rest[2 * nw : 3 * nw]
    current = state_layout(names, W_end)  # weights (B, H, Din, Dout), biases (B, H, 1, Dout)
    momentum_out = state_layout(names, S_end)
    at_boundary = state.end_offset(L) == 0  # there P = W
    params = current if at_boundary else state_layout(names, [t[:, :, -1] for t in P_starts])
    return o, state.advance(L, params=params, momentum=momentum_out, current=current)
