"""Inner learners: the fast-weight model of a TTT layer, as an ``nn.Module``.

An :class:`InnerLearner` owns the *start* fast weights (per head, ``[H, ...]``; outer-loop
parameters) and the per-head LayerNorm of the token loss. ``forward`` runs the inner loop:

    l_j(W) = 0.5 * ||LN_h(f_W(k_j)) - (v_j - k_j)||^2,   o_i = q_i + LN_h(f_{W_i}(q_i))

A subclass that only defines the fast model (:meth:`InnerLearner.fast_model`) and its parameters
gets the generic torch.func path for free; :class:`LinearLearner` and :class:`MLPLearner` route to
the closed-form ``ttt_linear`` / ``ttt_mlp``.

Examples:
    >>> class SwiGLULearner(InnerLearner):
    ...     def __init__(self, num_heads, head_dim, hidden):
    ...         super().__init__(num_heads, head_dim)
    ...         self.Wg = nn.Parameter(torch.randn(num_heads, head_dim, hidden) * 0.02)
    ...         self.Wu = nn.Parameter(torch.randn(num_heads, head_dim, hidden) * 0.02)
    ...         self.Wd = nn.Parameter(torch.randn(num_heads, hidden, head_dim) * 0.02)
    ...     def fast_model(self, p, x):  # x [N, D] -> [N, D]
    ...         return (F.silu(x @ p["Wg"]) * (x @ p["Wu"])) @ p["Wd"]
    >>> o, state = SwiGLULearner(4, 16, 64)(q, k, v, eta)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from .fast_models import linear_fast_model, mlp_fast_model
from .functional import _dispatch, ttt_linear, ttt_linear_step, ttt_mlp, ttt_mlp_step
from .state import TensorDict, TTTState

__all__ = ["InnerLearner", "LinearLearner", "MLPLearner"]


class InnerLearner(nn.Module, ABC):
    """Abstract fast-weight model trained by the TTT inner loop.

    Args:
        num_heads: H.
        head_dim: D (fast models map D -> D).
        eps: epsilon of the per-head LayerNorm (weight ``ln_weight``, bias ``ln_bias``: [H, D]).

    Every ``nn.Parameter`` of the subclass other than ``ln_weight``/``ln_bias`` is a fast weight with
    a leading head dim; the fast model sees it per head, without that dim.
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"num_heads and head_dim must be >= 1, got {num_heads}, {head_dim}")
        self.num_heads, self.head_dim, self.eps = num_heads, head_dim, eps
        self.ln_weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.ln_bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    @abstractmethod
    def fast_model(self, params: TensorDict, x: Tensor) -> Tensor:
        """f_W(x) for one head: ``params`` without the head dim, ``x [N, D] -> [N, D]``."""

    def fast_params(self) -> TensorDict:
        """The start fast weights ``{name: [H, ...]}`` (outer-loop parameters)."""
        return {n: p for n, p in self.named_parameters(recurse=False) if not n.startswith("ln_")}

    def init_state(self, batch: int, dtype: torch.dtype = torch.float32) -> TTTState:
        """A fresh state: the start weights for each of ``batch`` samples (differentiable)."""
        return TTTState.from_params(self.fast_params(), batch, None, dtype)

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        eta: Tensor,
        *,
        state: TTTState | None = None,
        mini_batch_size: int | None = 16,
        causal: bool = True,
        token_scale: str | Tensor = "mean",
        momentum: Tensor | None = None,
        decay: Tensor | None = None,
        output_final_state: bool = False,
        backend: str = "auto",
        reconstruction_target: str = "residual",
        output_residual: bool = True,
    ) -> tuple[Tensor, TTTState | None]:
        """Run the inner loop over q, k, v [B, H, L, D] with per-token lr eta [B, H, L].

        Returns ``(o [B, H, L, D], state or None)``; the keywords mean what they mean in
        :func:`ttt_core.ttt_linear`. This default runs the generic torch.func path (through the
        functional API's dispatch: validation, state default, backend ``generic``).
        """
        self._generic_only(backend)
        return _dispatch(self.fast_model, self.fast_params(), q, k, v, eta, self.ln_weight, self.ln_bias,
                         step=False, mini_batch_size=mini_batch_size, causal=causal,
                         token_scale=token_scale, momentum=momentum, decay=decay,
                         initial_state=state, output_final_state=output_final_state, eps=self.eps,
                         backend="generic", reconstruction_target=reconstruction_target,
                         output_residual=output_residual)  # fmt: skip

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        eta: Tensor,
        *,
        state: TTTState | None = None,
        mini_batch_size: int | None = 16,
        token_scale: str | Tensor = "mean",
        momentum: Tensor | None = None,
        decay: Tensor | None = None,
        backend: str = "auto",
        reconstruction_target: str = "residual",
        output_residual: bool = True,
    ) -> tuple[Tensor, TTTState]:
        """One streaming token (:func:`ttt_core.ttt_linear_step`'s contract): q, k, v [B, H, 1, D],
        eta (momentum, decay) [B, H, 1] -> (o [B, H, 1, D], the next state)."""
        self._generic_only(backend)
        return _dispatch(self.fast_model, self.fast_params(), q, k, v, eta, self.ln_weight, self.ln_bias,
                         step=True, mini_batch_size=mini_batch_size, causal=True,
                         token_scale=token_scale, momentum=momentum, decay=decay,
                         initial_state=state, output_final_state=True, eps=self.eps,
                         backend="generic", reconstruction_target=reconstruction_target,
                         output_residual=output_residual)  # fmt: skip

    def _generic_only(self, backend: str) -> None:
        if backend not in ("auto", "generic"):
            raise ValueError(
                f"{type(self).__name__} defines its own fast model: only backend 'generic' (or "
                f"'auto') can run it, got {backend!r}"
            )


