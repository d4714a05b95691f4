"""The ``torch`` backend's Titans form (momentum + decay) in the dual form: one autograd Function
with a hand-written backward.

Semantics (DESIGN.md): per token j, ``S_j = m_j S_{j-1} - eta_j G_j`` and ``W_j = (1 - a_j) W_{j-1}
+ S_j``, where every gradient ``G_j = grad l_j(P)`` of a mini-batch is taken at its start weights P.

Notation. Each fast layer's weight and bias are one matrix, ``W = [W; b]`` [Din+1, Dout], and its
inputs get a last column of ones, ``x = [x, 1]``, so ``x W`` is ``x W + b``. One block is a run of n
tokens inside a mini-batch, starting from the carried (W_0, S_0). Per fast layer l, the keys' inputs
X [n, Din+1] and output gradients g [n, Dout] at P give ``G_t = X_t^T g_t``. The coefficients
(``segment_products``: ``M_jt = prod_{t<r<=j} m_r``, ``mcum_j = prod_{r<=j} m_r``, ``A_ij =
prod_{j<r<=i} (1 - a_r)``, ``D_i = prod_{r<=i} (1 - a_r)``)

    C = A M,   c0 = A mcum,   CE_it = C_it eta_t,   wW_t = CE_{n-1,t},   wS_t = M_{n-1,t} eta_t

unroll the recurrence to ``W_i = D_i W_0 + c0_i S_0 - sum_{t<=i} CE_it X_t^T g_t``, so query i with
input h_i [Din+1] reads (the dual form: ``h_i W_i`` without forming W_i)

    K = h X^T                  (n, n)     h_i . x_t + 1, the ones column is the bias
    y = D (h W_0) + c0 (h S_0) - (K * CE) g                                (n, Dout)

and the next layer's input is ``h' = [gelu(y), 1]``; the last layer's y is the output z. The
carry after the block is its last token's

    W' = D_{n-1} W_0 + c0_{n-1} S_0 - X^T (wW g),      S' = mcum_{n-1} S_0 - X^T (wS g).

The key pass (once per mini-batch segment, at P): ``z_l = X_l P_l``, ``X_{l+1} = [gelu(z_l), 1]``,
``g_last = ln_loss_grad(z_last)`` and ``g_l = (g_{l+1} W_{l+1}^T) * gelu'(z_l)`` (W_{l+1}: P_{l+1}
without its bias row). When a segment completes its mini-batch, P becomes the carried W.

Blocks: a mini-batch longer than ``BLOCK`` tokens is read in blocks of ``BLOCK`` queries that carry
(W, S) from one to the next while every gradient stays at P, exactly as a streaming cut inside a
mini-batch does; the key pass still runs once per segment. This keeps the n x n matrices small.

The backward is the chain rule of these formulas, written out (and derived in comments) in
:func:`_block_backward`, :func:`_key_backward`, :func:`_ln_loss_grad_vjp`, :func:`_coefs_vjp` and
:func:`_segment_products_vjp`; it runs the blocks and segments in reverse, carrying the gradients of
(W, S) and of P. Why a Function: autograd through the segment loop (``form="primal"``, the
reference this is tested against in fp64, with the naive per-token loop) records ~100 small ops per
segment and was much slower. First order only: a backward with ``create_graph=True`` raises (use
``form="primal"`` or the ``generic`` backend for double backward). Speed beyond this readable
PyTorch belongs in ttt-cuda's fused C++ path.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (
    Segment,
    gelu_tanh,
    gelu_tanh_vjp,
    head_view,
    ln_loss_grad,
    segment_products,
    stack_group,
)

BLOCK = 32  # queries per dual-form block inside a longer mini-batch

_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi), gelu_tanh's constant C
_GELU_K = 0.044715


# ----------------------------------------------------------------------------------------------
# small closed forms and their derivatives
# ----------------------------------------------------------------------------------------------
def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _ones_col(x: Tensor) -> Tensor:
    """[..., n, d] -> [..., n, d + 1] with a last column of ones (the bias input)."""
    return F.pad(x, (0, 1), value=1.0)


def _sum(terms: list[Tensor]) -> Tensor:
    """The sum of a non-empty list of tensors."""
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _weights(Pl: Tensor) -> Tensor:
    """[W; b] [..., Din+1, Dout] -> W [..., Din, Dout] (without the bias row)."""
    return Pl[..., :-1, :]


def _gelu_tanh_grads(x: Tensor) -> tuple[Tensor, Tensor]:
    """gelu_tanh'(x) and gelu_tanh''(x) from one tanh. With gelu(x) = 0.5 x (1 + t), t = tanh u,
    u = C (x + K x^3), u' = C (1 + 3 K x^2) and s = 1 - t^2 (tanh' at u):
    ``gelu' = 0.5 (1 + t) + 0.5 x s u'``, and differentiating once more (``s' = -2 t s u'``,
    ``u'' = 6 C K x``): ``gelu'' = s (u' - x t u'^2 + 3 C K x^2)``."""
    c, k = _SQRT_2_OVER_PI, _GELU_K
    x2 = x * x
    t = torch.tanh(c * x * (1.0 + k * x2))
    s = 1.0 - t * t
    du = c * (1.0 + 3.0 * k * x2)
    first = 0.5 * (1.0 + t) + 0.5 * x * s * du
    second = s * (du - x * t * du * du + 3.0 * c * k * x2)
    return first, second


def _ln_loss_grad_vjp(a: Tensor, z: Tensor, g: Tensor, target: Tensor, weight: Tensor,
                      bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward of ``g = common.ln_loss_grad(z, target, weight, bias, eps)`` for ``a = dL/dg``.

    z, g, target, a: [B, H, n, D]; weight, bias: [H, D]. Returns dL/dz, dL/dtarget [B, H, n, D]
    and dL/dweight, dL/dbias [H, D].

    Forward: ``x = (z - mean z) r``, ``r = (var z + eps)^(-1/2)``, ``e = w x + b - target``,
    ``dx = w e``, ``g = r proj(dx)`` with ``proj(v) = v - mean(v) - x mean(x v)`` (means over D).
    ``r proj(v)`` is also LayerNorm's backward (no affine) for an output gradient v: ``ln_bwd(v)``
    below. proj is self-adjoint in v.
    """
    D = z.shape[-1]
    w, b = head_view(weight, z.ndim), head_view(bias, z.ndim)
    x, mu, r = torch.native_layer_norm(z, (D,), None, None, eps)  # x; mean and r (B, H, n, 1)

    def ln_bwd(v: Tensor) -> Tensor:  # r proj(v)
        mask = (True, False, False)
        return torch.ops.aten.native_layer_norm_backward(v, z, (D,), mu, r, None, None, mask)[0]

    e = w * x + b - target  # LN_h(z) - target
    dx = w * e
    # dL/d(dx) = r proj(a): proj is self-adjoint
    d_dx = ln_bwd(a)
    # dL/dx: through dx = w^2 x + ..., and through x inside proj(dx) = dx - mean(dx) - x s with
    # s = mean(x dx): directly -r s a, via s -r mean(a x) dx
    s = (x * dx).mean(dim=-1, keepdim=True)
    d_x = w * w * d_dx - r * (s * a + (a * x).mean(dim=-1, keepdim=True) * dx)
    # dL/dz: LayerNorm's backward for x, plus g's factor r (dr/dz = -r^2 x / D; dL/dr = sum(a g) / r)
    d_z = ln_bwd(d_x) - r * x * (a * g).mean(dim=-1, keepdim=True)
    # dx = w (w x + b - target): d/dw = e + w x, d/db = w, d/dtarget = -w
    d_w = (d_dx * (e + w * x)).sum(dim=(0, 2))  # (H, D)
    d_b = (d_dx * w).sum(dim=(0, 2))
    return d_z, -w * d_dx, d_w, d_b


