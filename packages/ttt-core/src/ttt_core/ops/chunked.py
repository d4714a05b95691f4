"""The ``torch`` backend's sequence path: the chunked dual form, a scan over mini-batches with the
closed form per mini-batch segment (TTT-Linear, TTT-MLP, plain and Titans forms).

Within a mini-batch every gradient is taken at the start weights P. For a fast layer with inputs
X (keys) / Xq (queries) and output gradients g_j (at P), query i sees

    plain:   W_i = P - s_i * (G + sum_{j<=i} eta_j X_j^T g_j)        (G: what a cut already read)
    Titans:  W_i = D_i W_0 + c0_i S_0 - sum_{t<=i} C_it eta_t X_t^T g_t

so ``Xq_i W_i`` is, in the *dual* form, a masked attention over the mini-batch:
``Xq_i P - s_i (Xq_i G) - sum_j coef_ij eta_j (Xq_i . X_j + 1) g_j`` (the +1 is the bias), and in the
*primal* form the explicit per-token weights applied to Xq_i. Both are exact; dual is the default,
primal is cheaper for a single token. The Titans coefficients come from the per-token momentum m and
decay a: ``M_jt = prod_{t<r<=j} m_r``, ``A_ij = prod_{j<r<=i} (1 - a_r)``, ``C = A M``,
``c0 = A mcum``, ``D_i = prod_{r<=i} (1 - a_r)`` (see DESIGN.md for the recurrence).

Work is vectorised over batch, heads and, for the coefficients, over all mini-batches at once; only
the weight-dependent part runs in the Python loop over mini-batches.

The Titans form in the dual form (``form="auto"``/``"dual"``) runs in :mod:`.titans_scan`, one
autograd Function with a hand-written backward (same closed form); the loop below serves the plain
form and ``form="primal"`` (plain autograd, also the reference the Function is tested against).
Single streaming tokens go to :mod:`.recurrent`; the reference both are tested against is
:mod:`.reference` (the generic torch.func path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..state import TTTState, zeros_like_dict
from .common import (
    LAYERS,
    Segment,
    affine,
    compute_dtype,
    gelu_tanh,
    group_segments,
    head_view,
    key_grads,
    layer_norm_heads,
    output,
    plan_segments,
    reconstruction,
    segment_products,
    stack_group,
)
from .titans_scan import titans_scan


# ----------------------------------------------------------------------------------------------
# coefficients of one group of equally shaped segments (N segments of n tokens), no weights needed
# ----------------------------------------------------------------------------------------------
@dataclass
class _Coefs:
    """Per-group coefficients, leading dim N (one entry per segment)."""

    coef: (
        Tensor  # [N, B, H, n, n] or [n, n]: weight of token j's step in query i's weights (no eta)
    )
    eta: Tensor  # [N, B, H, n]
    # plain form
    s: Tensor | None = None  # [n] scales of the group's positions
    s_last: Tensor | None = None  # [] scale applied at the mini-batch end
    # Titans form
    D: Tensor | None = None  # [N, B, H, n]   weight of W_0 in W_i
    c0: Tensor | None = None  # [N, B, H, n]   weight of S_0 in W_i
    m_last: Tensor | None = None  # [N, B, H]     weight of S_0 in S_last
    M_last: Tensor | None = None  # [N, B, H, n]  weight of step t in S_last
    coef_eta: Tensor | None = None  # [N, B, H, n, n]  coef_ij * eta_j (the dual form's mask)

    def __post_init__(self) -> None:
        if self.coef_eta is None:
            self.coef_eta = self.coef * self.eta.unsqueeze(-2)

    def unbind(self) -> list[_Coefs]:
        """The coefficients of every segment of the group (shared plain-form ones pass through).

        One ``unbind`` per field, not N selects: the backward of N selects would allocate and
        fill N zero tensors of the whole group's size (quadratic in the number of segments)."""
        per_segment = ("eta", "D", "c0", "m_last", "M_last", "coef_eta") + (
            ("coef",) if self.D is not None else ()
        )
        N = self.eta.shape[0]
        parts = {
            f: (
                getattr(self, f).unbind(0)
                if f in per_segment and getattr(self, f) is not None
                else [getattr(self, f)] * N
            )
            for f in self.__dataclass_fields__
        }
        return [_Coefs(**{f: parts[f][i] for f in parts}) for i in range(N)]


