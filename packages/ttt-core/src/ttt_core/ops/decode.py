"""Single-token decode step of the ``torch`` backend: one causal token, no segment machinery.

Streaming generation feeds one token per call. The scan in :mod:`ttt_core.ops.scan` handles any
length with grouped segments and coefficient matrices; for one token that bookkeeping costs more
than the math. This module computes the same step directly (same semantics, see DESIGN.md).

For one token at in-mini-batch position ``o`` (``offset``) with start weights P, per fast layer
with input x (key side) and output gradient g taken at P:

    plain:  G' = G + eta x^T g            (gradient sum of the mini-batch so far; G = 0 at o = 0)
            query sees W = P - s_o G'     so  xq W = xq P - s_o (xq G + Gb + eta (xq . x + 1) g)
            at the mini-batch end (o = b - 1): P <- P - s_o G', G <- None
    Titans: S' = m S - eta x^T g,  W' = (1 - a) W + S'   (gradient at P, the mini-batch start)
            query sees W'; at the mini-batch end P <- W'

``xq G`` is never formed as a weight matrix: the new step enters through ``(xq . x + 1) g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..state import TensorDict, TTTState, zeros_like_dict
from .common import (
    LAYERS,
    affine,
    compute_dtype,
    flatten_heads,
    gelu_tanh,
    key_grads,
    position_scales,
    unflatten_heads,
)

# Every tensor here is flattened over (batch, head) to [N = B*H, ...] once, so each fast layer is one
# baddbmm; a single token's step is a few dozen small ops and their dispatch is the cost.


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _plain(q, xs, gs, eta, P, G, s: float | Tensor, completes: bool, kind: str):
    """Plain-form step on flat tensors; returns (z [N, 1, D], params, grad_sum or None)."""
    egs = [eta * g for g in gs]  # eta_j g_j per layer, (N, 1, Dout)
    h = q
    for li, ((W, b), x, eg) in enumerate(zip(LAYERS[kind], xs, egs)):
        hx1 = torch.bmm(h, x.transpose(-1, -2)) + 1.0  # (N, 1, 1): the new token's step
        corr = hx1 * eg if G is None else torch.addcmul(affine(h, G[W], G[b]), hx1, eg)
        z = affine(h, P[W], P[b])
        z = torch.sub(z, corr, alpha=s) if isinstance(s, float) else z - s * corr
        h = gelu_tanh(z) if li + 1 < len(LAYERS[kind]) else z
    new_G: TensorDict = {}
    for (W, b), x, eg in zip(LAYERS[kind], xs, egs):
        dW = torch.bmm(x.transpose(-1, -2), eg)  # (N, Din, Dout): x^T eta g
        new_G[W] = dW if G is None else G[W] + dW
        new_G[b] = eg if G is None else G[b] + eg
    if completes:
        return h, {n: P[n] - s * new_G[n] for n in P}, None
    return h, P, new_G


def _titans(q, xs, gs, eta, m, a, P, S, Wc, completes: bool, kind: str):
    """Titans-form step on flat tensors; returns (z [N, 1, D], params, momentum, current)."""
    S = S if S is not None else zeros_like_dict(P)
    Wc = Wc if Wc is not None else P
    newS, newW = {}, {}
    for (W, b), x, g in zip(LAYERS[kind], xs, gs):
        eg = eta * g  # (N, 1, Dout)
        newS[W] = torch.baddbmm(m * S[W], x.transpose(-1, -2), eg, alpha=-1.0)
        newS[b] = m * S[b] - eg
        newW[W] = torch.addcmul(newS[W], 1.0 - a, Wc[W])
        newW[b] = torch.addcmul(newS[b], 1.0 - a, Wc[b])
    h = q
    for li, (W, b) in enumerate(LAYERS[kind]):
        z = affine(h, newW[W], newW[b])
        h = gelu_tanh(z) if li + 1 < len(LAYERS[kind]) else z
    return h, (newW if completes else P), newS, (None if completes else newW)


def decode_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    state: TTTState,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    kind: str,
    mini_batch_size: int | None,
    token_scale: str | Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    eps: float,
) -> tuple[Tensor, TTTState]:
    """One causal token: q, k, v [B, H, 1, D], eta [B, H, 1] -> (o [B, H, 1, D], next state).

    Same result as :func:`ttt_core.ops.scan.ttt_scan` on a one-token call (inputs validated by the
    caller)."""
    B, H, _, D = q.shape
    N, dt = B * H, compute_dtype(q.dtype)
    qf, kf = _cast(q, dt).reshape(N, 1, D), _cast(k, dt).reshape(N, 1, D)
    vf = _cast(v, dt).reshape(N, 1, D)
    ln_w, ln_b = _cast(ln_weight, dt), _cast(ln_bias, dt)  # (H, D)
    if B > 1:
        ln_w, ln_b = ln_w.repeat(B, 1), ln_b.repeat(B, 1)  # (N, D)
    ln_w, ln_b = ln_w.unsqueeze(1), ln_b.unsqueeze(1)  # (N, 1, D)
    wbt = ln_w * (ln_b + kf - vf)  # w * (b - target), target v - k
    etaf = _cast(eta, dt).reshape(N, 1, 1)
    P = flatten_heads(state.params)
    xs, gs = key_grads(P, kf, wbt, ln_w * ln_w, eps, kind)
    o = state.offset
    end = o + 1 if mini_batch_size is None else (o + 1) % mini_batch_size
    completes = mini_batch_size is not None and end == 0
    if momentum is not None or decay is not None:
        zero = etaf.new_zeros(())
        m = zero if momentum is None else _cast(momentum, dt).reshape(N, 1, 1)
        a = zero if decay is None else _cast(decay, dt).reshape(N, 1, 1)
        z, params, S, current = _titans(qf, xs, gs, etaf, m, a, P, flatten_heads(state.momentum),
                                        flatten_heads(state.current), completes, kind)  # fmt: skip
        new = TTTState(unflatten_heads(params, B), end, mini_batch_size, None, unflatten_heads(S, B),
                       unflatten_heads(current, B))  # fmt: skip
    else:
        if isinstance(token_scale, Tensor):
            s = position_scales(token_scale, o, 1, q.device, dt)  # (1,) scale of position o
        else:
            s = 1.0 / (o + 1) if token_scale == "mean" else 1.0
        z, params, G = _plain(
            qf, xs, gs, etaf, P, flatten_heads(state.grad_sum), s, completes, kind
        )
        new = TTTState(
            unflatten_heads(params, B), end, mini_batch_size, unflatten_heads(G, B), None, None
        )
    out = qf + torch.addcmul(ln_b, F.layer_norm(z, (D,), eps=eps), ln_w)  # (N, 1, D)
    return _cast(out.view(B, H, 1, D), q.dtype), new