def _segment_products_vjp(mat: Tensor, cum: Tensor, Q: Tensor, Qc: Tensor) -> Tensor:
    """Backward of ``common.segment_products`` (mat [..., n, n], cum [..., n]) to its x [..., n],
    given ``Q = mat^T d_mat`` [..., n, n] and ``Qc = mat^T d_cum`` [..., n] (the caller may have a
    cheaper product for them than from d_mat).

    ``mat_jt = prod_{t<r<=j} x_r`` gives ``d mat_jt / d x_r = mat_{r-1,t} mat_jr`` (t < r <= j) and
    ``cum_j = prod_{r<=j} x_r`` gives ``d cum_j / d x_r = cum_{r-1} mat_jr`` (r <= j), so
    ``dx_r = sum_t mat_{r-1,t} Q_rt + cum_{r-1} Qc_r`` (no division by x: exact at x = 0); the
    zeros of mat above its diagonal restrict the sums to t < r <= j, and r = 0 has no mat term."""
    from_mat = F.pad((mat[..., :-1, :] * Q[..., 1:, :]).sum(dim=-1), (1, 0))  # (..., n)
    cum_prev = F.pad(cum[..., :-1], (1, 0), value=1.0)  # cum_{r-1}, 1 at r = 0
    return from_mat + cum_prev * Qc


