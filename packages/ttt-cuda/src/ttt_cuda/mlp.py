"""Public fused TTT-MLP: ttt-core's ``ttt_mlp`` signature on the ``ttt::mlp_fwd`` op.

Math (ttt-core's semantics, DESIGN.md): per (sample, head) the fast model
``f(x) = gelu_tanh(x W1 + b1) W2 + b2`` (W1 [D, F], W2 [F, D], F = 4D) is trained while reading;
tokens in mini-batches of b, gradients at the mini-batch's start weights,

    l_j(W) = 0.5 * || LN_h(f_W(k_j)) - (v_j - k_j) ||^2
    causal:      W_i = W_start - s_i * sum_{j<=i} eta_j grad l_j(W_start)
    non-causal:  W_i = W_start - sum_j eta_j grad l_j(W_start)
    o_i = q_i + LN_h(f_{W_i}(q_i));  the next mini-batch starts from the last W_i.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ttt_core.validation import validate
from ttt_cuda.linear import _token_scale, linear_unsupported_reason
from ttt_cuda.ops import acc_dtype
from ttt_cuda.ops_mlp import mlp_fwd

__all__ = ["fused_ttt_mlp", "mlp_unsupported_reason"]

CUDA_MLP_SHAPE = (64, 256)  # (D, F) of the CUDA kernels
LAYERS = (("W1", "b1"), ("W2", "b2"))


def mlp_unsupported_reason(
    q: Tensor, *, initial_state: Any = None, W1: Tensor | None = None, **kwargs: Any
) -> str | None:
    """None when the fused MLP op computes this call, else why not (metadata only). F is read
    from the state's W1, else from ``W1`` [H, D, F]."""
    if kwargs.get("momentum") is not None or kwargs.get("decay") is not None:
        return "TTT-MLP in the Titans form (momentum/decay) is not fused"
    reason = linear_unsupported_reason(
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
) -> tuple[Tensor, Any]:
    """Fused TTT-MLP (C++ on CPU, CUDA kernels on GPU) with ttt-core's ``ttt_mlp`` signature.

    Args:
        q, k, v: [B, H, L, D] queries, keys, values (target v - k).
        eta: [B, H, L] per-token inner learning rate.
        W1: [H, D, F], b1: [H, 1, F], W2: [H, F, D], b2: [H, 1, D] start fast weights
            (overridden by ``initial_state``).
        ln_weight, ln_bias: [H, D] per-head LayerNorm of the fast model's output.
        mini_batch_size: b (None: the whole sequence is one mini-batch).
        causal: query i sees W_i (True) or the mini-batch's end weights (False).
        token_scale: "mean", "sum" or a [b] tensor (differentiable).
        initial_state: a ``ttt_core.TTTState`` to start from, also one cut inside a mini-batch
            (offset > 0: the call first finishes it from the state's params and grad_sum).
        output_final_state: return the state after the last token (``TTTState``); cut inside
            the last mini-batch when it is incomplete (params = its start, grad_sum), as ttt-core.

    Returns:
        ``(o, state)``: o [B, H, L, D] in q's dtype; state a ``TTTState`` (fp32 params W1
        [B, H, D, F], b1 [B, H, 1, F], W2 [B, H, F, D], b2 [B, H, 1, D]) or None.

    Examples:
        >>> o, _ = fused_ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_w, ln_b, mini_batch_size=16)
    """
    weights = {"W1": W1, "b1": b1, "W2": W2, "b2": b2}
    validate(
        q=q, k=k, v=v, eta=eta, weights=weights, ln_weight=ln_weight, ln_bias=ln_bias,
        mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
        momentum=momentum, decay=decay, initial_state=initial_state if causal else None,
        output_final_state=output_final_state, eps=eps, backend="cuda",
    )  # fmt: skip
    reason = mlp_unsupported_reason(
        q, mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
        momentum=momentum, decay=decay, initial_state=initial_state,
        output_final_state=output_final_state, W1=W1,
    )  # fmt: skip
    if reason is not None:
        raise ValueError(f"fused_ttt_mlp does not support this call: {reason}")
    B, H, L, _ = q.shape
    offset = initial_state.offset if (causal and initial_state is not None) else 0
    b = offset + L if mini_batch_size is None else mini_batch_size  # None: one unbounded segment
    acc = acc_dtype(q.dtype)
    grad_sum = []  # what the cut mini-batch's earlier tokens read, as the start weights
    if offset > 0:
        for name in weights:
            g = initial_state.grad_sum[name].to(acc)
            grad_sum.append(
                (g.reshape(B, H, g.shape[-1]) if name.startswith("b") else g).contiguous()
            )
    start = []  # (B, H, D, F), (B, H, F), (B, H, F, D), (B, H, D)
    for name, t in weights.items():
        if initial_state is not None:
            s = initial_state.params[name].to(acc)
        else:
            s = t.to(acc).unsqueeze(0).expand(B, *t.shape)
        start.append(s.reshape(B, H, s.shape[-1]) if name.startswith("b") else s)
    scale = _token_scale(token_scale, b, causal, q)  # (b,)
    end = offset + L if mini_batch_size is None else (offset + L) % b
    cut = bool(output_final_state and end != 0)  # the state ends inside a mini-batch
    o, *rest = mlp_fwd(
        q, k, v, eta.to(acc), *(t.contiguous() for t in start), ln_weight.to(acc),
        ln_bias.to(acc), scale, b, bool(causal), float(eps), cut, mini_batch_size is None,
        offset, *grad_sum,
    )  # fmt: skip
    ends, starts = rest[:4], rest[4:]
    state = None
    if output_final_state:
        from ttt_core.state import TTTState

        def as_state(ts):  # biases [B, H, n] -> [B, H, 1, n]
            return {n: t.unsqueeze(-2) if n.startswith("b") else t for n, t in zip(weights, ts)}

        end_params = as_state(ends)
        if not cut:
            state = TTTState(params=end_params, offset=0, mini_batch_size=mini_batch_size)
        else:  # end = start - sum_j eta_j grad_j (unscaled), so grad_sum = start - end
            start_params = as_state([t[:, :, -1] for t in starts])
            state = TTTState(
                params=start_params,
                offset=end,
                mini_batch_size=mini_batch_size,
                grad_sum={n: start_params[n] - end_params[n] for n in weights},
            )
    return o, state
