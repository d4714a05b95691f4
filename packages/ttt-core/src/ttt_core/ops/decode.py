"""Single-token decode step of the ``torch`` backend: one causal token, no segment machinery.

Streaming generation feeds one token per call. The scan in :mod:`ttt_core.ops.scan` handles any
length with grouped segments and coefficient matrices; for one token that bookkeeping costs more
than the math. This module computes the same step directly (same semantics, see DESIGN.md).

For one token at in-mini-batch position ``o`` (``offset``) with start weights P, per fast layer
with input x (key side) and output gradient g taken at P:

    plain:  G' = G + eta x^T g            (gradient sum of the mini-batch so far; G = 0 at o = 0)
            the query reads W = P - s_o G', which is also the next start P when o = b - 1
    Titans: S' = m S - eta x^T g,  W' = (1 - a) W + S'   (gradient at P, the mini-batch start)
            query sees W'; at the mini-batch end P <- W'

A step is a few dozen tiny ops and, in a real model, every one of them runs cache-cold (the host
layer's weight matrices stream through the caches between two tokens), so it is bound by the number
of ops, not their size. It takes the fewest: every tensor is flattened over (batch, head) to
[N = B*H, ...] once, so ``x W + b`` is one ``baddbmm`` (a 4-d ``matmul`` costs twice as much), the
outer product x^T (eta g) is a broadcast ``addcmul`` into G, and g comes from aten's LayerNorm
kernels (:func:`~ttt_core.ops.common.ln_loss_grad_fused`).
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
    ln_loss_grad_fused,
    position_scales,
    unflatten_heads,
)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _query(q: Tensor, W: TensorDict, kind: str) -> Tensor:
    """f_W(q): q [N, 1, D] -> [N, 1, D]."""
    h = q
    for li, (w, b) in enumerate(LAYERS[kind]):
        h = affine(h, W[w], W[b])  # (N, 1, Dout)
        if li + 1 < len(LAYERS[kind]):
            h = gelu_tanh(h)
    return h


def _plain(q, xs, gs, eta, P, G, s: float | Tensor, completes: bool, kind: str):
    """Plain-form step on flat tensors; returns (z [N, 1, D], params, grad_sum or None)."""
    new_G: TensorDict = {}
    for (W, b), x, g in zip(LAYERS[kind], xs, gs):
        eg = eta * g  # (N, 1, Dout): eta_j g_j
        xt = x.transpose(-1, -2)  # (N, Din, 1)
        new_G[W] = xt * eg if G is None else torch.addcmul(G[W], xt, eg)  # (N, Din, Dout)
        new_G[b] = eg if G is None else G[b] + eg
    if isinstance(s, float):
        Wq = {n: torch.sub(p, new_G[n], alpha=s) for n, p in P.items()}  # P - s G'
    else:
        Wq = {n: torch.addcmul(p, s, new_G[n], value=-1.0) for n, p in P.items()}
    z = _query(q, Wq, kind)
    return (z, Wq, None) if completes else (z, P, new_G)


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
    z = _query(q, newW, kind)
    return z, (newW if completes else P), newS, (None if completes else newW)


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
    caller); :func:`decode_flat` on the inputs flattened over (batch, head)."""
    B, H, _, D = q.shape
    N, dt, in_dtype = B * H, compute_dtype(q.dtype), q.dtype

    def flat(t: Tensor | None) -> Tensor | None:  # [B, H, 1, d] -> [N, 1, d] in the math dtype
        return None if t is None else _cast(t, dt).reshape(N, 1, -1)

    o, new = decode_flat(flat(q), flat(k), flat(v), flat(eta), state, ln_weight, ln_bias, batch=B,
                         kind=kind, mini_batch_size=mini_batch_size, token_scale=token_scale,
                         momentum=flat(momentum), decay=flat(decay), eps=eps)  # fmt: skip
    return _cast(o.view(B, H, 1, D), in_dtype), new


def decode_flat(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, state: TTTState, ln_weight: Tensor,
                ln_bias: Tensor, *, batch: int, kind: str, mini_batch_size: int | None,
                token_scale: str | Tensor, momentum: Tensor | None, decay: Tensor | None,
                eps: float) -> tuple[Tensor, TTTState]:  # fmt: skip
    """:func:`decode_step` on flat inputs: q, k, v [N, 1, D] and eta (momentum, decay) [N, 1, 1],
    N = batch * H ordered (sample, head), all in the math dtype (fp32 or fp64, the state's) ->
    (o [N, 1, D], next state). ``TTTLayer`` builds its streaming token's inputs in this layout."""
    D, dt = q.shape[-1], q.dtype
    ln_w, ln_b = _cast(ln_weight, dt), _cast(ln_bias, dt)  # (H, D)
    if batch > 1:
        ln_w, ln_b = ln_w.repeat(batch, 1), ln_b.repeat(batch, 1)  # (N, D)
    ln_w, ln_b = ln_w.unsqueeze(1), ln_b.unsqueeze(1)  # (N, 1, D)
    wbt = ln_w * (ln_b + k - v)  # w * (b - target), target v - k
    P = flatten_heads(state.params)
    xs, gs = key_grads(P, k, wbt, ln_w * ln_w, eps, kind, loss_grad=ln_loss_grad_fused)
    o = state.offset
    end = o + 1 if mini_batch_size is None else (o + 1) % mini_batch_size
    completes = end == 0  # never for a whole-sequence mini-batch (o + 1 > 0)
    if momentum is not None or decay is not None:
        zero = eta.new_zeros(())
        m = zero if momentum is None else momentum
        a = zero if decay is None else decay
        z, params, S, current = _titans(q, xs, gs, eta, m, a, P, flatten_heads(state.momentum),
                                        flatten_heads(state.current), completes, kind)  # fmt: skip
        new = TTTState(unflatten_heads(params, batch), end, mini_batch_size, None,
                       unflatten_heads(S, batch), unflatten_heads(current, batch))  # fmt: skip
    else:
        if isinstance(token_scale, Tensor):
            s = position_scales(token_scale, o, 1, q.device, dt)  # (1,) scale of position o
        else:
            s = 1.0 / (o + 1) if token_scale == "mean" else 1.0
        z, params, G = _plain(q, xs, gs, eta, P, flatten_heads(state.grad_sum), s, completes, kind)
        new = TTTState(unflatten_heads(params, batch), end, mini_batch_size,
                       unflatten_heads(G, batch))  # fmt: skip
    return q + torch.addcmul(ln_b, F.layer_norm(z, (D,), eps=eps), ln_w), new  # (N, 1, D)