# ----------------------------------------------------------------------------------------------
# coefficients of blocks (leading dims [..., B, H]; a group of N equally long blocks has N first)
# ----------------------------------------------------------------------------------------------
@dataclass
class _Coefs:
    """The dual form's coefficients of a block of n tokens (module docstring)."""

    M: Tensor  # (..., n, n)  M_jt = prod_{t<r<=j} m_r
    mcum: Tensor  # (..., n)  prod_{r<=j} m_r
    A: Tensor  # (..., n, n)  A_ij = prod_{j<r<=i} (1 - a_r)
    D: Tensor  # (..., n)  prod_{r<=i} (1 - a_r): weight of W_0 in W_i
    C: Tensor  # (..., n, n)  A M: weight of step t in W_i, without eta
    c0: Tensor  # (..., n)  A mcum: weight of S_0 in W_i
    eta: Tensor  # (..., n)
    CE: Tensor  # (..., n, n)  C_it eta_t
    wW: Tensor  # (..., n)  weight of step t in W' (CE's last row)
    wS: Tensor  # (..., n)  weight of step t in S' (M's last row times eta)

    def block(self, i: int) -> _Coefs:
        """Block i of a group."""
        return _Coefs(*(getattr(self, f.name)[i] for f in fields(self)))


def _coefs(eta: Tensor, mom: Tensor, dec: Tensor) -> _Coefs:
    """Coefficients from the per-token eta, momentum m and decay a: each [..., n]."""
    M, mcum = segment_products(mom)
    A, D = segment_products(1.0 - dec)
    C = A @ M
    c0 = (A @ mcum.unsqueeze(-1)).squeeze(-1)
    CE = C * eta.unsqueeze(-2)
    return _Coefs(M, mcum, A, D, C, c0, eta, CE, CE[..., -1, :], M[..., -1, :] * eta)


@dataclass
class _CoefGrads:
    """dL/d of a block's coefficients as its forward and backward use them."""

    CE: Tensor  # (..., n, n)
    D: Tensor  # (..., n)  of D_i in the read
    c0: Tensor  # (..., n)  of c0_i in the read
    wW: Tensor  # (..., n)
    wS: Tensor  # (..., n)
    D_last: Tensor  # (...)  of D_{n-1} in the carry
    c0_last: Tensor  # (...)
    mcum_last: Tensor  # (...)


def _add_last(x: Tensor, v: Tensor, dim: int = -1) -> Tensor:
    """x with v added to its last entry along ``dim`` (a new tensor)."""
    x = x.clone()
    x.select(dim, -1).add_(v)
    return x


