"""Public fused TTT-Linear: ttt-core's ``ttt_linear`` signature on the ``ttt::linear_fwd`` op.

Math (ttt-core's semantics, DESIGN.md): per (sample, head) a fast weight W [D, D], b [D] is trained
while reading; tokens in mini-batches of b, gradients at the mini-batch's start weights,

    l_j(W) = 0.5 * || LN_h(k_j W + b) - t_j ||^2,  t_j = v_j - k_j (or v_j: "value" target)
    causal:      W_i = W_start - s_i * sum_{j<=i} eta_j grad l_j(W_start)
    non-causal:  W_i = W_start - sum_j eta_j grad l_j(W_start)
    o_i = q_i + LN_h(q_i W_i + b_i) (or LN_h(...) alone: output_residual=False);  the next
    mini-batch starts from the last W_i.

With ``momentum``/``decay`` (the Titans form) the call goes to ``ttt_cuda.titans``.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ttt_core.state import TTTState
from ttt_cuda.common import (
    CUDA_HEAD_DIMS,
    acc_dtype,
    cpu_computes_fp32,
    op_layout,
    state_layout,
    unsupported_reason,
    validate_call,
)
from ttt_cuda.ops.linear import linear_fwd
from ttt_cuda.titans import titans_call

__all__ = ["fused_ttt_linear", "linear_call", "linear_unsupported_reason"]


def linear_unsupported_reason(q: Tensor, **kwargs: Any) -> str | None:
    """None when the fused TTT-Linear op computes this call, else why not (metadata only)."""
    return unsupported_reason(q, head_dims=CUDA_HEAD_DIMS, **kwargs)


def fused_ttt_linear(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    mini_batch_size: int | None = 16,
    causal: bool = True,
    token_scale: str | Tensor = "mean",
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, Any]:
    """Fused TTT-Linear (C++ on CPU, CUDA kernels on GPU) with ttt-core's ``ttt_linear`` signature.

    Args:
        q, k, v: [B, H, L, D] queries, keys, values.
        eta: [B, H, L] per-token inner learning rate.
        W1: [H, D, D], b1: [H, 1, D] start fast weights (overridden by ``initial_state``).
        ln_weight, ln_bias: [H, D] per-head LayerNorm of the fast model's output.
        mini_batch_size: b (None: the whole sequence is one mini-batch).
        causal: query i sees W_i (True) or the mini-batch's end weights (False).
        token_scale: "mean" (s_i = 1/(i+1)), "sum" (s_i = 1) or a [b] tensor (differentiable).
        momentum, decay: [B, H, L] Titans momentum m_j and decay a_j (causal; either may be None
            = zeros): S_j = m_j S_{j-1} - eta_j grad l_j(W_start), W_j = (1 - a_j) W_{j-1} + S_j.
        initial_state: a ``ttt_core.TTTState`` to start from, also one cut inside a mini-batch
            (offset > 0: the call first finishes that mini-batch from the state's params and
            grad_sum, which both get gradients).
        output_final_state: return the state after the last token as a ``TTTState``; when it ends
            inside a mini-batch (offset = (offset_in + L) % b, or offset_in + L for b = None),
            params = that mini-batch's start weights and grad_sum = its tokens' summed
            eta_j grad_j, as ttt-core.
        eps: the LayerNorm epsilon.
        reconstruction_target: the token loss's target, "residual" ``v - k`` or "value" ``v``.
        output_residual: ``o = q + LN_h(f(q))`` (True) or ``o = LN_h(f(q))`` (False).

    Returns:
        ``(o, state)``: o [B, H, L, D] in q's dtype; state a ``TTTState`` (fp32 params
        ``W1`` [B, H, D, D], ``b1`` [B, H, 1, D]) or None.

    Examples:
        >>> o, _ = fused_ttt_linear(q, k, v, eta, W1, b1, ln_w, ln_b, mini_batch_size=16)
    """
    kw = dict(mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
              momentum=momentum, decay=decay, initial_state=initial_state,
              output_final_state=output_final_state, eps=eps,
              reconstruction_target=reconstruction_target, output_residual=output_residual)  # fmt: skip
    validate_call(q, k, v, eta, {"W1": W1, "b1": b1}, ln_weight, ln_bias, **kw)
    reason = linear_unsupported_reason(q, **kw)
    if reason is not None:
        raise ValueError(f"fused_ttt_linear does not support this call: {reason}")
    state = TTTState.start(initial_state, {"W1": W1, "b1": b1}, q.shape[0], mini_batch_size,
                        acc_dtype(q.dtype))  # fmt: skip
    return linear_call(q, k, v, eta, W1, b1, ln_weight, ln_bias, **{**kw, "initial_state": state})


@cpu_computes_fp32
def linear_call(q, k, v, eta, W1, b1, ln_weight, ln_bias, *, mini_batch_size, causal, token_scale,
                momentum, decay, initial_state, output_final_state, eps,
                reconstruction_target="residual", output_residual=True, **_):  # fmt: skip
    """``fused_ttt_linear`` on validated inputs the op supports, from ``initial_state`` (a
    ``TTTState``: the backend's entry, after ttt-core validated the call and asked ``supports``)."""
    options = (reconstruction_target, output_residual)
    if momentum is not None or decay is not None:  # the Titans form
        return titans_call(q, k, v, eta, ln_weight, ln_bias, momentum=momentum, decay=decay,
                           state=initial_state, output_final_state=output_final_state,
                           eps=eps, options=options)  # fmt: skip
    state, L, acc = initial_state, q.shape[2], acc_dtype(q.dtype)
    b = state.block_size(L)  # mini_batch_size, or offset + L (b None or past L: one segment)
    W0, b0 = op_layout(state.params, acc)  # (B, H, D, D), (B, H, D)
    G0, gb0 = op_layout(state.grad_sum, acc) if state.offset > 0 else (None, None)
    scale = TTTState.token_scales(token_scale, 0, b, device=q.device, dtype=acc, causal=causal)
    end = state.end_offset(L)
    cut = bool(output_final_state and end != 0)  # the state ends inside a mini-batch
    o, W_end, b_end, W_starts, b_starts = linear_fwd(
        q, k, v, eta.to(acc), W0, b0, ln_weight.to(acc), ln_bias.to(acc), scale.contiguous(), b,
        bool(causal), float(eps), cut, state.offset, state.ends_inside(L), G0, gb0, *options,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    names = ("W1", "b1")
    ends = state_layout(names, (W_end, b_end))
    if end == 0:
        return o, state.advance(L, params=ends)
    # the cut mini-batch: its start weights, and grad_sum = start - end (the op ends it unscaled)
    starts = state_layout(names, (W_starts[:, :, -1], b_starts[:, :, -1]))
    return o, state.advance(L, params=starts, grad_sum={n: starts[n] - ends[n] for n in names})
