"""Public fused TTT-Linear: ttt-core's ``ttt_linear`` signature on the ``ttt::linear_fwd`` op.

Math (ttt-core's semantics, DESIGN.md): per (sample, head) a fast weight W [D, D], b [D] is trained
while reading; tokens in mini-batches of b, gradients at the mini-batch's start weights,

    l_j(W) = 0.5 * || LN_h(k_j W + b) - (v_j - k_j) ||^2
    causal:      W_i = W_start - s_i * sum_{j<=i} eta_j grad l_j(W_start)
    non-causal:  W_i = W_start - sum_j eta_j grad l_j(W_start)
    o_i = q_i + LN_h(q_i W_i + b_i);  the next mini-batch starts from the last W_i.

With ``momentum``/``decay`` (the Titans form) the call goes to ``ttt_cuda.titans``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ttt_core.validation import validate
from ttt_cuda.ops import acc_dtype, linear_fwd
from ttt_cuda.titans import titans_linear

__all__ = ["fused_ttt_linear", "linear_unsupported_reason"]

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (64, 128)
CUDA_MAX_MINI_BATCH = 64


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def linear_unsupported_reason(
    q: Tensor,
    *,
    mini_batch_size: int | None = 16,
    causal: bool = True,
    token_scale: str | Tensor = "mean",
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    initial_state: Any = None,
    output_final_state: bool = False,
    head_dims: tuple[int, ...] = CUDA_HEAD_DIMS,
    **_: Any,
) -> str | None:
    """None when the fused op computes this call, else why not (metadata only, no value reads)."""
    offset = getattr(initial_state, "offset", 0) if initial_state is not None else 0
    L = q.shape[-2] if q.dim() == 4 else 0
    b = offset + L if mini_batch_size is None else mini_batch_size
    titans = momentum is not None or decay is not None
    if q.device.type == "cpu":
        if q.dtype not in CPU_DTYPES:
            return f"the C++ CPU path takes float32/float64 inputs, got {q.dtype}"
    elif q.device.type == "cuda":
        if q.dtype not in CUDA_DTYPES:
            return f"the CUDA kernels take float32/bfloat16/float16 inputs, got {q.dtype}"
        if q.dim() == 4 and q.shape[-1] not in head_dims:
            dims = " or ".join(str(d) for d in head_dims)
            return f"the CUDA kernels take head dim {dims}, got {q.shape[-1]}"
        if b > CUDA_MAX_MINI_BATCH:
            return f"the CUDA kernels take mini_batch_size <= {CUDA_MAX_MINI_BATCH}, got {b}"
        from ttt_cuda._ext import extension

        if not extension().WITH_CUDA:
            return "ttt-cuda was built without CUDA (TTT_ENABLE_CUDA=OFF or no nvcc)"
    else:
        return f"device {q.device.type} is not supported"
    if isinstance(token_scale, Tensor) and token_scale.dim() != 1:
        return f"token_scale must be a per-position vector [b], got shape {_shape(token_scale)}"
    if not titans and getattr(initial_state, "momentum", None) is not None:
        return "initial_state in Titans form for a call without momentum/decay"
    return None


def _token_scale(token_scale: str | Tensor, b: int, causal: bool, ref: Tensor) -> Tensor:
    acc = acc_dtype(ref.dtype)
    if not causal or (isinstance(token_scale, str) and token_scale == "sum"):
        return torch.ones(b, device=ref.device, dtype=acc)
    if isinstance(token_scale, str):
        if token_scale != "mean":
            raise ValueError(
                f"token_scale must be 'mean', 'sum' or a [b] tensor, got {token_scale!r}"
            )
        return 1.0 / torch.arange(1, b + 1, device=ref.device, dtype=acc)
    if token_scale.shape != (b,):
        raise ValueError(
            f"token_scale tensor must have shape [mini_batch_size]=({b},), "
            f"got {_shape(token_scale)}"
        )
    return token_scale.to(acc)


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
) -> tuple[Tensor, Any]:
    """Fused TTT-Linear (C++ on CPU, CUDA kernels on GPU) with ttt-core's ``ttt_linear`` signature.

    Args:
        q, k, v: [B, H, L, D] queries, keys, values (target v - k).
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

    Returns:
        ``(o, state)``: o [B, H, L, D] in q's dtype; state a ``TTTState`` (fp32 params
        ``W1`` [B, H, D, D], ``b1`` [B, H, 1, D]) or None.

    Examples:
        >>> o, _ = fused_ttt_linear(q, k, v, eta, W1, b1, ln_w, ln_b, mini_batch_size=16)
    """
    # ttt-core's checks: shapes/dtypes/devices named per argument, mode conflicts. As a backend,
    # ttt-core hands every call its start state, non-causal ones included (the start weights per
    # sample), so only a causal call's state is checked as a streaming state.
    validate(
        q=q, k=k, v=v, eta=eta, weights={"W1": W1, "b1": b1}, ln_weight=ln_weight,
        ln_bias=ln_bias, mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
        momentum=momentum, decay=decay, initial_state=initial_state if causal else None,
        output_final_state=output_final_state, eps=eps, backend="cuda",
    )  # fmt: skip
    reason = linear_unsupported_reason(
        q,
        mini_batch_size=mini_batch_size,
        causal=causal,
        token_scale=token_scale,
        momentum=momentum,
        decay=decay,
        initial_state=initial_state,
        output_final_state=output_final_state,
    )
    if reason is not None:
        raise ValueError(f"fused_ttt_linear does not support this call: {reason}")
    if momentum is not None or decay is not None:  # the Titans form
        return titans_linear(q, k, v, eta, W1, b1, ln_weight, ln_bias,
                             mini_batch_size=mini_batch_size, momentum=momentum, decay=decay,
                             initial_state=initial_state, output_final_state=output_final_state,
                             eps=eps)  # fmt: skip
    B, H, L, D = q.shape
    offset = initial_state.offset if (causal and initial_state is not None) else 0
    b = offset + L if mini_batch_size is None else mini_batch_size  # None: one unbounded segment
    acc = acc_dtype(q.dtype)
    G0 = gb0 = None
    if offset > 0:  # what the cut mini-batch's earlier tokens read
        G0 = initial_state.grad_sum["W1"].to(acc)  # (B, H, D, D)
        gb0 = initial_state.grad_sum["b1"].to(acc).reshape(B, H, D)  # (B, H, D)
    if initial_state is not None:
        W0 = initial_state.params["W1"].to(acc)  # (B, H, D, D)
        b0 = initial_state.params["b1"].to(acc).reshape(B, H, D)
        if W0.shape != (B, H, D, D):
            raise ValueError(f"initial_state.params['W1'] must be [B, H, D, D], got {_shape(W0)}")
    else:
        W0 = W1.to(acc).unsqueeze(0).expand(B, H, D, D)  # (B, H, D, D)
        b0 = b1.to(acc).reshape(1, H, D).expand(B, H, D)  # (B, H, D)
    scale = _token_scale(token_scale, b, causal, q)  # (b,)
    end = offset + L if mini_batch_size is None else (offset + L) % b
    cut = bool(output_final_state and end != 0)  # the state ends inside a mini-batch
    o, W_end, b_end, W_starts, b_starts = linear_fwd(
        q,
        k,
        v,
        eta.to(acc),
        W0.contiguous(),
        b0.contiguous(),
        ln_weight.to(acc),
        ln_bias.to(acc),
        scale,
        b,
        bool(causal),
        float(eps),
        cut,
        offset,
        mini_batch_size is None,
        G0 if G0 is None else G0.contiguous(),
        gb0 if gb0 is None else gb0.contiguous(),
    )
    state = None
    if output_final_state:
        from ttt_core.state import TTTState

        if not cut:
            params = {"W1": W_end, "b1": b_end.unsqueeze(-2)}  # (B, H, D, D), (B, H, 1, D)
            state = TTTState(params=params, offset=0, mini_batch_size=mini_batch_size)
        else:  # end = start - sum_j eta_j grad_j (unscaled), so grad_sum = start - end
            W_s, b_s = W_starts[:, :, -1], b_starts[:, :, -1].unsqueeze(-2)
            state = TTTState(
                params={"W1": W_s, "b1": b_s},
                offset=end,
                mini_batch_size=mini_batch_size,
                grad_sum={"W1": W_s - W_end, "b1": b_s - b_end.unsqueeze(-2)},
            )
    return o, state