def _coefs_vjp(co: _Coefs, d: _CoefGrads) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`_coefs`: dL/d eta, momentum, decay [..., n]."""
    # the carry's coefficients are last entries: wW = CE[-1, :], D_{n-1}, c0_{n-1}, mcum_{n-1}
    d_D = _add_last(d.D, d.D_last)
    d_c0 = _add_last(d.c0, d.c0_last)
    # CE_it = C_it eta_t (and wW its last row), wS_t = M_{n-1,t} eta_t
    d_eta = (d.CE * co.C).sum(dim=-2) + d.wW * co.C[..., -1, :] + d.wS * co.M[..., -1, :]
    d_C = d.CE * co.eta.unsqueeze(-2)  # (..., n, n), a fresh product
    d_C[..., -1, :] += d.wW * co.eta
    # C = A M, c0 = A mcum: d_M = A^T d_C, d_mcum = A^T d_c0 (plus S' = mcum_{n-1} S_0 - wS ...),
    # d_A = d_C M^T + d_c0 mcum^T
    At_dC = _t(co.A) @ d_C  # (..., n, n)
    At_dc0 = (_t(co.A) @ d_c0.unsqueeze(-1)).squeeze(-1)  # (..., n)
    d_M = _add_last(At_dC, d.wS * co.eta, dim=-2)
    d_mcum = _add_last(At_dc0, d.mcum_last)
    Mt = _t(co.M)
    d_mom = _segment_products_vjp(co.M, co.mcum, Mt @ d_M, (Mt @ d_mcum.unsqueeze(-1)).squeeze(-1))
    # the products' backward for A takes A^T d_A = (A^T d_C) M^T + (A^T d_c0) mcum^T: no d_A
    At_dA = At_dC @ Mt + At_dc0.unsqueeze(-1) * co.mcum.unsqueeze(-2)
    At_dD = (_t(co.A) @ d_D.unsqueeze(-1)).squeeze(-1)
    d_dec = -_segment_products_vjp(co.A, co.D, At_dA, At_dD)  # the products are of 1 - a
    return d_eta, d_mom, d_dec


# ----------------------------------------------------------------------------------------------
# the key pass of a segment (at P)
# ----------------------------------------------------------------------------------------------
def _key_forward(P: list[Tensor], ka: Tensor, target: Tensor, ln_w: Tensor, ln_b: Tensor,
                 eps: float) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:  # fmt: skip
    """Inputs X_l [B, H, n, Din+1] and output gradients g_l [B, H, n, Dout] of every fast layer at P
    for the keys ka [B, H, n, D+1] (with the ones column), and the pre-activations z_l."""
    X, z = [ka], []
    for li, Pl in enumerate(P):
        z.append(X[li] @ Pl)  # (B, H, n, Dout)
        if li + 1 < len(P):
            X.append(_ones_col(gelu_tanh(z[li])))  # (B, H, n, Dout+1)
    g = [ln_loss_grad(z[-1], target, ln_w, ln_b, eps)]  # (B, H, n, D)
    for li in reversed(range(len(P) - 1)):  # g_l = (g_{l+1} W_{l+1}^T) * gelu'(z_l)
        g.insert(0, gelu_tanh_vjp(g[0] @ _t(_weights(P[li + 1])), z[li]))
    return X, g, z


def _key_backward(P, X, g, z, dX, dg, target, ln_w, ln_b, eps):
    """Backward of :func:`_key_forward` for dX, dg (lists per layer, not modified). Returns dk
    [B, H, n, D], dtarget [B, H, n, D], d ln_w, d ln_b [H, D] and dP (per layer)."""
    nl = len(P)
    dg = list(dg)
    gelu1, dz_chain, dP_chain = {}, {}, {}  # per hidden layer l: gelu'(z_l), the terms through g_l
    # the gradient chain, g_l = gp_l * gelu'(z_l) with gp_l = g_{l+1} W_{l+1}^T, from the first layer up
    for li in range(nl - 1):
        gelu1[li], gelu2 = _gelu_tanh_grads(z[li])  # (B, H, n, Dout_l)
        gp = g[li + 1] @ _t(_weights(P[li + 1]))  # (B, H, n, Dout_l)
        d_gp = dg[li] * gelu1[li]
        dz_chain[li] = dg[li] * gp * gelu2  # through gelu'(z_l)
        dg[li + 1] = dg[li + 1] + d_gp @ _weights(P[li + 1])
        dP_chain[li + 1] = F.pad(_t(d_gp) @ g[li + 1], (0, 0, 0, 1))  # no bias row
    # g_last = ln_loss_grad(z_last, ...)
    dz, d_target, d_w, d_b = _ln_loss_grad_vjp(dg[-1], z[-1], g[-1], target, ln_w, ln_b, eps)
    # the forward chain, z_l = X_l P_l and X_{l+1} = [gelu(z_l), 1], from the last layer down
    dP = [None] * nl
    for li in reversed(range(nl)):  # dz: dL/dz_l
        dP[li] = _t(X[li]) @ dz
        if li in dP_chain:
            dP[li] = dP[li] + dP_chain[li]
        dXl = dX[li] + dz @ _t(P[li])  # (B, H, n, Din+1)
        if li > 0:
            dz = dz_chain[li - 1] + dXl[..., :-1] * gelu1[li - 1]
    return dXl[..., :-1], d_target, d_w, d_b, dP


# ----------------------------------------------------------------------------------------------
# one block of queries
# ----------------------------------------------------------------------------------------------
def _block_forward(qa, W, S, X, g, co: _Coefs):
    """Block of queries qa [B, H, n, D+1] from the carry W, S (per layer [B, H, Din+1, Dout]) with
    the keys' X, g of its tokens. Returns the output y [B, H, n, D], the carry after the block and
    what the backward reads (per layer: h, K, att, y)."""
    D, c0 = co.D.unsqueeze(-1), co.c0.unsqueeze(-1)  # (B, H, n, 1)
    h, cache = qa, []
    for li in range(len(W)):
        K = h @ _t(X[li])  # (B, H, n, n): h_i . x_t + 1
        att = K * co.CE
        y = D * (h @ W[li]) + c0 * (h @ S[li]) - att @ g[li]  # (B, H, n, Dout)
        cache.append((h, K, att, y))
        if li + 1 < len(W):
            h = _ones_col(gelu_tanh(y))  # (B, H, n, Dout+1): the next layer's input
    D_last, c0_last = co.D[..., -1, None, None], co.c0[..., -1, None, None]  # (B, H, 1, 1)
    m_last = co.mcum[..., -1, None, None]
    wW, wS = co.wW.unsqueeze(-1), co.wS.unsqueeze(-1)  # (B, H, n, 1)
    Wn = [D_last * Wl + c0_last * Sl - _t(x) @ (wW * gl) for Wl, Sl, x, gl in zip(W, S, X, g)]
    Sn = [m_last * Sl - _t(x) @ (wS * gl) for Sl, x, gl in zip(S, X, g)]
    return y, Wn, Sn, cache


def _block_backward(W, S, X, g, cache, co: _Coefs, dy, dWn, dSn):
    """Backward of :func:`_block_forward` for dy [B, H, n, D] and the carry's dWn, dSn. Returns
    dq [B, H, n, D], dX, dg, dW, dS (per layer) and the coefficients' gradients."""
    D, c0 = co.D.unsqueeze(-1), co.c0.unsqueeze(-1)  # (B, H, n, 1)
    D_last, c0_last = co.D[..., -1, None, None], co.c0[..., -1, None, None]  # (B, H, 1, 1)
    m_last = co.mcum[..., -1, None, None]
    wW, wS = co.wW.unsqueeze(-1), co.wS.unsqueeze(-1)  # (B, H, n, 1)
    nl = len(W)
    dX, dg, dW, dS = [None] * nl, [None] * nl, [None] * nl, [None] * nl
    d_wW, d_wS, d_D, d_c0, d_CE = [], [], [], [], []  # per-layer terms of the coefficients' grads
    # the carry, per layer: W' = D_last W + c0_last S - X^T (wW g), S' = m_last S - X^T (wS g)
    for li in range(nl):
        XdW, XdS = X[li] @ dWn[li], X[li] @ dSn[li]  # (B, H, n, Dout)
        dW[li] = D_last * dWn[li]
        dS[li] = c0_last * dWn[li] + m_last * dSn[li]
        dX[li] = -(wW * g[li]) @ _t(dWn[li]) - (wS * g[li]) @ _t(dSn[li])
        dg[li] = -wW * XdW - wS * XdS
        d_wW.append(-(g[li] * XdW).sum(dim=-1))
        d_wS.append(-(g[li] * XdS).sum(dim=-1))
    # the read, from the last layer down: y = D (h W) + c0 (h S) - att g, att = K * CE, K = h X^T
    for li in reversed(range(nl)):
        h, K, att, _ = cache[li]
        u, v = dy @ _t(W[li]), dy @ _t(S[li])  # (B, H, n, Din+1): dL/d(hW) W^T, dL/d(hS) S^T
        d_D.append((u * h).sum(dim=-1))
        d_c0.append((v * h).sum(dim=-1))
        dW[li] = dW[li] + _t(h) @ (D * dy)
        dS[li] = dS[li] + _t(h) @ (c0 * dy)
        d_att = -dy @ _t(g[li])  # (B, H, n, n)
        d_CE.append(d_att * K)
        dK = d_att * co.CE
        dX[li] = dX[li] + _t(dK) @ h
        dg[li] = dg[li] - _t(att) @ dy
        dh = D * u + c0 * v + dK @ X[li]  # (B, H, n, Din+1)
        if li > 0:  # h = [gelu(y_prev), 1]
            dy = gelu_tanh_vjp(dh[..., :-1], cache[li - 1][3])
    inner = lambda a, b: (a * b).sum(dim=(-1, -2))  # <a, b> per (B, H)
    dc = _CoefGrads(
        CE=_sum(d_CE), D=_sum(d_D), c0=_sum(d_c0), wW=_sum(d_wW), wS=_sum(d_wS),
        D_last=_sum([inner(dWn[li], W[li]) for li in range(nl)]),
        c0_last=_sum([inner(dWn[li], S[li]) for li in range(nl)]),
        mcum_last=_sum([inner(dSn[li], S[li]) for li in range(nl)]),
    )  # fmt: skip
    return dh[..., :-1], dX, dg, dW, dS, dc


