"""ttt-cuda's two backends of ttt-core, registered through the ``ttt_core.backends`` entry point:

- ``"cpp"``: the fused C++ path on CPU tensors (parallel over (batch, head) chains on
  ``torch.get_num_threads()`` threads). ``auto`` picks it for every CPU call it supports (fp32/fp64,
  and bf16/fp16 computed in fp32; TTT-Linear and TTT-MLP, plain and Titans form); the calls it
  refuses (``checkpoint_group_size``, a step that needs autograd, a step being traced by ``torch.compile``)
  run on ttt-core's torch backend without a warning (``warn_on_fallback = False``: on the CPU the
  torch backend serves every call; ask for ``backend="cpp"`` by name to see the reason). Its
  backward is first order (a double backward raises: use ``backend="torch"``). Its single-token
  step is one fused C++ call per token and layer (``step.py``); under ``torch.no_grad()`` a
  ``TTTLayer``'s whole streaming token (projections, step, post-norm, gate) is one C++ call
  (``layer_step.py``).
- ``"cuda"``: the CUDA kernels on CUDA tensors (``auto`` picks it there); on CPU tensors it is an
  alias of ``"cpp"``.

ttt-core validates a call and asks ``supports`` before it calls ``ttt_linear`` / ``ttt_mlp`` or
the single-token ``ttt_linear_step`` / ``ttt_mlp_step``, so these go straight to the ops
(``linear_call`` / ``mlp_call``) without validating again. Calls a
backend cannot fuse (on CUDA TTT-MLP in the Titans form, an unsupported dtype or head dim) are refused in
``supports`` with the reason: ttt-core then uses its torch backend under ``auto`` (the ``cuda``
backend warns once with the reason), or raises when the backend was asked for by name.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor

from ttt_cuda._ext import extension_error
from ttt_cuda.layer_step import layer_step, layer_step_unsupported_reason
from ttt_cuda.linear import linear_call, linear_unsupported_reason
from ttt_cuda.mlp import mlp_call, mlp_unsupported_reason
from ttt_cuda.step import linear_step, mlp_step, step_unsupported_reason

__all__ = ["CppBackend", "CudaBackend", "cpp_backend", "cuda_backend"]

_REASONS = {
    "ttt_linear": linear_unsupported_reason,
    "ttt_mlp": mlp_unsupported_reason,
    # the fused C++ step on CPU tensors, the op on one token on CUDA tensors
    "ttt_linear_step": partial(step_unsupported_reason, "ttt_linear_step"),
    "ttt_mlp_step": partial(step_unsupported_reason, "ttt_mlp_step"),
    # a whole TTTLayer's streaming token in one C++ call (CPU tensors, inference)
    "ttt_layer_step": layer_step_unsupported_reason,
}


def _unsupported_reason(op: str, q: Tensor, **kwargs: Any) -> str | None:
    err = extension_error()
    if err is not None:
        return err
    if op not in _REASONS:
        return f"unknown op {op!r}"
    return _REASONS[op](q, **kwargs)


class CudaBackend:
    """Fused TTT-Linear and TTT-MLP, plain and Titans form: the CUDA kernels on CUDA tensors (no
    Titans TTT-MLP kernel), the C++ path on CPU tensors."""

    name = "cuda"
    device_types: tuple[str, ...] = ("cuda",)

    def supports(self, op: str, q: Tensor, **kwargs: Any) -> str | None:
        """None when this backend runs ``op`` for these arguments, else the reason."""
        return _unsupported_reason(op, q, **kwargs)

    def ttt_linear(self, q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs: Any):
        """ttt-core's ``ttt_linear`` (validated, supported; ``initial_state`` a TTTState)."""
        return linear_call(q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs)

    def ttt_mlp(self, q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, **kwargs: Any):
        """ttt-core's ``ttt_mlp`` (validated, supported; ``initial_state`` a TTTState)."""
        return mlp_call(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, **kwargs)

    def ttt_linear_step(self, q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs: Any):
        """ttt-core's single-token step (q [B, H, 1, D], ``state`` a TTTState) -> (o, state)."""
        return linear_step(q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs)

    def ttt_mlp_step(self, q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, **kwargs: Any):
        """ttt-core's single-token TTT-MLP step -> (o [B, H, 1, D], state)."""
        return mlp_step(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, **kwargs)

    def ttt_layer_step(self, layer, x, **kwargs: Any):
        """A whole TTTLayer's streaming token x [B, 1, C] (``state`` a TTTState) -> (y, state)."""
        return layer_step(layer, x, **kwargs)


class CppBackend(CudaBackend):
    """The fused C++ CPU path: CPU tensors only, ``auto``'s choice on the CPU where it supports
    the call (the torch backend runs the rest, silently)."""

    name = "cpp"
    device_types: tuple[str, ...] = ("cpu",)
    warn_on_fallback = False

    def supports(self, op: str, q: Tensor, **kwargs: Any) -> str | None:
        if q.device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors, got {q.device.type} (use 'cuda')"
        return _unsupported_reason(op, q, **kwargs)


cuda_backend = CudaBackend()
cpp_backend = CppBackend()
