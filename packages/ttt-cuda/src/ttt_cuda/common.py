"""What the public functions of the three ops (``linear``, ``mlp``, ``titans``) share, written once:
the dtype rule, the support check, the one validation call, the token-scale vector, the start
weights and grad_sum read from a state, and the state returned at the end.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ttt_core.validation import validate

__all__ = [
    "acc_dtype",
    "end_state",
    "per_sample",
    "shape_str",
    "token_scale_vector",
    "unsupported_reason",
    "validate_call",
]

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (64, 128)
CUDA_MAX_MINI_BATCH = 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the fast-weight state and accumulators: fp32, or fp64 for fp64 inputs (CPU)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def shape_str(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


def unsupported_reason(
    q: Tensor,
    *,
    head_dims: tuple[int, ...],
    mini_batch_size: int | None = 16,
    token_scale: str | Tensor = "mean",
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    initial_state: Any = None,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
    **_: Any,
) -> str | None:
    """None when a fused op computes this call, else why not (metadata only, no value reads).

    ``head_dims``: the head dims the CUDA kernels of the op take (the CPU path takes any)."""
    if reconstruction_target != "residual":
        return f"reconstruction_target={reconstruction_target!r} is not fused (only 'residual')"
    if not output_residual:
        return "output_residual=False is not fused (the ops add q to the output)"
    offset = getattr(initial_state, "offset", 0) if initial_state is not None else 0
    L = q.shape[-2] if q.dim() == 4 else 0
    b = offset + L if mini_batch_size is None else mini_batch_size
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
        return f"token_scale must be a per-position vector [b], got shape {shape_str(token_scale)}"
    titans = momentum is not None or decay is not None
    if not titans and getattr(initial_state, "momentum", None) is not None:
        return "initial_state in Titans form for a call without momentum/decay"
    return None


def validate_call(q, k, v, eta, weights, ln_weight, ln_bias, *, causal, initial_state, **kw):
    """ttt-core's checks for a direct call of a public function (the backend path is validated by
    ttt-core itself): shapes/dtypes/devices named per argument, mode conflicts. ttt-core hands a
    backend every call's start state, non-causal ones included (the start weights per sample), so
    only a causal call's state is checked as a streaming state."""
    validate(
        q=q, k=k, v=v, eta=eta, weights=weights, ln_weight=ln_weight, ln_bias=ln_bias,
        causal=causal, initial_state=initial_state if causal else None, backend="cuda", **kw,
    )  # fmt: skip


def token_scale_vector(token_scale: str | Tensor, b: int, causal: bool, ref: Tensor) -> Tensor:
    """s_i by in-mini-batch position i: [b] in the acc dtype (ones when non-causal or "sum")."""
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
            f"got {shape_str(token_scale)}"
        )
    return token_scale.to(acc)


def per_sample(t: Tensor, name: str, B: int, acc: torch.dtype) -> Tensor:
    """A weight as the ops take it, contiguous in ``acc``: [H, ...] (shared) or [B, H, ...] (a
    state's) -> [B, H, ...], biases ``b*`` [.., 1, n] flattened to [B, H, n]."""
    t = t.to(acc)
    if t.dim() == 3:
        t = t.unsqueeze(0).expand(B, *t.shape)  # shared [H, ...] -> (B, H, ...)
    if name.startswith("b"):
        t = t.reshape(B, t.shape[1], t.shape[-1])  # (B, H, n)
    return t.contiguous()


def end_state(names, ends, last_starts, end: int, mini_batch_size: int | None):
    """The ``TTTState`` after a call of the plain (non-Titans) ops: ``ends``/``last_starts`` are
    the end weights and the last segment's start weights as the ops return them (biases [B, H, n]);
    ``end`` the in-mini-batch position after the last token. A state cut inside a mini-batch
    (end > 0) keeps that mini-batch's start weights and grad_sum = start - end (the ops end an
    incomplete mini-batch with the unscaled sum of its steps)."""
    from ttt_core.state import TTTState

    def as_params(ts):  # biases [B, H, n] -> [B, H, 1, n]
        return {n: t.unsqueeze(-2) if n.startswith("b") else t for n, t in zip(names, ts)}

    if end == 0:
        return TTTState(params=as_params(ends), offset=0, mini_batch_size=mini_batch_size)
    start, stop = as_params(last_starts), as_params(ends)
    grad_sum = {n: start[n] - stop[n] for n in names}
    return TTTState(params=start, offset=end, mini_batch_size=mini_batch_size, grad_sum=grad_sum)
