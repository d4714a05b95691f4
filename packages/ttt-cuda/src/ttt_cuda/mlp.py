"""Public fused TTT-MLP: ttt-core's ``ttt_mlp`` signature on the ``ttt::mlp_fwd`` op.

Math (ttt-core's semantics, DESIGN.md): per (sample, head) the fast model
``f(x) = gelu_tanh(x W1 + b1) W2 + b2`` (W1 [D, F], W2 [F, D], F = 4D) is trained while reading;
tokens in mini-batches of b, gradients at the mini-batch's start weights,

    l_j(W) = 0.5 * || LN_h(f_W(k_j)) - t_j ||^2,  t_j = v_j - k_j (or v_j: "value" target)
    causal:      W_i = W_start - s_i * sum_{j<=i} eta_j grad l_j(W_start)
    non-causal:  W_i = W_start - sum_j eta_j grad l_j(W_start)
    o_i = q_i + LN_h(f_{W_i}(q_i)) (or LN_h(...) alone: output_residual=False);  the next
    mini-batch starts from the last W_i.

With ``momentum``/``decay`` (the Titans form, CPU tensors) the call goes to ``ttt_cuda.titans``
(the ``ttt::titans_mlp_fwd`` op).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ttt_core.state import TTTState
from ttt_cuda.common import (
    acc_dtype,
    cpu_computes_fp32,
    op_layout,
    state_layout,
    unsupported_reason,
    validate_call,
)
from ttt_cuda.ops.mlp import mlp_fwd
from ttt_cuda.titans import titans_call

__all__ = ["fused_ttt_mlp", "mlp_call", "mlp_unsupported_reason"]

CUDA_MLP_SHAPE = (64, 256)  # (D, F) of the CUDA kernels
LAYERS = (("W1", "b1"), ("W2", "b2"))


def mlp_unsupported_reason(
    q: Tensor, *, initial_state: Any = None, W1: Tensor | None = None, **kwargs: Any
) -> str | None:
    """None when the fused MLP op computes this call, else why not (metadata only). F is read
    from the state's W1, else from ``W1`` [H, D, F]."""
    titans = kwargs.get("momentum") is not None or kwargs.get("decay") is not None
    if titans and q.device.type == "cuda":
        return "TTT-MLP in the Titans form (momentum/decay) has no CUDA kernel (the C++ CPU path fuses it)"
    reason = unsupported_reason(
        q, initial_state=initial_state, head_dims=CUDA_MLP_SHAPE[:1], **kwargs
    )
    if reason is not None:
        return reason
    if q.device.type == "cuda" and q.dim() == 4:
        F = None if W1 is None else W1.shape[-1]
        if initial_state is not None and "W1" in getattr(initial_state, "params", {}):
            F = initial_state.params["W1"].shape[-1]
        if (q.shape[-1], F) != CUDA_MLP_SHAPE:
            got = f"got D = {q.shape[-1]}, F = {F}"
            return f"the CUDA TTT-MLP kernels take D = 64 and F = 256, {got}"
    return None


