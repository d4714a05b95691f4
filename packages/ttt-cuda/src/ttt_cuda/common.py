"""What the public functions of the three ops (``linear``, ``mlp``, ``titans``) share, written once:
the dtype rule, the support check, the one validation call and the layout change
between a ``TTTState``'s tensors and the ops'. The streaming bookkeeping itself (block size, end
offset, token scales, end state) is ``TTTState``'s (ttt-core), called by the ops' functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ttt_core.validation import validate

__all__ = [
    "acc_dtype",
    "cpu_computes_fp32",
    "op_layout",
    "shape_str",
    "state_layout",
    "unsupported_reason",
    "validate_call",
]

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # low precision: upcast
LOW_PRECISION = (torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CUDA_HEAD_DIMS = (64, 128)
CUDA_MAX_MINI_BATCH = 64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the fast-weight state and accumulators: fp32, or fp64 for fp64 inputs (CPU)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cpu_computes_fp32(call: Callable) -> Callable:
    """The CPU path's rule for bf16/fp16 inputs, applied to every entry (the ops and the step):
    the C++ code computes in fp32 (fp64 for fp64 inputs), so a CPU call's low-precision tensors
    are upcast to fp32 here and o comes back in q's dtype; the state is fp32 either way, as
    ttt-core's. Autograd flows through the casts (gradients return in the inputs' dtypes). CUDA
    calls pass through: the kernels read bf16/fp16 themselves. ``call(q, ...) -> (o, state)``."""

    def upcast(t: Any) -> Any:
        return t.float() if isinstance(t, Tensor) and t.dtype in LOW_PRECISION else t

    @functools.wraps(call)
    def run(q: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
        if q.device.type != "cpu" or q.dtype not in LOW_PRECISION:
            return call(q, *args, **kwargs)
        o, state = call(upcast(q), *map(upcast, args), **{n: upcast(a) for n, a in kwargs.items()})
        return o.to(q.dtype), state

    return run


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
    checkpoint_group_size: int | None = None,
    **_: Any,
) -> str | None:
    """None when a fused op computes this call, else why not (metadata only, no value reads).

    ``head_dims``: the head dims the CUDA kernels of the op take (the CPU path takes any). Every
    op fuses both ``reconstruction_target``s and ``output_residual`` either way."""
    if checkpoint_group_size is not None:
        return "checkpoint_group_size is not fused (torch and generic recompute the groups)"
    offset = getattr(initial_state, "offset", 0) if initial_state is not None else 0
    L = q.shape[-2] if q.dim() == 4 else 0
    b = offset + L if mini_batch_size is None else mini_batch_size
    if q.device.type == "cpu":
        if q.dtype not in CPU_DTYPES:
            return f"the C++ CPU path takes float32/float64/bfloat16/float16 inputs, got {q.dtype}"
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
    ttt-core itself): shapes/dtypes/devices named per argument, mode conflicts (a non-causal call
    given an ``initial_state`` raises, as ``ttt_linear``: non-causal TTT cannot stream)."""
    validate(
        q=q, k=k, v=v, eta=eta, weights=weights, ln_weight=ln_weight, ln_bias=ln_bias,
        causal=causal, initial_state=initial_state, backend="cuda", **kw,
    )  # fmt: skip


def op_layout(d: dict[str, Tensor], acc: torch.dtype) -> list[Tensor]:
    """A state's tensors as the ops take them, contiguous in ``acc``: weights [B, H, m, n] as they
    are, biases ``b*`` [B, H, 1, n] as [B, H, n]."""
    return [(t.flatten(-2) if n.startswith("b") else t).to(acc).contiguous() for n, t in d.items()]


def state_layout(names, ts) -> dict[str, Tensor]:
    """The ops' end / start tensors as a state's dict: biases [B, H, n] -> [B, H, 1, n]."""
    return {n: t.unsqueeze(-2) if n.startswith("b") else t for n, t in zip(names, ts)}
