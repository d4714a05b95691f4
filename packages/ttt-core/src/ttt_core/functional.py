"""The stable functional API: ``ttt_linear``, ``ttt_mlp`` and the single-step entries
``ttt_linear_step``, ``ttt_mlp_step`` (see DESIGN.md for the semantics).

Every call, a single streaming token included, takes one road (:func:`_dispatch`): validate ->
default the state -> resolve the backend -> call it. The torch backend runs the chunked dual form
(:mod:`.ops.chunked`) for sequences and the recurrent step (:mod:`.ops.recurrent`) for steps; the
generic backend runs the reference (:mod:`.ops.reference`); a registered backend runs its own.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import Tensor

from . import backends
from .fast_models import FAST_MODELS
from .ops.chunked import ttt_chunked
from .ops.common import compute_dtype
from .ops.recurrent import ttt_step
from .ops.reference import FastModel, ttt_generic
from .state import TTTState
from .validation import validate

__all__ = ["ttt_linear", "ttt_linear_step", "ttt_mlp", "ttt_mlp_step"]

TokenScale = Literal["mean", "sum"] | Tensor
ReconstructionTarget = Literal["residual", "value"]
# the keywords every op and step passes to a backend (and to its supports())
_MATH = ("mini_batch_size", "causal", "token_scale", "momentum", "decay", "eps",
         "reconstruction_target", "output_residual")  # fmt: skip
# options added in 0.2, with their defaults: a registered backend's op gets them only when they are
# not at the default (its supports() always sees them), so a backend written before them still runs
_NEW_OPTIONS = {"reconstruction_target": "residual", "output_residual": True}


def _backend_kwargs(math: dict) -> dict:
    return {n: value for n, value in math.items() if _NEW_OPTIONS.get(n, object()) != value}


def _dispatch(kind: str | FastModel, weights: dict[str, Tensor], q, k, v, eta, ln_weight, ln_bias,
              *, step: bool, initial_state, output_final_state, backend, form="auto",
              **math):  # fmt: skip
    """The one road of every call: validate, default the state, resolve the backend, call it.

    ``kind``: "linear" | "mlp", or a user fast model ``f(params, x)`` (an ``InnerLearner``'s, run by
    the generic backend); ``step``: one streaming token (``ttt_*_step``: the state is returned)."""
    B, *_ = validate(q=q, k=k, v=v, eta=eta, weights=weights, ln_weight=ln_weight, ln_bias=ln_bias,
                     initial_state=initial_state, output_final_state=output_final_state,
                     backend=backend, step=step, **math)  # fmt: skip
    if form not in ("auto", "dual", "primal"):
        raise ValueError(f"form must be 'auto', 'dual' or 'primal', got {form!r}")
    b = math["mini_batch_size"]
    state = initial_state
    if state is None:
        state = TTTState.from_params(weights, B, b, compute_dtype(q.dtype))
    elif state.mini_batch_size != b:  # at a mini-batch boundary (validated): continue with this b
        state = dataclasses.replace(state, mini_batch_size=b)
    op = f"ttt_{kind if isinstance(kind, str) else 'custom'}" + ("_step" if step else "")
    impl = backends.resolve(backend, op, q, initial_state=state,
                            output_final_state=output_final_state, **math)  # fmt: skip
    if impl == "generic":
        fast_model = FAST_MODELS[kind] if isinstance(kind, str) else kind
        o, new_state = ttt_generic(fast_model, q, k, v, eta, state, ln_weight, ln_bias, **math)
    elif impl == "torch" and step:
        kw = {n: math[n] for n in _MATH if n not in ("mini_batch_size", "causal")}
        o, new_state = ttt_step(q, k, v, eta, state, ln_weight, ln_bias, kind=kind, **kw)
    elif impl == "torch":
        o, new_state = ttt_chunked(q, k, v, eta, state, ln_weight, ln_bias, kind=kind, form=form,
                                   **math)  # fmt: skip
    elif step:
        kw = _backend_kwargs({n: val for n, val in math.items() if n != "causal"})
        return getattr(impl, op)(q, k, v, eta, *weights.values(), ln_weight, ln_bias, state=state,
                                 **kw)  # fmt: skip
    else:
        o, new_state = getattr(impl, op)(q, k, v, eta, *weights.values(), ln_weight, ln_bias,
                                         initial_state=state, output_final_state=output_final_state,
                                         **_backend_kwargs(math))  # fmt: skip
    return o, (new_state if output_final_state else None)


def ttt_linear(
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
    token_scale: TokenScale = "mean",
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    initial_state: TTTState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    backend: str = "auto",
    reconstruction_target: ReconstructionTarget = "residual",
    output_residual: bool = True,
    form: Literal["auto", "dual", "primal"] = "auto",
) -> tuple[Tensor, TTTState | None]:
    """TTT-Linear: the fast model is ``f_W(x) = x W1 + b1``, trained on the keys while reading.

    Token loss ``l_j(W) = 0.5 * ||LN_h(f_W(k_j)) - (v_j - k_j)||^2``; tokens are grouped in
    mini-batches of ``b = mini_batch_size`` whose gradients are all taken at the mini-batch's start
    weights. Causal: query i sees ``W_i = W_start - s_i * sum_{j<=i} eta_j grad l_j``; non-causal:
    every query sees ``W_start - sum_j eta_j grad l_j``. Output ``o_i = q_i + LN_h(f_{W_i}(q_i))``.
    With ``momentum``/``decay`` (Titans): ``S_j = m_j S_{j-1} - eta_j grad l_j``,
    ``W_j = (1 - a_j) W_{j-1} + S_j``.

    Args:
        q, k, v: [B, H, L, D] queries, keys, values (one floating dtype).
        eta: [B, H, L] per-token inner learning rate (final; a layer computes its own).
        W1: [H, D, D] and b1: [H, 1, D] start fast weights (per head, shared by the batch).
        ln_weight, ln_bias: [H, D] the per-head LayerNorm of the loss and the output.
        mini_batch_size: b >= 1, or None for the whole sequence as one mini-batch.
        causal: False gives the batch-parallel (non-causal) update.
        token_scale: "mean" (s_i = 1/(i+1)), "sum" (1) or a [b] tensor of per-position scales.
        momentum, decay: [B, H, L] Titans momentum m_j and decay a_j in [0, 1] (causal only).
        initial_state: a ``TTTState`` to start from (overrides W1, b1); streaming.
        output_final_state: also return the state after the last token.
        eps: LayerNorm epsilon (finite, > 0).
        backend: "auto" | "torch" | "generic" | a registered name (see ``available_backends()``).
        reconstruction_target: the token loss's target: "residual" ``v - k`` (the TTT paper) or
            "value" ``v`` (Titans' associative memory).
        output_residual: ``o = q + LN_h(f(q))`` (True) or ``o = LN_h(f(q))`` (False).
        form: torch backend only: "dual" (closed form over the mini-batch), "primal" (explicit
            per-token weights) or "auto" (dual, primal for single tokens). Same result. The
            Titans dual form runs as one autograd Function with a hand-written backward: it has
            no double backward (``create_graph=True`` raises; use ``form="primal"`` for that).

    Returns:
        o: [B, H, L, D] in q's dtype; state: ``TTTState`` or None (unless ``output_final_state``).

    Examples:
        >>> B, H, L, D = 2, 4, 64, 32
        >>> q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
        >>> eta = torch.full((B, H, L), 0.1)
        >>> W1, b1 = torch.randn(H, D, D) * 0.02, torch.zeros(H, 1, D)
        >>> o, _ = ttt_linear(q, k, v, eta, W1, b1, torch.ones(H, D), torch.zeros(H, D))
    """
    return _dispatch("linear", {"W1": W1, "b1": b1}, q, k, v, eta, ln_weight, ln_bias, step=False,
                     mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
                     momentum=momentum, decay=decay, initial_state=initial_state,
                     output_final_state=output_final_state, eps=eps, backend=backend,
                     reconstruction_target=reconstruction_target, output_residual=output_residual,
                     form=form)  # fmt: skip


def ttt_mlp(
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
    token_scale: TokenScale = "mean",
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    initial_state: TTTState | None = None,
    output_final_state: bool = False,
    eps: float = 1e-6,
    backend: str = "auto",
    reconstruction_target: ReconstructionTarget = "residual",
    output_residual: bool = True,
    form: Literal["auto", "dual", "primal"] = "auto",
) -> tuple[Tensor, TTTState | None]:
    """TTT-MLP: the fast model is ``f_W(x) = gelu_tanh(x W1 + b1) W2 + b2``; see :func:`ttt_linear`.

    Args:
        W1: [H, D, F], b1: [H, 1, F], W2: [H, F, D], b2: [H, 1, D] start fast weights (F = 4D usual).
        Everything else as in :func:`ttt_linear`.

    Returns:
        o: [B, H, L, D] in q's dtype; state: ``TTTState`` or None.

    Examples:
        >>> H, D = 4, 32
        >>> W1, b1 = torch.randn(H, D, 4 * D) * 0.02, torch.zeros(H, 1, 4 * D)
        >>> W2, b2 = torch.randn(H, 4 * D, D) * 0.02, torch.zeros(H, 1, D)
        >>> o, _ = ttt_mlp(q, k, v, eta, W1, b1, W2, b2, torch.ones(H, D), torch.zeros(H, D))
    """
    return _dispatch("mlp", {"W1": W1, "b1": b1, "W2": W2, "b2": b2}, q, k, v, eta, ln_weight,
                     ln_bias, step=False, mini_batch_size=mini_batch_size, causal=causal,
                     token_scale=token_scale, momentum=momentum, decay=decay,
                     initial_state=initial_state, output_final_state=output_final_state, eps=eps,
                     backend=backend, reconstruction_target=reconstruction_target,
                     output_residual=output_residual, form=form)  # fmt: skip


def ttt_linear_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W1: Tensor,
    b1: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    state: TTTState | None = None,
    mini_batch_size: int | None = 16,
    token_scale: TokenScale = "mean",
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
    reconstruction_target: ReconstructionTarget = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, TTTState]:
    """One streaming token of causal TTT-Linear (decode): the state in, the next state out.

    Same result as :func:`ttt_linear` over the whole sequence, one call per token (the semantics
    of DESIGN.md); the public decode path a layer calls and a registered backend may serve
    (``Backend.ttt_linear_step``).

    Args:
        q, k, v: [B, H, 1, D] the token's query, key, value.
        eta: [B, H, 1] its inner learning rate; momentum, decay: [B, H, 1] (Titans form).
        W1 [H, D, D], b1 [H, 1, D]: the start fast weights (used when ``state`` is None).
        state: the ``TTTState`` after the previous token (None: start from W1, b1).
        Everything else as in :func:`ttt_linear` (always causal).

    Returns:
        o: [B, H, 1, D] in q's dtype; state: the ``TTTState`` after this token.

    Examples:
        >>> state = None
        >>> for t in range(L):
        ...     o_t, state = ttt_linear_step(q[:, :, t:t+1], k[:, :, t:t+1], v[:, :, t:t+1],
        ...                                  eta[:, :, t:t+1], W1, b1, ln_w, ln_b, state=state)
    """
    return _dispatch("linear", {"W1": W1, "b1": b1}, q, k, v, eta, ln_weight, ln_bias, step=True,
                     mini_batch_size=mini_batch_size, causal=True, token_scale=token_scale,
                     momentum=momentum, decay=decay, initial_state=state, output_final_state=True,
                     eps=eps, backend=backend, reconstruction_target=reconstruction_target,
                     output_residual=output_residual)  # fmt: skip


def ttt_mlp_step(
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
    state: TTTState | None = None,
    mini_batch_size: int | None = 16,
    token_scale: TokenScale = "mean",
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    eps: float = 1e-6,
    backend: str = "auto",
    reconstruction_target: ReconstructionTarget = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, TTTState]:
    """One streaming token of causal TTT-MLP; see :func:`ttt_linear_step` and :func:`ttt_mlp`.

    Args:
        W1 [H, D, F], b1 [H, 1, F], W2 [H, F, D], b2 [H, 1, D]: the start fast weights.

    Returns:
        o: [B, H, 1, D] in q's dtype; state: the ``TTTState`` after this token.
    """
    return _dispatch("mlp", {"W1": W1, "b1": b1, "W2": W2, "b2": b2}, q, k, v, eta, ln_weight,
                     ln_bias, step=True, mini_batch_size=mini_batch_size, causal=True,
                     token_scale=token_scale, momentum=momentum, decay=decay, initial_state=state,
                     output_final_state=True, eps=eps, backend=backend,
                     reconstruction_target=reconstruction_target,
                     output_residual=output_residual)  # fmt: skip
