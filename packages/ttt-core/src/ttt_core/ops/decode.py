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
from torch import Tensor

from ..state import TensorDict, TTTState, zeros_like_dict
from .common import (
    compute_dtype,
    gelu_tanh,
    gelu_tanh_grad,
    head_view,
    layer_norm_heads,
    ln_loss_grad_pre,
    position_scales,
)

LAYERS = {"linear": (("W1", "b1"),), "mlp": (("W1", "b1"), ("W2", "b2"))}


def _apply(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x W + b`` for x [B, H, 1, Din], W [B, H, Din, Dout], b [B, H, 1, Dout]."""
    return torch.baddbmm(b.flatten(0, 1), x.flatten(0, 1), W.flatten(0, 1)).view(
        *x.shape[:-1], W.shape[-1]
    )


def _key_side(P: TensorDict, k: Tensor, wbt: Tensor, w2: Tensor, eps: float, kind: str):
    """Inputs x_l [B, H, 1, Din] and output gradients g_l [B, H, 1, Dout] of each fast layer at P."""
    if kind == "linear":
        return [k], [ln_loss_grad_pre(_apply(k, P["W1"], P["b1"]), wbt, w2, eps)]
    z1 = _apply(k, P["W1"], P["b1"])  # (B, H, 1, F)
    x2 = gelu_tanh(z1)
    g2 = ln_loss_grad_pre(_apply(x2, P["W2"], P["b2"]), wbt, w2, eps)  # (B, H, 1, D)
    g1 = (g2 @ P["W2"].transpose(-1, -2)) * gelu_tanh_grad(z1)  # (B, H, 1, F)
    return [k, x2], [g1, g2]


def _outer(x: Tensor, g: Tensor) -> Tensor:
    """x^T g for one token: [B, H, 1, Din] x [B, H, 1, Dout] -> [B, H, Din, Dout]."""
    return x.transpose(-1, -2) * g


def _plain(q, xs, gs, eta, state: TTTState, s: float | Tensor, completes: bool, kind: str):
    """Plain-form step; returns (z [B, H, 1, D], params, grad_sum or None)."""
    P, G = state.params, state.grad_sum
    egs = [eta * g for g in gs]  # eta_j g_j per layer, (B, H, 1, Dout)
    h = q
    for li, ((W, b), x, eg) in enumerate(zip(LAYERS[kind], xs, egs)):
        hx1 = h @ x.transpose(-1, -2) + 1.0  # (B, H, 1, 1): the new token's step, xq . x + 1
        corr = hx1 * eg if G is None else torch.addcmul(_apply(h, G[W], G[b]), hx1, eg)
        z = (
            torch.sub(_apply(h, P[W], P[b]), corr, alpha=s)
            if isinstance(s, float)
            else (_apply(h, P[W], P[b]) - s * corr)
        )
        h = gelu_tanh(z) if li + 1 < len(LAYERS[kind]) else z
    new_G: TensorDict = {}
    for (W, b), x, eg in zip(LAYERS[kind], xs, egs):
        dW = _outer(x, eg)
        new_G[W] = dW if G is None else G[W] + dW
        new_G[b] = eg if G is None else G[b] + eg
    if completes:
        return h, {n: P[n] - s * new_G[n] for n in P}, None
    return h, P, new_G


def _titans(q, xs, gs, eta, m, a, state: TTTState, completes: bool, kind: str):
    """Titans-form step; returns (z [B, H, 1, D], params, momentum, current)."""
    P = state.params
    S = state.momentum if state.momentum is not None else zeros_like_dict(P)
    Wc = state.current if state.current is not None else P
    newS, newW = {}, {}
    for (W, b), x, g in zip(LAYERS[kind], xs, gs):
        eg = eta * g  # (B, H, 1, Dout)
        newS[W] = m * S[W] - _outer(x, eg)
        newS[b] = m * S[b] - eg
        newW[W] = (1.0 - a) * Wc[W] + newS[W]
        newW[b] = (1.0 - a) * Wc[b] + newS[b]
    h = q
    for li, (W, b) in enumerate(LAYERS[kind]):
        z = _apply(h, newW[W], newW[b])
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
    dt = compute_dtype(q.dtype)
    qf, kf = q.to(dt), k.to(dt)
    ln_w, ln_b = ln_weight.to(dt), ln_bias.to(dt)
    w = head_view(ln_w, 4)
    wbt = w * (head_view(ln_b, 4) - (v.to(dt) - kf))  # (B, H, 1, D): w * (b - target)
    etaf = eta.to(dt).unsqueeze(-1)  # (B, H, 1, 1)
    xs, gs = _key_side(state.params, kf, wbt, w * w, eps, kind)
    o = state.offset
    end = o + 1 if mini_batch_size is None else (o + 1) % mini_batch_size
    completes = mini_batch_size is not None and end == 0
    if momentum is not None or decay is not None:
        m = etaf.new_zeros(()) if momentum is None else momentum.to(dt).unsqueeze(-1)
        a = etaf.new_zeros(()) if decay is None else decay.to(dt).unsqueeze(-1)
        z, params, S, current = _titans(qf, xs, gs, etaf, m, a, state, completes, kind)
        new = TTTState(params, end, mini_batch_size, None, S, current)
    else:
        if isinstance(token_scale, Tensor):
            s = position_scales(token_scale, o, 1, q.device, dt)  # (1,) scale of position o
        else:
            s = 1.0 / (o + 1) if token_scale == "mean" else 1.0
        z, params, G = _plain(qf, xs, gs, etaf, state, s, completes, kind)
        new = TTTState(params, end, mini_batch_size, G, None, None)
    out = (qf + layer_norm_heads(z, ln_w, ln_b, eps)).to(q.dtype)
    return out, new