# ----------------------------------------------------------------------------------------------
# the scan and its Function
# ----------------------------------------------------------------------------------------------
def _blocks(seg: Segment) -> list[Segment]:
    """A segment's blocks of at most ``BLOCK`` tokens (each a segment of its own)."""
    return [
        Segment(seg.start + r, min(BLOCK, seg.length - r), seg.offset + r,
                seg.completes and r + BLOCK >= seg.length)
        for r in range(0, seg.length, BLOCK)
    ]  # fmt: skip


def _groups(blocks: list[Segment]) -> list[list[Segment]]:
    """Consecutive blocks of equal length (their coefficients are computed together)."""
    groups: list[list[Segment]] = []
    for b in blocks:
        if groups and groups[-1][-1].length == b.length:
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


@dataclass
class _Saved:
    """What the forward keeps for the backward."""

    groups: list  # [(blocks, their _Coefs with N first)]
    segments: list  # per segment: (seg, P, X, g, z, [(block, W, S, cache)])


def _forward(q, k, target, ln_w, ln_b, eta, mom, dec, P, W, S, segs, eps, save=True):
    """All segments; W, S, P: lists over layers of [B, H, Din+1, Dout]. Returns z [B, H, L, D],
    the final P, W, S and the :class:`_Saved` record (empty without ``save``)."""
    qa, ka = _ones_col(q), _ones_col(k)  # (B, H, L, D+1)
    coefs, groups = {}, []
    for grp in _groups([b for seg in segs for b in _blocks(seg)]):
        rates = (stack_group(x, grp).contiguous() for x in (eta, mom, dec))  # [N, B, H, n]
        co = _coefs(*rates)  # [N, B, H, n(, n)]
        groups.append((grp, co))
        coefs.update((b, co.block(i)) for i, b in enumerate(grp))
    z, saved = [], []
    for seg in segs:
        part = slice(seg.start, seg.start + seg.length)
        X, g, zk = _key_forward(P, ka[:, :, part], target[:, :, part], ln_w, ln_b, eps)
        blocks = []
        for b in _blocks(seg):
            r = slice(b.start - seg.start, b.start - seg.start + b.length)  # inside the segment
            Xb, gb = [x[:, :, r] for x in X], [gl[:, :, r] for gl in g]
            y, Wn, Sn, cache = _block_forward(qa[:, :, b.start : b.start + b.length], W, S, Xb,
                                              gb, coefs[b])  # fmt: skip
            z.append(y)
            if save:
                blocks.append((b, W, S, cache))
            W, S = Wn, Sn
        if save:
            saved.append((seg, P, X, g, zk, blocks))
        if seg.completes:
            P = W
    return torch.cat(z, dim=2), P, W, S, _Saved(groups, saved)