class LinearLearner(InnerLearner):
    """TTT-Linear: ``f_W(x) = x W1 + b1`` with W1 [H, D, D] (init N(0, 0.02)), b1 [H, 1, D] (zeros)."""

    def __init__(self, num_heads: int, head_dim: int, eps: float = 1e-6, init_std: float = 0.02):
        super().__init__(num_heads, head_dim, eps)
        self.W1 = nn.Parameter(torch.randn(num_heads, head_dim, head_dim) * init_std)
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, head_dim))

    def fast_model(self, params: TensorDict, x: Tensor) -> Tensor:
        return linear_fast_model(params, x)

    def fast_params(self) -> TensorDict:
        return {"W1": self.W1, "b1": self.b1}

    def forward(self, q, k, v, eta, *, state=None, output_final_state=False, **kw):
        """Closed-form TTT-Linear (:func:`ttt_core.ttt_linear`); ``backend="generic"`` works too."""
        return ttt_linear(q, k, v, eta, self.W1, self.b1, self.ln_weight, self.ln_bias,
                          initial_state=state, output_final_state=output_final_state,
                          eps=self.eps, **kw)  # fmt: skip

    def step(self, q, k, v, eta, *, state=None, **kw):
        """One streaming token: :func:`ttt_core.ttt_linear_step`."""
        return ttt_linear_step(q, k, v, eta, self.W1, self.b1, self.ln_weight, self.ln_bias,
                               state=state, eps=self.eps, **kw)  # fmt: skip


class MLPLearner(InnerLearner):
    """TTT-MLP: ``f_W(x) = gelu_tanh(x W1 + b1) W2 + b2``, hidden F = ``mlp_ratio * D``."""

    def __init__(self, num_heads: int, head_dim: int, mlp_ratio: int = 4, eps: float = 1e-6,
                 init_std: float = 0.02):  # fmt: skip
        super().__init__(num_heads, head_dim, eps)
        F = mlp_ratio * head_dim
        self.W1 = nn.Parameter(torch.randn(num_heads, head_dim, F) * init_std)
        self.b1 = nn.Parameter(torch.zeros(num_heads, 1, F))
        self.W2 = nn.Parameter(
            torch.randn(num_heads, F, head_dim) * init_std / math.sqrt(mlp_ratio)
        )
        self.b2 = nn.Parameter(torch.zeros(num_heads, 1, head_dim))

    def fast_model(self, params: TensorDict, x: Tensor) -> Tensor:
        return mlp_fast_model(params, x)

    def fast_params(self) -> TensorDict:
        return {"W1": self.W1, "b1": self.b1, "W2": self.W2, "b2": self.b2}

    def forward(self, q, k, v, eta, *, state=None, output_final_state=False, **kw):
        """Closed-form TTT-MLP (:func:`ttt_core.ttt_mlp`); ``backend="generic"`` works too."""
        return ttt_mlp(q, k, v, eta, self.W1, self.b1, self.W2, self.b2, self.ln_weight,
                       self.ln_bias, initial_state=state, output_final_state=output_final_state,
                       eps=self.eps, **kw)  # fmt: skip

    def step(self, q, k, v, eta, *, state=None, **kw):
        """One streaming token: :func:`ttt_core.ttt_mlp_step`."""
        return ttt_mlp_step(q, k, v, eta, self.W1, self.b1, self.W2, self.b2, self.ln_weight,
                            self.ln_bias, state=state, eps=self.eps, **kw)  # fmt: skip