def fused_ttt_mlp(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    W2: Tensor,
    b2: Tensor,
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
    """Fused TTT-MLP (C++ on CPU, CUDA kernels on GPU) with ttt-core's ``ttt_mlp`` signature.

    Args:
        q, k, v: [B, H, L, D] queries, keys, values.
        eta: [B, H, L] per-token inner learning rate.
        W1: [H, D, F], b1: [H, 1, F], W2: [H, F, D], b2: [H, 1, D] start fast weights
            (overridden by ``initial_state``).
        ln_weight, ln_bias: [H, D] per-head LayerNorm of the fast model's output.
        mini_batch_size: b (None: the whole sequence is one mini-batch).
        causal: query i sees W_i (True) or the mini-batch's end weights (False).
        token_scale: "mean", "sum" or a [b] tensor (differentiable).
        momentum, decay: [B, H, L] Titans momentum m_j and decay a_j (causal, CPU tensors;
            either may be None = zeros); token_scale does not apply then.
        initial_state: a ``ttt_core.TTTState`` to start from, also one cut inside a mini-batch
            (offset > 0: the call first finishes it from the state's params and grad_sum).
        output_final_state: return the state after the last token (``TTTState``); cut inside
            the last mini-batch when it is incomplete (params = its start, grad_sum), as ttt-core.
        eps: the LayerNorm epsilon.
        reconstruction_target: the token loss's target, "residual" ``v - k`` or "value" ``v``.
        output_residual: ``o = q + LN_h(f(q))`` (True) or ``o = LN_h(f(q))`` (False).

    Returns:
        ``(o, state)``: o [B, H, L, D] in q's dtype; state a ``TTTState`` (fp32 params W1
        [B, H, D, F], b1 [B, H, 1, F], W2 [B, H, F, D], b2 [B, H, 1, D]) or None.

    Examples:
        >>> o, _ = fused_ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_w, ln_b, mini_batch_size=16)
    """
    weights = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    kw = dict(mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
              momentum=momentum, decay=decay, initial_state=initial_state,
              output_final_state=output_final_state, eps=eps,
              reconstruction_target=reconstruction_target, output_residual=output_residual)  # fmt: skip
    validate_call(q, k, v, eta, weights, ln_weight, ln_bias, **kw)
    reason = mlp_unsupported_reason(q, W1=W1, **kw)  # F from the state's W1, else from W1
    if reason is not None:
        raise ValueError(f"fused_ttt_mlp does not support this call: {reason}")
    state = TTTState.start(initial_state, weights, q.shape[0], mini_batch_size, acc_dtype(q.dtype))
    return mlp_call(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias,
                    **{**kw, "initial_state": state})  # fmt: skip


@cpu_computes_fp32
def mlp_call(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, *, mini_batch_size, causal,
             token_scale, initial_state, output_final_state, eps, momentum=None, decay=None,
             reconstruction_target="residual", output_residual=True, **_):  # fmt: skip
    """``fused_ttt_mlp`` on validated inputs the op supports, from ``initial_state`` (a
    ``TTTState``: the backend's entry, after ttt-core validated the call and asked ``supports``)."""
    if momentum is not None or decay is not None:  # the Titans form (CPU)
        return titans_call(q, k, v, eta, ln_weight, ln_bias, momentum=momentum, decay=decay,
                           state=initial_state, output_final_state=output_final_state, eps=eps,
                           options=(reconstruction_target, output_residual))  # fmt: skip
    state, L, acc = initial_state, q.shape[2], acc_dtype(q.dtype)
    b = state.block_size(L)  # mini_batch_size, or offset + L (b None or past L: one segment)
    start = op_layout(state.params, acc)  # (B, H, D, F), (B, H, F), (B, H, F, D), (B, H, D)
    grad_sum = op_layout(state.grad_sum, acc) if state.offset > 0 else []
    scale = TTTState.token_scales(token_scale, 0, b, device=q.device, dtype=acc, causal=causal)
    end = state.end_offset(L)
    cut = bool(output_final_state and end != 0)  # the state ends inside a mini-batch
    o, *rest = mlp_fwd(
        q, k, v, eta.to(acc), *start, ln_weight.to(acc), ln_bias.to(acc), scale.contiguous(), b,
        bool(causal), float(eps), cut, state.offset, state.ends_inside(L),
        *(grad_sum or [None] * 4), reconstruction_target, output_residual,
    )  # fmt: skip
    if not output_final_state:
        return o, None
    names = tuple(state.params)
    ends = state_layout(names, rest[:4])
    if end == 0:
        return o, state.advance(L, params=ends)
    # the cut mini-batch: its start weights, and grad_sum = start - end (the op ends it unscaled)
    starts = state_layout(names, [t[:, :, -1] for t in rest[4:]])
    return o, state.advance(L, params=starts, grad_sum={n: starts[n] - ends[n] for n in names})