def _backward(saved: _Saved, target, ln_w, ln_b, eps, dz, dP, dW, dS):
    """Backward of :func:`_forward` for dz and the final dP, dW, dS. Returns dq, dk, dtarget
    [B, H, L, D], d ln_w, d ln_b [H, D], d eta, d mom, d dec [B, H, L] and the start's dP, dW, dS."""
    coefs = {b: co.block(i) for grp, co in saved.groups for i, b in enumerate(grp)}
    dq, dk, dt, dcoefs = {}, {}, {}, {}
    d_ln_w, d_ln_b = torch.zeros_like(ln_w), torch.zeros_like(ln_b)
    for seg, P, X, g, zk, blocks in reversed(saved.segments):
        if seg.completes:  # P after this segment is W after it
            dW = [a + b for a, b in zip(dW, dP)]
            dP = [torch.zeros_like(a) for a in dP]
        dXb, dgb = [], []  # per block, in reverse
        for b, W, S, cache in reversed(blocks):
            r = slice(b.start - seg.start, b.start - seg.start + b.length)
            dyb = dz[:, :, b.start : b.start + b.length]
            Xb, gb = [x[:, :, r] for x in X], [gl[:, :, r] for gl in g]
            dq[b.start], dXl, dgl, dW, dS, dcoefs[b] = _block_backward(W, S, Xb, gb, cache,
                                                                      coefs[b], dyb, dW, dS)  # fmt: skip
            dXb.append(dXl)
            dgb.append(dgl)
        dX = [torch.cat(d[::-1], dim=2) for d in zip(*dXb)]  # (B, H, n_seg, Din+1)
        dg = [torch.cat(d[::-1], dim=2) for d in zip(*dgb)]
        part = slice(seg.start, seg.start + seg.length)
        dk[seg.start], dt[seg.start], dw, db, dPk = _key_backward(P, X, g, zk, dX, dg,
                                                                  target[:, :, part], ln_w, ln_b,
                                                                  eps)  # fmt: skip
        d_ln_w, d_ln_b = d_ln_w + dw, d_ln_b + db
        dP = [a + b for a, b in zip(dP, dPk)]
    d_rates = []  # per group: d eta, d mom, d dec [B, H, N n]
    for grp, co in saved.groups:
        stacked = _CoefGrads(*(torch.stack([getattr(dcoefs[b], name) for b in grp])
                               for name in _CoefGrads.__annotations__))  # fmt: skip
        d_rates.append([d.movedim(0, 2).flatten(2, 3) for d in _coefs_vjp(co, stacked)])
    in_order = lambda d: torch.cat([d[s] for s in sorted(d)], dim=2)
    d_eta, d_mom, d_dec = (torch.cat(d, dim=2) for d in zip(*d_rates))
    return (in_order(dq), in_order(dk), in_order(dt), d_ln_w, d_ln_b, d_eta, d_mom, d_dec,
            dP, dW, dS)  # fmt: skip


