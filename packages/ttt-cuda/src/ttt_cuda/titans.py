"""Fused TTT-Linear in the Titans form (momentum/decay), behind ``fused_ttt_linear``.

Rule (DESIGN.md, causal): S_j = m_j S_{j-1} - eta_j grad l_j(W_start),
W_j = (1 - a_j) W_{j-1} + S_j, o_j = q_j + LN_h(q_j W_j + b_j); S starts at zero and is carried
across mini-batches and in the state (``momentum``; ``current`` = W_j when the state is cut inside
a mini-batch). token_scale does not apply.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ttt_cuda.common import acc_dtype, per_sample
from ttt_cuda.ops.titans import titans_fwd

__all__ = ["titans_linear"]


def _pair(d: dict[str, Tensor], acc, B) -> tuple[Tensor, Tensor]:
    """{"W1": [(B,) H, D, D], "b1": [(B,) H, 1, D]} -> (W [B, H, D, D], b [B, H, D]) in acc."""
    return per_sample(d["W1"], "W1", B, acc), per_sample(d["b1"], "b1", B, acc)


def titans_linear(q, k, v, eta, W1, b1, ln_weight, ln_bias, *, mini_batch_size, momentum, decay,
                  initial_state: Any, output_final_state: bool, eps: float):  # fmt: skip
    """Validated inputs (see ``fused_ttt_linear``); returns ``(o, state or None)``."""
    from ttt_core.state import TTTState

    B, H, L, _ = q.shape
    acc = acc_dtype(q.dtype)
    zeros = torch.zeros(B, H, L, device=q.device, dtype=acc)
    mom = zeros if momentum is None else momentum.to(acc)  # (B, H, L)
    dec = zeros if decay is None else decay.to(acc)
    st = initial_state
    W0, b0 = _pair({"W1": W1, "b1": b1} if st is None else st.params, acc, B)  # (B, H, D, D)
    offset = 0 if st is None else st.offset
    C0, cb0 = (W0, b0) if st is None or st.current is None else _pair(st.current, acc, B)
    if st is None or st.momentum is None:
        S0, sb0 = torch.zeros_like(W0), torch.zeros_like(b0)
    else:
        S0, sb0 = _pair(st.momentum, acc, B)
    b = offset + L if mini_batch_size is None else mini_batch_size
    o, W_end, b_end, S_end, sb_end, W_starts, b_starts, _, _ = titans_fwd(
        q, k, v, eta.to(acc), mom, dec, W0, b0, C0, cb0, S0, sb0, ln_weight.to(acc),
        ln_bias.to(acc), b, float(eps), offset, mini_batch_size is None,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    end = offset + L if mini_batch_size is None else (offset + L) % b
    current = {"W1": W_end, "b1": b_end.unsqueeze(-2)}  # (B, H, D, D), (B, H, 1, D)
    momentum_out = {"W1": S_end, "b1": sb_end.unsqueeze(-2)}
    if end == 0:  # at a boundary P = W
        return o, TTTState(params=current, offset=0, mini_batch_size=mini_batch_size,
                           momentum=momentum_out)  # fmt: skip
    params = {"W1": W_starts[:, :, -1], "b1": b_starts[:, :, -1].unsqueeze(-2)}
    return o, TTTState(params=params, offset=end, mini_batch_size=mini_batch_size,
                       momentum=momentum_out, current=current)  # fmt: skip
