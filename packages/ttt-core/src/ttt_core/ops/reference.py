"""The reference: the ``generic`` backend, torch.func gradients of the token loss for any fast model.

For a user-defined fast model ``f(params, x)`` (one head, ``x [N, D] -> [N, D]``) it takes, per
token, ``grad l_j(P)`` with ``l_j(W) = 0.5 * ||LN_h(f_W(k_j)) - (v_j - k_j)||^2`` by
``torch.func.grad`` (vmapped over tokens, heads and batch), forms every query's weights explicitly

    plain:  W_i = P - s_i * (G + sum_{j<=i} eta_j grad l_j(P))     (causal; non-causal: all j, s = 1)
    Titans: S_j = m_j S_{j-1} - eta_j grad l_j(P); W_j = (1 - a_j) W_{j-1} + S_j   (token by token)

and evaluates ``o_i = q_i + LN_h(f_{W_i}(q_i))``. Slow and memory hungry (one weight copy per token),
obviously right: the closed forms are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, vmap

from ..state import TensorDict, TTTState, zeros_like_dict
from .common import compute_dtype, layer_norm_heads, output, plan_segments, reconstruction

FastModel = Callable[[TensorDict, Tensor], Tensor]


def ttt_generic(
    fast_model: FastModel,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    state: TTTState,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    mini_batch_size: int | None,
    causal: bool,
    token_scale: str | Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    eps: float,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, TTTState]:
    """Reference TTT over [B, H, L, D] for any fast model; same contract as the torch backend."""
    B, H, L, D = q.shape
    dt = compute_dtype(q.dtype)
    qf, kf = q.to(dt).flatten(0, 1), k.to(dt).flatten(0, 1)  # (BH, L, D)
    tgt = reconstruction(kf, v.to(dt).flatten(0, 1), reconstruction_target)  # (BH, L, D)
    etaf = eta.to(dt).flatten(0, 1)  # (BH, L)
    lw = ln_weight.to(dt).expand(B, H, D).flatten(0, 1)  # (BH, D)
    lb = ln_bias.to(dt).expand(B, H, D).flatten(0, 1)
    titans = momentum is not None or decay is not None
    if titans:
        mom = torch.zeros_like(etaf) if momentum is None else momentum.to(dt).flatten(0, 1)
        dec = torch.zeros_like(etaf) if decay is None else decay.to(dt).flatten(0, 1)

    def loss(params: TensorDict, x: Tensor, t: Tensor, w: Tensor, b: Tensor) -> Tensor:
        z = fast_model(params, x.unsqueeze(0)).squeeze(0)  # (D,)
        return 0.5 * (F.layer_norm(z, (D,), w, b, eps) - t).pow(2).sum()  # l_j

    # per-token gradients at shared weights: vmap over tokens inside, over (batch x head) outside
    token_grads = vmap(vmap(grad(loss), in_dims=(None, 0, 0, None, None)))
    apply = vmap(vmap(lambda p, x: fast_model(p, x.unsqueeze(0)).squeeze(0)))

    P = _flatten(state.params)
    G = _flatten(state.grad_sum)
    S = W = None
    if titans:
        S = _flatten(state.momentum) if state.momentum is not None else zeros_like_dict(P)
        W = _flatten(state.current) if state.current is not None else dict(P)

    outs: list[Tensor] = []
    for seg in plan_segments(L, mini_batch_size, state.offset):
        sl = slice(seg.start, seg.start + seg.length)
        g = token_grads(P, kf[:, sl], tgt[:, sl], lw, lb)  # name -> (BH, n, *shape)
        e = etaf[:, sl]
        if titans:
            per_query = {n: [] for n in P}
            for j in range(seg.length):
                for n in P:
                    ej = e[:, j].reshape(-1, *[1] * (P[n].ndim - 1))
                    mj = mom[:, sl][:, j].reshape_as(ej)
                    aj = dec[:, sl][:, j].reshape_as(ej)
                    S[n] = mj * S[n] - ej * g[n][:, j]
                    W[n] = (1 - aj) * W[n] + S[n]
                    per_query[n].append(W[n])
            Wq = {n: torch.stack(ws, dim=1) for n, ws in per_query.items()}
            if seg.completes:
                P = dict(W)
        else:
            steps = {n: _bcast(e, t) * t for n, t in g.items()}  # eta_j grad_j
            if causal:
                cum = {n: t.cumsum(dim=1) for n, t in steps.items()}
                if G is not None:
                    cum = {n: t + G[n].unsqueeze(1) for n, t in cum.items()}
                s = TTTState.token_scales(token_scale, seg.offset, seg.length,
                                          device=q.device, dtype=dt)  # fmt: skip
            else:
                cum = {n: t.sum(dim=1, keepdim=True).expand_as(t) for n, t in steps.items()}
                s = torch.ones(seg.length, device=q.device, dtype=dt)
            Wq = {n: P[n].unsqueeze(1) - _bcast(s.expand(e.shape), t) * t for n, t in cum.items()}
            last = {n: t[:, -1] for n, t in cum.items()}
            if seg.completes or not causal:
                P = {n: P[n] - s[-1] * last[n] for n in P}
                G = None
            else:
                G = last
        outs.append(apply(Wq, qf[:, sl]))  # (BH, n, D)

    z = torch.cat(outs, dim=1).unflatten(0, (B, H))  # (B, H, L, D)
    o = output(
        q.to(dt), layer_norm_heads(z, ln_weight.to(dt), ln_bias.to(dt), eps), output_residual
    )
    new_state = state.advance(L, params=_unflatten(P, B), grad_sum=_unflatten(G, B),
                              momentum=_unflatten(S, B), current=_unflatten(W, B))  # fmt: skip
    return o.to(q.dtype), new_state


def _flatten(d: TensorDict | None) -> TensorDict | None:
    """{name: [B, H, ...]} -> {name: [B*H, ...]}; None stays None."""
    return None if d is None else {n: t.flatten(0, 1) for n, t in d.items()}


def _unflatten(d: TensorDict | None, B: int) -> TensorDict | None:
    """Inverse of :func:`_flatten` for batch size B."""
    return None if d is None else {n: t.unflatten(0, (B, -1)) for n, t in d.items()}


def _bcast(x: Tensor, like: Tensor) -> Tensor:
    """[BH, n] -> broadcastable against [BH, n, *shape]."""
    return x.reshape(*x.shape, *([1] * (like.ndim - x.ndim)))
