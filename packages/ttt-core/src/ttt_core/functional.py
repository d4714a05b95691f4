"""The stable functional API: ``ttt_linear``, ``ttt_mlp`` and the single-step entries
``ttt_linear_step``, ``ttt_mlp_step`` (see DESIGN.md for the semantics).

Every call, a single streaming token included, takes one road (:func:`_dispatch`): validate ->
default the state -> resolve the backend -> call it. The torch backend runs the chunked dual form
(:mod:`.ops.chunked`) for sequences and the recurrent step (:mod:`.ops.recurrent`) for steps; the
generic backend runs the reference (:mod:`.ops.reference`); a registered backend runs its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import Tensor

from . import backends
from .fast_models import FAST_MODELS
from .ops.chunked import ttt_chunked
from .ops.common import compute_dtype
from .ops.recurrent import ttt_step
from .ops.reference import FastModel, ttt_generic
from .split import run_checkpointed, run_varlen, sequence_bounds
from .state import TTTState
from .validation import metadata_key, validate_with_key

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
    return {
        n: value for n, value in math.items() if n not in _NEW_OPTIONS or _NEW_OPTIONS[n] != value
    }


def _dispatch(kind: str | FastModel, weights: dict[str, Tensor], q, k, v, eta, ln_weight, ln_bias,
              *, step: bool, initial_state, output_final_state, backend, form="auto",
              checkpoint_group_size=None, cu_seqlens=None, lengths=None, **math):  # fmt: skip
    """The one road of every call: validate, default the state, resolve the backend, call it.

    ``kind``: "linear" | "mlp", or a user fast model ``f(params, x)`` (an ``InnerLearner``'s, run by
    the generic backend); ``step``: one streaming token (``ttt_*_step``: the state is returned).
    Variable-length calls (``cu_seqlens``/``lengths``) run every sequence through this road alone."""
    call = dict(q=q, k=k, v=v, eta=eta, weights=weights, ln_weight=ln_weight, ln_bias=ln_bias,
                initial_state=initial_state, output_final_state=output_final_state,
                backend=backend, step=step, checkpoint_group_size=checkpoint_group_size,
                cu_seqlens=cu_seqlens, lengths=lengths, **math)  # fmt: skip
    key = metadata_key(**call)  # one key per call: for the checks and the backend choice
    B, *_ = validate_with_key(key, **call)
    if form not in ("auto", "dual", "primal"):
        raise ValueError(f"form must be 'auto', 'dual' or 'primal', got {form!r}")
    if form != "auto" and backend == "auto":
        backend = "torch"  # a form is the torch backend's option: asking for one picks it
    if cu_seqlens is not None or lengths is not None:
        return _dispatch_varlen(kind, weights, q, k, v, eta, ln_weight, ln_bias,
                                initial_state=initial_state, output_final_state=output_final_state,
                                backend=backend, form=form, cu_seqlens=cu_seqlens, lengths=lengths,
                                checkpoint_group_size=checkpoint_group_size, **math)  # fmt: skip
    b = math["mini_batch_size"]
    state = TTTState.start(initial_state, weights, B, b, compute_dtype(q.dtype))
    op = f"ttt_{kind if isinstance(kind, str) else 'custom'}" + ("_step" if step else "")
    extra = (
        {} if checkpoint_group_size is None else {"checkpoint_group_size": checkpoint_group_size}
    )
    impl = backends.resolve_with_key(key, backend, op, q, k=k, v=v, eta=eta, ln_weight=ln_weight,
                                     ln_bias=ln_bias, initial_state=state,
                                     output_final_state=output_final_state, **math,
                                     **extra)  # fmt: skip
    seq = {"q": q, "k": k, "v": v, "eta": eta, "momentum": math.pop("momentum"),
           "decay": math.pop("decay")}  # fmt: skip

    shared = {"ln_weight": ln_weight, "ln_bias": ln_bias}
    if isinstance(math["token_scale"], Tensor):
        shared["token_scale"] = math["token_scale"]

    def run(seq: dict, state: TTTState, given: dict) -> tuple[Tensor, TTTState]:
        """The backend on the per-token inputs ``seq`` from ``state`` (``given``: the shared
        tensors to use instead of the call's, as a recompute region passes them)."""
        q, k, v, eta = seq["q"], seq["k"], seq["v"], seq["eta"]
        ln_w, ln_b = given.get("ln_weight", ln_weight), given.get("ln_bias", ln_bias)
        kw = {**math, "momentum": seq["momentum"], "decay": seq["decay"]}
        kw["token_scale"] = given.get("token_scale", kw["token_scale"])
        if impl == "generic":
            fast_model = FAST_MODELS[kind] if isinstance(kind, str) else kind
            return ttt_generic(fast_model, q, k, v, eta, state, ln_w, ln_b, **kw)
        if impl == "torch" and step:
            del kw["mini_batch_size"], kw["causal"]
            return ttt_step(q, k, v, eta, state, ln_w, ln_b, kind=kind, **kw)
        if impl == "torch":
            return ttt_chunked(q, k, v, eta, state, ln_w, ln_b, kind=kind, form=form, **kw)
        kw = _backend_kwargs({**kw, **extra})
        if step:
            del kw["causal"]
            return getattr(impl, op)(q, k, v, eta, *weights.values(), ln_w, ln_b,
                                     state=state, **kw)  # fmt: skip
        return getattr(impl, op)(q, k, v, eta, *weights.values(), ln_w, ln_b,
                                 initial_state=state, output_final_state=True, **kw)  # fmt: skip

    # the math keeps its own dtypes (fp32 state for low-precision inputs) under autocast
    autocast_off = (torch.autocast(q.device.type, enabled=False)
                    if torch.is_autocast_enabled(q.device.type) else nullcontext())  # fmt: skip
    with autocast_off:
        if checkpoint_group_size is not None and impl in backends.BUILTIN and not step:
            o, new_state = run_checkpointed(run, seq, state, shared, checkpoint_group_size)
        else:
            o, new_state = run(seq, state, {})
    return o, (new_state if output_final_state else None)


def _dispatch_varlen(kind, weights, q, k, v, eta, ln_weight, ln_bias, *, initial_state,
                     output_final_state, cu_seqlens, lengths, **options):  # fmt: skip
    """Every sequence of a packed (``cu_seqlens``) or right-padded (``lengths``) call through
    :func:`_dispatch` alone, from its own state (``initial_state``: a list, one per sequence)."""
    bounds = sequence_bounds(cu_seqlens, lengths)
    if initial_state is not None and len(initial_state) != len(bounds):
        raise ValueError(
            f"initial_state must be a list of {len(bounds)} TTTStates (one per sequence), got "
            f"{len(initial_state)}"
        )
    states = initial_state if initial_state is not None else [None] * len(bounds)

    def run(seq: dict, state: TTTState | None, shared: dict):
        q, k, v, eta, momentum, decay = seq.values()
        return _dispatch(kind, weights, q, k, v, eta, ln_weight, ln_bias, step=False,
                         initial_state=state, output_final_state=options["causal"],
                         momentum=momentum, decay=decay, **options)  # fmt: skip

    seq = {"q": q, "k": k, "v": v, "eta": eta, "momentum": options.pop("momentum"),
           "decay": options.pop("decay")}  # fmt: skip
    o, finals = run_varlen(run, seq, states, bounds)
    return o, (finals if output_final_state else None)


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
    checkpoint_group_size: int | None = None,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    lengths: Tensor | Sequence[int] | None = None,
    form: Literal["auto", "dual", "primal"] = "auto",
) -> tuple[Tensor, TTTState | list[TTTState] | None]:
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
        checkpoint_group_size: G >= 1: gradient checkpointing; groups of G mini-batches are
            recomputed in the backward from their start state instead of keeping their
            intermediates (same result; torch and generic backends). None: off.
        cu_seqlens: [N + 1] offsets of N packed sequences in a q of batch 1 ([1, H, T, D]; the
            flash-linear-attention convention); each runs from its own state (``initial_state``: a
            list of N batch-1 states) and the final state is a list of N states.
        lengths: [B] real tokens per sample of a right-padded batch; padding never touches the
            real tokens, its outputs are zeros, states are per sample (lists, as for cu_seqlens).
        form: torch backend only (under ``backend="auto"`` a form other than "auto" picks the
            torch backend): "dual" (closed form over the mini-batch), "primal" (explicit
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
                     checkpoint_group_size=checkpoint_group_size, cu_seqlens=cu_seqlens,
                     lengths=lengths, form=form)  # fmt: skip


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
    checkpoint_group_size: int | None = None,
    cu_seqlens: Tensor | Sequence[int] | None = None,
    lengths: Tensor | Sequence[int] | None = None,
    form: Literal["auto", "dual", "primal"] = "auto",
) -> tuple[Tensor, TTTState | list[TTTState] | None]:
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
                     output_residual=output_residual, checkpoint_group_size=checkpoint_group_size,
                     cu_seqlens=cu_seqlens, lengths=lengths, form=form)  # fmt: skip


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