def _coefs(seg: Segment, eta, momentum, decay, causal, token_scale) -> _Coefs:
    """eta, momentum, decay: [N, B, H, n] (momentum/decay None outside the Titans form)."""
    n, dev, dt = seg.length, eta.device, eta.dtype
    if momentum is not None:
        M, mcum = segment_products(momentum)
        A, D = segment_products(1.0 - decay)
        return _Coefs(
            coef=A @ M, eta=eta, D=D, c0=(A @ mcum.unsqueeze(-1)).squeeze(-1),
            m_last=mcum[..., -1], M_last=M[..., -1, :],
        )  # fmt: skip
    if not causal:
        one = torch.ones((), device=dev, dtype=dt)
        return _Coefs(
            coef=torch.ones(n, n, device=dev, dtype=dt), eta=eta, s=one.expand(n), s_last=one
        )
    s = TTTState.token_scales(token_scale, seg.offset, n, device=dev, dtype=dt)
    coef = s[:, None] * torch.ones(n, n, device=dev, dtype=dt).tril()
    return _Coefs(coef=coef, eta=eta, s=s, s_last=s[-1])


# ----------------------------------------------------------------------------------------------
# one segment: gradients at P, queries, state update
# ----------------------------------------------------------------------------------------------
def _bcast(x: Tensor, ndim: int) -> Tensor:
    """[B, H] or [B, H, n] scalars viewed against [B, H, ..., n?, ...] of rank ndim (append dims)."""
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def _query_layer(xq, xk, g, wname, bname, carry, c: _Coefs, primal: bool, attn=None):
    """Pre-activation output of one fast layer for the queries: xq [B, H, n, Din] -> [B, H, n, Dout]."""
    W, b = wname, bname
    if c.D is not None:  # Titans: D_i (xq W_0 + b_0) + c0_i (xq S_0 + Sb_0) - steps
        Wc, S = carry["W"], carry["S"]
        base = _bcast(c.D, 4) * (xq @ Wc[W] + Wc[b]) + _bcast(c.c0, 4) * (xq @ S[W] + S[b])
    else:  # plain: xq P + b - s_i (xq G + Gb) - steps
        P, G = carry["P"], carry["G"]
        base = affine(xq, P[W], P[b])
        if G is not None:
            base = base - _bcast(c.s, 2) * (xq @ G[W] + G[b])
    if primal:  # explicit per-query weights: sum_j coef_ij eta_j X_j^T g_j
        eg = c.eta.unsqueeze(-1) * g  # (B, H, n, Dout)
        dW = torch.einsum("...ij,...jd,...je->...ide", c.coef, xk, eg)  # (B, H, n, Din, Dout)
        db = c.coef @ eg  # (B, H, n, Dout)
        return base - (xq.unsqueeze(-2) @ dW).squeeze(-2) - db
    if attn is None:
        attn = _attention(xq, xk, c)
    return base - attn @ g


def _attention(xq: Tensor, xk: Tensor, c: _Coefs) -> Tensor:
    """Dual-form mixing matrix ``coef_ij * eta_j * (xq_i . xk_j + 1)``: [..., n, n]."""
    return (xq @ xk.transpose(-1, -2) + 1.0) * c.coef_eta


def _sub_xtw(W: Tensor, x: Tensor, wg: Tensor) -> Tensor:
    """``W - x^T wg`` for [B, H, ...] stacks as one batched GEMM (one allocation, not two)."""
    flat = torch.baddbmm(
        W.flatten(0, 1), x.transpose(-1, -2).flatten(0, 1), wg.flatten(0, 1), alpha=-1.0
    )
    return flat.view(W.shape)


def _update(carry, xs, gs, layers, c: _Coefs, seg: Segment, causal: bool) -> None:
    """Advance the carry past the segment (in place on the dict): sum_j w_j X_j^T g_j style steps."""

    def step(weights: Tensor):  # -> {name: -sum_j w_j X_j^T g_j}
        out = {}
        for (W, b), x, g in zip(layers, xs, gs):
            wg = weights.unsqueeze(-1) * g  # (B, H, n, Dout)
            out[W] = x.transpose(-1, -2) @ wg
            out[b] = wg.sum(dim=-2, keepdim=True)
        return out

    if c.D is not None:  # Titans
        Wc, S = carry["W"], carry["S"]
        dS = step(c.M_last * c.eta)
        dW = step(c.coef[..., -1, :] * c.eta)
        m, D, c0 = _bcast(c.m_last, 4), _bcast(c.D[..., -1], 4), _bcast(c.c0[..., -1], 4)
        carry["S"] = {n: m * S[n] - dS[n] for n in S}
        carry["W"] = {n: D * Wc[n] + c0 * S[n] - dW[n] for n in Wc}
        if seg.completes:
            carry["P"] = carry["W"]
        return
    P, G = carry["P"], carry["G"]
    if G is None and (seg.completes or not causal):  # the common case: P - X^T (s eta g) fused
        weights = (c.s_last * c.eta).unsqueeze(-1)
        new = {}
        for (W, b), x, g in zip(layers, xs, gs):
            wg = weights * g  # (B, H, n, Dout)
            new[W] = _sub_xtw(P[W], x, wg)
            new[b] = P[b] - wg.sum(dim=-2, keepdim=True)
        carry["P"] = new
        return
    d = step(c.eta)
    G = d if G is None else {n: G[n] + d[n] for n in G}
    if seg.completes or not causal:
        carry["P"] = {n: P[n] - c.s_last * G[n] for n in P}
        carry["G"] = None
    else:
        carry["G"] = G


