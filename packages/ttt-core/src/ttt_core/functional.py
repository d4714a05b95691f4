"""The stable functional API: ``ttt_linear`` and ``ttt_mlp`` (see DESIGN.md for the semantics)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from . import backends
from .fast_models import FAST_MODELS
from .ops.common import compute_dtype
from .ops.decode import decode_step
from .ops.generic import ttt_generic
from .ops.scan import ttt_scan
from .state import TTTState
from .validation import validate

__all__ = ["ttt_linear", "ttt_mlp"]

TokenScale = Literal["mean", "sum"] | Tensor


def _run(kind: str, weights: dict[str, Tensor], q, k, v, eta, ln_weight, ln_bias, **kw):
    """The functional API's body."""
    B, *_ = validate(q=q, k=k, v=v, eta=eta, weights=weights, ln_weight=ln_weight,
                     ln_bias=ln_bias, **{n: kw[n] for n in _CHECKED})  # fmt: skip
    form = kw.pop("form")
    if form not in ("auto", "dual", "primal"):
        raise ValueError(f"form must be 'auto', 'dual' or 'primal', got {form!r}")
    state = kw.pop("initial_state")
    if state is None:
        state = TTTState.from_params(weights, B, kw["mini_batch_size"], compute_dtype(q.dtype))
    output_final_state = kw.pop("output_final_state")
    impl = backends.resolve(kw.pop("backend"), f"ttt_{kind}", q, initial_state=state,
                            output_final_state=output_final_state, **kw)  # fmt: skip
    common = dict(mini_batch_size=kw["mini_batch_size"], causal=kw["causal"],
                  token_scale=kw["token_scale"], momentum=kw["momentum"], decay=kw["decay"],
                  eps=kw["eps"])  # fmt: skip
    if impl == "torch" and q.shape[2] == 1 and kw["causal"] and form != "dual":
        o, new_state = decode_step(  # one streaming token: skip the scan's segment machinery
            q, k, v, eta, state, ln_weight, ln_bias, kind=kind,
            **{n: common[n] for n in ("mini_batch_size", "token_scale", "momentum", "decay", "eps")},
        )  # fmt: skip
    elif impl == "torch":
        o, new_state = ttt_scan(
            q, k, v, eta, state, ln_weight, ln_bias, kind=kind, form=form, **common
        )
    elif impl == "generic":
        o, new_state = ttt_generic(
            FAST_MODELS[kind], q, k, v, eta, state, ln_weight, ln_bias, **common
        )
    else:
        fn = impl.ttt_linear if kind == "linear" else impl.ttt_mlp
        o, new_state = fn(q, k, v, eta, *weights.values(), ln_weight, ln_bias, initial_state=state,
                          output_final_state=output_final_state, **common)  # fmt: skip
    return o, (new_state if output_final_state else None)


_CHECKED = ("mini_batch_size", "causal", "token_scale", "momentum", "decay", "initial_state",
            "output_final_state", "eps", "backend")  # fmt: skip


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
        eps: LayerNorm epsilon.
        backend: "auto" | "torch" | "generic" | a registered name (see ``available_backends()``).
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
    return _run("linear", {"W1": W1, "b1": b1}, q, k, v, eta, ln_weight, ln_bias,
                mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
                momentum=momentum, decay=decay, initial_state=initial_state,
                output_final_state=output_final_state, eps=eps, backend=backend, form=form)  # fmt: skip


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
    return _run("mlp", {"W1": W1, "b1": b1, "W2": W2, "b2": b2}, q, k, v, eta, ln_weight, ln_bias,
                mini_batch_size=mini_batch_size, causal=causal, token_scale=token_scale,
                momentum=momentum, decay=decay, initial_state=initial_state,
                output_final_state=output_final_state, eps=eps, backend=backend, form=form)  # fmt: skip
