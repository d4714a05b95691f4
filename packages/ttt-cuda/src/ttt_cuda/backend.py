"""The ``cuda`` backend of ttt-core, registered through the ``ttt_core.backends`` entry point.

``backend="auto"`` picks it for CUDA tensors (``device_types = ("cuda",)``); ``backend="cuda"``
also runs the C++ CPU path on CPU tensors (single-threaded; ttt-core's torch backend is usually
faster on CPU, so auto leaves CPU alone). Calls it cannot fuse (TTT-MLP in the Titans form,
unsupported dtype/head dim) are refused in ``supports`` with the reason: ttt-core then
warns once and uses its torch backend under ``auto``, or raises under ``backend="cuda"``. As a
safety net, ``ttt_linear`` called directly with such a call warns once and runs the torch backend.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from ttt_cuda._ext import extension_error
from ttt_cuda.linear import fused_ttt_linear, linear_unsupported_reason
from ttt_cuda.mlp import fused_ttt_mlp, mlp_unsupported_reason

__all__ = ["CudaBackend", "backend"]

_warned: set[str] = set()


def _warn_once(reason: str, op: str = "ttt_linear") -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"ttt_cuda: backend 'cuda' cannot run this {op} call ({reason}); "
            "falling back to the torch backend",
            stacklevel=4,
        )


class CudaBackend:
    """Fused TTT-Linear and TTT-MLP (CUDA kernels on GPU, C++ on CPU) behind ttt-core's backend
    protocol."""

    name = "cuda"
    device_types = ("cuda",)

    def supports(self, op: str, q: Tensor, **kwargs: Any) -> str | None:
        """None when this backend runs ``op`` for these arguments, else the reason."""
        err = extension_error()
        if err is not None:
            return err
        if op == "ttt_mlp":
            return mlp_unsupported_reason(q, **kwargs)
        if op != "ttt_linear":
            return f"unknown op {op!r}"
        return linear_unsupported_reason(q, **kwargs)

    def ttt_linear(self, q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs: Any):
        """ttt-core's ``ttt_linear`` (validated inputs; ``initial_state`` always a TTTState)."""
        reason = linear_unsupported_reason(q, **kwargs)
        if reason is not None:  # e.g. an input dtype the device path does not take
            from ttt_core import ttt_linear

            _warn_once(reason)
            return ttt_linear(q, k, v, eta, W1, b1, ln_weight, ln_bias, backend="torch", **kwargs)
        return fused_ttt_linear(q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs)

    def ttt_mlp(self, q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, **kwargs: Any):
        """ttt-core's ``ttt_mlp`` (validated inputs; ``initial_state`` always a TTTState)."""
        reason = mlp_unsupported_reason(q, **kwargs)
        if reason is not None:
            from ttt_core import ttt_mlp

            _warn_once(reason, "ttt_mlp")
            return ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, backend="torch",
                           **kwargs)  # fmt: skip
        return fused_ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, **kwargs)


backend = CudaBackend()
