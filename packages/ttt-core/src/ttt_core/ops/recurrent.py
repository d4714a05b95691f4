"""The recurrent single step: one causal streaming token (the torch backend's ``ttt_*_step``).

For one token at in-mini-batch position ``o = state.offset`` with start weights P, per fast layer
with key-side input x and output gradient g (both taken at P, :func:`~.common.key_grads`):

    plain:  G' = G + eta x^T g            (what the mini-batch read so far; G = 0 at o = 0)
            the query sees W = P - s_o G', which is also the next start P when o = b - 1
    Titans: S' = m S - eta x^T g,  W' = (1 - a) W + S'     (gradient at P, the mini-batch start)
            the query sees W'; at the mini-batch end P <- W'

and ``o = q + LN_h(f_W(q))``. Same result as :mod:`.chunked` on a one-token call and as the
reference (:mod:`.reference`); the tests compare all three in fp64.
"""

from __future__ import annotations

from torch import Tensor

from ..state import TensorDict, TTTState, zeros_like_dict
from .common import (
    LAYERS,
    affine,
    as_dtype,
    compute_dtype,
    gelu_tanh,
    key_grads,
    layer_norm_heads,
    output,
    reconstruction,
)


def fast_model(x: Tensor, W: TensorDict, kind: str) -> Tensor:
    """f_W(x) with per-sample weights: x [B, H, n, D], W {name: [B, H, ...]} -> [B, H, n, D]."""
    h = x
    for li, (w, b) in enumerate(LAYERS[kind]):
        h = affine(h, W[w], W[b])  # (B, H, n, Dout)
        if li + 1 < len(LAYERS[kind]):
            h = gelu_tanh(h)
    return h


def ttt_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    state: TTTState,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    kind: str,
    token_scale: str | Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    eps: float,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, TTTState]:
    """One causal token: q, k, v [B, H, 1, D], eta (momentum, decay) [B, H, 1] -> (o [B, H, 1, D]
    in q's dtype, next state). Inputs are validated by the caller (``ttt_core.functional``)."""
    dt = compute_dtype(q.dtype)
    qf, kf = as_dtype(q, dt), as_dtype(k, dt)
    ln_w, ln_b = as_dtype(ln_weight, dt), as_dtype(ln_bias, dt)
    target = reconstruction(kf, as_dtype(v, dt), reconstruction_target)  # (B, H, 1, D)
    P = state.params
    xs, gs = key_grads(P, kf, target, ln_w, ln_b, eps, kind)  # x [B, H, 1, Din], g [B, H, 1, Dout]
    e = as_dtype(eta, dt).unsqueeze(-1)  # (B, H, 1, 1)
    step: TensorDict = {}  # eta x^T g for every fast weight
    for (W, b), x, g in zip(LAYERS[kind], xs, gs):
        eg = e * g  # (B, H, 1, Dout)
        step[W] = x.transpose(-1, -2) * eg  # (B, H, Din, Dout): an outer product for one token
        step[b] = eg
    completes = state.end_offset(1) == 0
    if momentum is not None or decay is not None:  # Titans
        m = 0.0 if momentum is None else as_dtype(momentum, dt).unsqueeze(-1)  # (B, H, 1, 1)
        a = 0.0 if decay is None else as_dtype(decay, dt).unsqueeze(-1)
        S = state.momentum if state.momentum is not None else zeros_like_dict(P)
        Wc = state.current if state.current is not None else P
        S = {n: m * S[n] - step[n] for n in P}
        Wq = {n: (1.0 - a) * Wc[n] + S[n] for n in P}
        new = state.advance(1, params=Wq if completes else P, momentum=S, current=Wq)
    else:
        G = step if state.grad_sum is None else {n: state.grad_sum[n] + step[n] for n in P}
        s = TTTState.token_scale_at(token_scale, state.offset)  # a number, or 0-d
        Wq = {n: P[n] - s * G[n] for n in P}
        new = state.advance(1, params=Wq if completes else P, grad_sum=G)
    z = fast_model(qf, Wq, kind)  # (B, H, 1, D)
    o = output(qf, layer_norm_heads(z, ln_w, ln_b, eps), output_residual)
    return as_dtype(o, q.dtype), new