class _TitansScan(torch.autograd.Function):
    """(q, k, target, ln_w, ln_b, eta, mom, dec, *P, *W, *S) -> (z, *P', *W', *S')."""

    @staticmethod
    def forward(ctx, segs, eps, q, k, target, ln_w, ln_b, eta, mom, dec, *carry):
        nl = len(carry) // 3
        P, W, S = (list(carry[i * nl : (i + 1) * nl]) for i in range(3))
        z, Pf, Wf, Sf, saved = _forward(q, k, target, ln_w, ln_b, eta, mom, dec, P, W, S, segs,
                                        eps)  # fmt: skip
        ctx.saved, ctx.eps, ctx.nl = saved, eps, nl
        ctx.save_for_backward(target, ln_w, ln_b)
        # P' may be an input or the same tensor as W': a tensor of its own
        return (z, *(p.clone() for p in Pf), *Wf, *Sf)

    @staticmethod
    def backward(ctx, dz, *dcarry):
        if torch.is_grad_enabled():  # create_graph=True: the chain rule below is not recorded
            raise RuntimeError(
                "the torch backend's Titans form has a first-order backward only; for double "
                "backward (create_graph=True) use form='primal' or backend='generic'"
            )
        nl = ctx.nl
        dP, dW, dS = (list(dcarry[i * nl : (i + 1) * nl]) for i in range(3))
        target, ln_w, ln_b = ctx.saved_tensors
        *grads, dP, dW, dS = _backward(ctx.saved, target, ln_w, ln_b, ctx.eps, dz, dP, dW, dS)
        return None, None, *grads, *dP, *dW, *dS


