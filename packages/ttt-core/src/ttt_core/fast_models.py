"""The built-in fast models f_W for one head (used by the generic path and the learners).

``params`` keep their per-head shapes without the head dim (``W1 [D, F]``, ``b1 [1, F]``);
``x`` is ``[N, D]``.
"""

from __future__ import annotations

from torch import Tensor

from .ops.common import gelu_tanh
from .state import TensorDict


def linear_fast_model(params: TensorDict, x: Tensor) -> Tensor:
    """f_W(x) = x W1 + b1."""
    return x @ params["W1"] + params["b1"]


def mlp_fast_model(params: TensorDict, x: Tensor) -> Tensor:
    """f_W(x) = gelu_tanh(x W1 + b1) W2 + b2."""
    return gelu_tanh(x @ params["W1"] + params["b1"]) @ params["W2"] + params["b2"]


FAST_MODELS = {"linear": linear_fast_model, "mlp": mlp_fast_model}