# ----------------------------------------------------------------------------------------------
# the scan
# ----------------------------------------------------------------------------------------------
def _scan_segments(qf, kf, target, ln_w, ln_b, etaf, momentum, decay, carry, segs, *, kind, causal,
                   token_scale, eps, form) -> Tensor:  # fmt: skip
    """The loop over mini-batch segments (plain form, or the Titans form with autograd); advances
    ``carry`` in place and returns z [B, H, L, D] (the fast model's output before LN)."""
    layers = LAYERS[kind]
    outs: list[Tensor] = []
    for group in group_segments(segs):
        seg = group[0]
        qs, ks, ts, es = (stack_group(x, group) for x in (qf, kf, target, etaf))
        c = _coefs(
            seg, es, stack_group(momentum, group), stack_group(decay, group), causal, token_scale
        )
        primal = form == "primal" or (form == "auto" and seg.length == 1)
        attn = None if primal else _attention(qs, ks, c)  # layer-1 mixing for every segment at once
        attns = [None] * len(group) if attn is None else attn.unbind(0)
        per_seg = zip(group, c.unbind(), qs.unbind(0), ks.unbind(0), ts.unbind(0), attns)
        for segi, ci, qi, ki, ti, attni in per_seg:
            xs, gs = key_grads(carry["P"], ki, ti, ln_w, ln_b, eps, kind)
            h = qi
            for li, (W, b) in enumerate(layers):
                a = attni if li == 0 else None
                z = _query_layer(h, xs[li], gs[li], W, b, carry, ci, primal, a)
                h = gelu_tanh(z) if li + 1 < len(layers) else z
            outs.append(h)
            _update(carry, xs, gs, layers, ci, segi, causal)
    return torch.cat(outs, dim=2) if outs else qf.new_zeros(qf.shape)  # (B, H, L, D)


def ttt_chunked(
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
    causal: bool,
    token_scale: str | Tensor,
    momentum: Tensor | None,
    decay: Tensor | None,
    eps: float,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
    form: str = "auto",
) -> tuple[Tensor, TTTState]:
    """Run TTT over a [B, H, L, D] sequence from ``state``; returns o [B, H, L, D] (q's dtype) and the
    state after the last token. Inputs are validated by the caller (``ttt_core.functional``)."""
    layers = LAYERS[kind]
    titans = momentum is not None or decay is not None
    dt = compute_dtype(q.dtype)
    qf, kf, etaf = q.to(dt), k.to(dt), eta.to(dt)
    ln_w, ln_b = ln_weight.to(dt), ln_bias.to(dt)
    target = reconstruction(kf, v.to(dt), reconstruction_target)  # (B, H, L, D)
    if titans:
        momentum = torch.zeros_like(etaf) if momentum is None else momentum.to(dt)
        decay = torch.zeros_like(etaf) if decay is None else decay.to(dt)
        S0 = state.momentum
        if S0 is None:
            S0 = zeros_like_dict(state.params)
        carry = {"P": state.params, "G": None, "S": S0, "W": state.current or state.params}
    else:
        carry = {"P": state.params, "G": state.grad_sum, "S": None, "W": None}

    L = q.shape[2]
    segs = plan_segments(L, mini_batch_size, state.offset)
    if titans and form != "primal":  # one autograd Function, hand-written backward
        w = head_view(ln_w, 4)
        wbt, w2 = w * (head_view(ln_b, 4) - target), w * w  # its loss-gradient constants
        z, P, W, S = titans_scan(
            qf, kf, wbt, w2, etaf, momentum, decay, carry["P"], carry["W"], carry["S"], layers,
            segs, eps,
        )  # fmt: skip
        carry = {"P": P, "G": None, "S": S, "W": W}
    else:
        z = _scan_segments(qf, kf, target, ln_w, ln_b, etaf, momentum, decay, carry, segs,
                           kind=kind, causal=causal, token_scale=token_scale, eps=eps,
                           form=form)  # fmt: skip
    o = output(qf, layer_norm_heads(z, ln_w, ln_b, eps), output_residual).to(q.dtype)
    new_state = state.advance(L, params=carry["P"], grad_sum=carry["G"], momentum=carry["S"],
                              current=carry["W"] if titans else None)  # fmt: skip
    return o, new_state