def titans_scan(q, k, target, ln_weight, ln_bias, eta, momentum, decay, P, W, S, layers,
                segs: list[Segment], eps: float):  # fmt: skip
    """Titans-form scan in the dual form (module docstring), in the compute dtype.

    q, k, target: [B, H, L, D] (target = v - k, the reconstruction target); ln_weight, ln_bias:
    [H, D]; eta, momentum, decay: [B, H, L]; P, W, S: {name: [B, H, ...]} (the gradient point, the
    current weights and the momentum) with ``layers`` the (weight, bias) names per fast layer;
    ``segs`` from ``common.plan_segments`` (L > 0). Returns z [B, H, L, D] (the fast model's output
    for the queries, before LN) and the final P, W, S dicts."""
    aug = lambda d: [torch.cat((d[Wn], d[bn]), dim=-2) for Wn, bn in layers]
    inputs = (q, k, target, ln_weight, ln_bias, eta, momentum, decay)
    carry = (*aug(P), *aug(W), *aug(S))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (*inputs, *carry)):
        z, *carry = _TitansScan.apply(segs, eps, *inputs, *carry)
    else:
        nl = len(layers)
        P, W, S = (list(carry[i * nl : (i + 1) * nl]) for i in range(3))
        z, P, W, S, _ = _forward(*inputs, P, W, S, segs, eps, save=False)
        carry = (*P, *W, *S)
    out = []
    for i in range(3):  # P, W, S: [W; b] -> {W: [B, H, Din, Dout], b: [B, H, 1, Dout]}
        d = {}
        for (Wn, bn), m in zip(layers, carry[i * len(layers) : (i + 1) * len(layers)]):
            d[Wn], d[bn] = m[..., :-1, :], m[..., -1:, :]
        out.append(d)
    return z, *out
