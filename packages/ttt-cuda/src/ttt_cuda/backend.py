"""The ``cuda`` backend of ttt-core, registered through the ``ttt_core.backends`` entry point.

``backend="auto"`` picks it for CUDA tensors (``device_types = ("cuda",)``); ``backend="cuda"``
also runs the C++ CPU path on CPU tensors (single-threaded; ttt-core's torch backend is usually
faster on CPU, so auto leaves CPU alone). Calls it cannot fuse (TTT-MLP, Titans, a start inside a
mini-batch, unsupported dtype/head dim) are refused in ``supports`` with the reason: ttt-core then
warns once and uses its torch backend under ``auto``, or raises under ``backend="cuda"``. As a
safety net, ``ttt_linear`` called directly with such a call warns once and runs the torch backend.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from ttt_cuda._ext import extension_error
from ttt_cuda.linear import fused_ttt_linear, linear_unsupported_reason

__all__ = ["CudaBackend", "backend"]

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"ttt_cuda: backend 'cuda' cannot run this ttt_linear call ({reason}); "
            "falling back to the torch backend",
            stacklevel=4,
        )


class CudaBackend:
    """Fused TTT-Linear (CUDA kernels on GPU, C++ on CPU) behind ttt-core's backend protocol."""

    name = "cuda"
    device_types = ("cuda",)

    def supports(self, op: str, q: Tensor, **kwargs: Any) -> str | None:
        """None when this backend runs ``op`` for these arguments, else the reason."""
        err = extension_error()
        if err is not None:
            return err
        if op == "ttt_mlp":
            return "TTT-MLP is not fused yet (TTT-Linear only)"
        if op != "ttt_linear":
            return f"unknown op {op!r}"
        return linear_unsupported_reason(q, **kwargs)

    def ttt_linear(self, q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs: Any):
        """ttt-core's ``ttt_linear`` (validated inputs; ``initial_state`` always a TTTState)."""
        reason = linear_unsupported_reason(q, **kwargs)
        if reason is not None:  # e.g. a streaming state cut inside a mini-batch
            from ttt_core import ttt_linear

            _warn_once(reason)
            return ttt_linear(q, k, v, eta, W1, b1, ln_weight, ln_bias, backend="torch", **kwargs)
        return fused_ttt_linear(q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs)

    def ttt_mlp(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("ttt_cuda fuses TTT-Linear only; supports() refuses ttt_mlp")


backend = CudaBackend()
