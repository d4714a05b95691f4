"""The ``torch`` backend's Titans form (momentum + decay): one autograd Function, hand-written backward.

Same semantics as :mod:`ttt_core.ops.scan` (DESIGN.md). A mini-batch segment has gradient point P
(its start weights), current weights W_0 and momentum S_0; per fast layer, key-side inputs X_t and
output gradients g_t (at P). Biases ride along as a last row of ones in the inputs (``x_aug = [x, 1]``,
``W_aug = [W; b]``), and each layer's carry is one matrix Z, stored by columns,
``[W_aug | S_aug]`` [Din+1, 2 Dout], or, where Din + 1 <= Dout (an MLP's first layer), by rows,
``[W_aug; S_aug]`` [2 (Din+1), Dout] (the smaller GEMM outputs and elementwise work):

    query i:  Y_i = D_i (h_i W_0) + c0_i (h_i S_0) - sum_t CE_it (h_i . X_t) g_t     (one GEMM:
              h Z by columns, [D_i h_i | c0_i h_i] Z by rows; with the ones column, h_i . X_t is
              the dual form's q.k + 1)
    carry:    W'  = D_last W_0 + c0_last S_0 - X^T (wW g),   S' = m_last S_0 - X^T (wS g)
              (one GEMM: X^T [wW g | wS g] by columns, [wW X | wS X]^T g by rows; by rows the
              first two terms are one more, F [W_0; S_0] with F = [[D_last, c0_last], [0, m_last]])

with ``CE_it = C_it eta_t``, ``C = A M``, ``c0 = A mcum``, ``wS_t = M_{n-1,t} eta_t``,
``wW_t = CE_{n-1,t}`` (the coefficient matrices of scan.py, over the tokens of one block).

Blocks: a mini-batch longer than ``BLOCK`` tokens is read in blocks of ``BLOCK`` queries that carry
(W, S) from one to the next while every gradient stays at P, exactly as a streaming cut inside a
mini-batch does; the key pass still runs once per mini-batch. This keeps the dual form's n x n
matrices (and the n^3 coefficient products) small for long mini-batches without changing results.

Why a Function: autograd through the segment loop records and replays ~100 small ops per segment
(the dual form, the LayerNorm-loss gradient, gelu and its derivative, cumprod coefficients and their
backward); on CPU at the forecaster's sizes that bookkeeping is much of the time. The forward keeps
what the backward needs; the backward is the chain rule written out per block in reverse order
(carrying the gradients of P and Z), with the coefficient gradients of a group of equally long
blocks done in one batched step. Temporaries that do not outlive a block (or a segment) live in a
scratch that the call reuses, and on CPU the thread's next call too (:class:`~ttt_core.ops.inplace.Scratch`): there each
fresh tensor of a few hundred KB costs page faults, and a reused one is warm in cache; what the
backward keeps and what a call returns are always tensors of their own. First order only: a
backward with ``create_graph=True`` raises (use ``form="primal"`` or the ``generic`` backend for
double backward). Tested against the autograd path (``form="primal"``) and the naive loop in fp64
(``tests/test_titans_scan.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import Segment, ln_loss_grad_parts, segment_products, stack_group
from .inplace import Scratch, add_mm_, mm_into, sub_mm_

BLOCK = 32  # queries per dual-form block inside a longer mini-batch (CPU: 32 beat 16 and 64 at mini-batch 64)
_C = math.sqrt(2.0 / math.pi)
_K = 0.044715


# ----------------------------------------------------------------------------------------------
# small closed forms
# ----------------------------------------------------------------------------------------------
def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _ones_col(x: Tensor) -> Tensor:
    """[..., d] -> [..., d + 1] with a last column of ones (the bias input)."""
    return F.pad(x, (0, 1), value=1.0)


def _gelu_fwd(
    x: Tensor, grad2: bool = False, scratch: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """[gelu_tanh(x), 1] (the ones column of the next layer's input) and gelu_tanh'(x), with few
    fresh tensors (each costs page faults on CPU); with ``grad2``, x is overwritten with
    gelu_tanh''(x) (the key pass's backward needs it), else x is left as it is; ``scratch``
    (shaped like x) holds the sigmoid if given.

    With u = C (x + K x^3), ``0.5 (1 + tanh(u)) = s = sigmoid(2u)`` (one sigmoid instead of a tanh,
    much faster on CPU), q = d(2u)/dx = 2C (1 + 3K x^2) and y = gelu(x) = x s:
    ``gelu' = s + y q (1 - s)`` and ``gelu'' = s (1 - s) (x (1 - 2s) q^2 + 4q - 4C)``
    (its ``12 C K x^2`` term written as ``2q - 4C``)."""
    c = x.new_tensor(2.0 * _C)  # (0-dim: broadcast)
    a = torch.addcmul(c, x, x, value=2.0 * _C * _K)  # 2u / x = 2C (1 + K x^2)
    s = torch.mul(a, x, out=scratch).sigmoid_()
    q = torch.addcmul(c, x, x, value=6.0 * _C * _K, out=a)  # in a's memory
    ya = x.new_empty((*x.shape[:-1], x.shape[-1] + 1))
    y = torch.mul(x, s, out=ya[..., :-1])
    ya[..., -1] = 1.0  # after the product, which brought these rows into cache
    if grad2:
        x.sub_(y, alpha=2.0).mul_(q).mul_(q).add_(q, alpha=4.0).sub_(4.0 * _C)
        x.mul_(s).addcmul_(x, s, value=-1.0)  # times s (1 - s)
    dy = q.mul_(y).addcmul_(q, s, value=-1.0).add_(s)  # in q's memory
    return ya, dy


def _ln_grad_bwd(a: Tensor, cache, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`_ln_grad_fwd` for ``a = dL/dg``: (dL/dz, dL/dt, dL/dw2 per token)."""
    xh, r, dx, s, g = cache
    tmp = torch.mul(a, xh)  # scratch for the products below (fresh tensors cost page faults)
    a_xh = tmp.mean(dim=-1, keepdim=True)
    g_dx = torch.sub(a, a.mean(dim=-1, keepdim=True)).addcmul_(xh, a_xh, value=-1.0).mul_(r)
    u = torch.mul(s, a, out=tmp).addcmul_(a_xh, dx).mul_(r)
    g_xh = torch.mul(g_dx, w2).sub_(u)
    g_r = torch.mul(a, g, out=tmp).sum(dim=-1, keepdim=True).mul_(r / xh.shape[-1])  # dL/dr r^2/D
    gx = torch.mul(g_xh, xh, out=tmp).mean(dim=-1, keepdim=True)
    g_z = g_xh.sub_(g_xh.mean(dim=-1, keepdim=True)).addcmul_(xh, gx, value=-1.0).mul_(r)
    g_z.addcmul_(g_r, xh, value=-1.0)  # in g_xh's memory
    return g_z, g_dx, torch.mul(g_dx, xh, out=tmp)


def _segment_products_bwd(
    mat: Tensor, cum: Tensor, dmat: Tensor, dcum: Tensor, Q: Tensor
) -> Tensor:
    """Backward of ``common.segment_products`` (zero-safe, no division): ``d mat_jt / d x_r =
    mat_{r-1,t} mat_jr`` for t < r <= j and ``d cum_j / d x_r = cum_{r-1} mat_jr``.

    Matrix-vector products are written as multiply + sum: a batched matmul of many tiny
    matrices costs about a microsecond per matrix on CPU. ``dmat`` is used as scratch memory and
    ``Q`` [..., n, n] is written (both the caller's own: fresh tensors cost page faults on CPU)."""
    Q = torch.matmul(_t(mat), dmat, out=Q)  # Q[r, t] = sum_j mat_jr dmat_jt
    dx = torch.mul(mat, dcum.unsqueeze(-1), out=dmat).sum(dim=-2)  # (..., n): sum_j mat_jr dcum_j
    dx[..., 1:] *= cum[..., :-1]  # cum_{r-1}; 1 at r = 0
    dx[..., 1:] += Q[..., 1:, :].mul_(mat[..., :-1, :]).sum(dim=-1)  # times mat_{r-1,t}; 0 at r = 0
    return dx


# ----------------------------------------------------------------------------------------------
# coefficients of a group of N equally long blocks: [N, B, H, n(, n)]
# ----------------------------------------------------------------------------------------------
def _coefs_fwd(eta: Tensor, mom: Tensor, dec: Tensor) -> dict[str, Tensor]:
    # the momentum and the decay products in one call: mats [2, N, B, H, n, n], cums [2, ..., n]
    mats, cums = segment_products(torch.stack((mom, 1.0 - dec)))
    (M, A), (mc, Dv) = mats.unbind(0), cums.unbind(0)
    C = A @ M
    CE = torch.empty_like(C)  # scratch for A @ mc first (fresh tensors cost page faults on CPU)
    c0 = torch.mul(A, mc.unsqueeze(-2), out=CE).sum(dim=-1)  # A @ mc
    torch.mul(C, eta.unsqueeze(-2), out=CE)
    return {
        "mats": mats, "cums": cums, "C": C, "CE": CE,
        "Dc": torch.stack((Dv, c0), dim=-1),  # (..., n, 2): weights of W_0 and S_0 in W_i
        "w": torch.stack((CE[..., -1, :], M[..., -1, :] * eta), dim=-1),  # (..., n, 2): wW, wS
        # (..., 2, 2): [W'; S'] = F [W_0; S_0] + ..., F = [[D_last, c0_last], [0, m_last]]
        "F": torch.stack((Dv[..., -1], c0[..., -1], torch.zeros_like(mc[..., -1]), mc[..., -1]),
                         dim=-1).unflatten(-1, (2, 2)),
    }  # fmt: skip


def _coefs_bwd(co, eta, dCE, dw, dDc, dF, ws: Scratch):
    """Gradients of eta, momentum and decay [N, B, H, n] from those of the coefficients
    (``dCE``, ``dDc`` are the caller's own stacks: updated in place, dCE's memory reused; ``dF``'s
    lower left entry is not read: F's is the constant 0).

    Two more [N, B, H, n, n] tensors in all (dM, dA, the call's scratch ``ws``): the products'
    backward runs per side, its ``Q`` in memory that is dead by then."""
    (M, A), (mc, Dv) = co["mats"].unbind(0), co["cums"].unbind(0)
    dM, dA = ws("dM", dCE, *dCE.shape), ws("dA", dCE, *dCE.shape)  # dM: scratch before it is dM
    dCE[..., -1, :] += dw[..., 0]
    de = torch.mul(dCE, co["C"], out=dM).sum(dim=-2) + dw[..., 1] * M[..., -1, :]
    dcums = dDc.movedim(-1, 0).flip(0)  # [dc0, dD]: dc0 becomes dmc below, dD stays
    dD, dc0 = dcums[1], dcums[0].clone()
    dD[..., -1] += dF[..., 0, 0]
    dc0[..., -1] += dF[..., 0, 1]
    dmc = torch.mul(A, dc0.unsqueeze(-1), out=dM).sum(dim=-2)  # A^T dc0
    dC = dCE.mul_(eta.unsqueeze(-2))
    torch.matmul(_t(A), dC, out=dM)[..., -1, :] += dw[..., 1] * eta
    torch.matmul(dC, _t(M), out=dA).addcmul_(dc0.unsqueeze(-1), mc.unsqueeze(-2))
    dmc[..., -1] += dF[..., 1, 1]
    dm = _segment_products_bwd(M, mc, dM, dmc, Q=dC)  # dC is dead: Q in its memory
    da = _segment_products_bwd(A, Dv, dA, dD, Q=dM)  # so is dM
    return de, dm, da.neg_()


# ----------------------------------------------------------------------------------------------
# the key pass of a mini-batch segment (at P) and one block of queries
# ----------------------------------------------------------------------------------------------
def _key_fwd(P: list[Tensor], ka: Tensor, t: Tensor, w2: Tensor, eps: float, save: bool,
             ws: Scratch):  # fmt: skip
    """Inputs X (with the ones column) and output gradients g of every layer at P, and a cache
    (``ws``: the call's scratch, for what is not kept)."""
    z1 = ka @ P[0]  # (B, H, n, F)
    if len(P) == 1:
        g1, ln = ln_loss_grad_parts(z1, t, w2, eps)
        return [ka], [g1], (ln,)
    x2a, d1 = _gelu_fwd(z1, grad2=save, scratch=ws("s", z1, *z1.shape))  # z1 becomes gelu''(z1)
    z2 = mm_into(x2a, P[1], ws("z2", t, *t.shape))  # (B, H, n, D)
    g2, ln = ln_loss_grad_parts(z2, t, w2, eps)
    gp = g2 @ _t(P[1][..., :-1, :])  # (B, H, n, F)
    return [ka, x2a], [gp * d1, g2], (ln, z1, d1, gp)


def _key_bwd(P: list[Tensor], xs, gs, cache, dX, dg, w2, ws: Scratch):
    """dk, dt, dw2 and the gradients of P from those of the key-side X and g (dX, dg are the
    call's own: dg is updated in place)."""
    if len(P) == 1:
        (ln,) = cache
        dz1, dt, dw2 = _ln_grad_bwd(dg[0], ln, w2)
        dP = []
    else:
        ln, gelu2, d1, gp = cache
        W2 = P[1][..., :-1, :]
        dgp = torch.mul(dg[0], d1, out=ws("dgp", d1, *d1.shape))
        dz2, dt, dw2 = _ln_grad_bwd(add_mm_(dg[1], dgp, W2), ln, w2)
        dx2 = mm_into(dz2, _t(W2), ws("dx2", d1, *d1.shape)).add_(dX[1][..., :-1])  # dL/d gelu(z1)
        dz1 = dg[0].mul_(gp).mul_(gelu2).addcmul_(dx2, d1)
        dP2 = _t(xs[1]) @ dz2
        dP2[..., :-1, :] += _t(dgp) @ gs[1]
        dP = [dP2]
    dk = dX[0][..., :-1] + dz1 @ _t(P[0][..., :-1, :])
    return dk, dt, dw2, [_t(xs[0]) @ dz1, *dP]


def _halves(Zl: Tensor, rows: bool) -> tuple[Tensor, Tensor]:
    """Views (W_aug, S_aug) of a carry stored by rows [2 (Din+1), Dout] or by columns [Din+1, 2 Dout]."""
    if rows:
        n = Zl.shape[-2] // 2
        return Zl[..., :n, :], Zl[..., n:, :]
    d = Zl.shape[-1] // 2
    return Zl[..., :d], Zl[..., d:]


def _pair(a: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """[w_0 a | w_1 a] for a (B, H, n, m) and w (B, H, n, 2): (B, H, n, 2m) (two products with a
    column each: on CPU much faster than one broadcast over (n, 2, m)); ``out`` (B, H, n, 2, m)."""
    if out is None:
        out = a.new_empty((*a.shape[:-1], 2, a.shape[-1]))
    torch.mul(a, w[..., :1], out=out[..., 0, :])
    torch.mul(a, w[..., 1:], out=out[..., 1, :])
    return out.flatten(-2)


def _read_fwd(Zl: Tensor, h: Tensor, Dc: Tensor, rows: bool, out: Tensor) -> tuple[Tensor, Tensor]:
    """The queries' read of the start weights, ``y_i = D_i (h_i W_0) + c0_i (h_i S_0)`` (B, H, n, Dout),
    and its backward's cache: by rows one GEMM ``[D_i h_i | c0_i h_i] [W_0; S_0]`` (cache the scaled
    h), by columns one GEMM ``h [W_0 | S_0]`` and the mix (cache that product, ``base``); y is
    written into ``out`` (the caller's)."""
    if rows:
        hs = _pair(h, Dc)  # (B, H, n, 2 (Din+1))
        return mm_into(hs, Zl, out), hs
    base = h @ Zl  # (B, H, n, 2 Dout): h W_0 | h S_0
    bw, bs = _halves(base, False)
    return torch.mul(bw, Dc[..., :1], out=out).addcmul_(bs, Dc[..., 1:]), base


def _read_bwd(Zl, h, Dc, rc, dy, rows: bool, dZ: Tensor, dh: Tensor, ws: Scratch):
    """Backward of :func:`_read_fwd` for ``dy``: writes dZ and dh (the caller's), returns dDc
    (B, H, n, 2)."""
    if rows:
        dhs = mm_into(dy, _t(Zl), ws("dhs", dy, *h.shape[:-1], 2 * h.shape[-1]))
        dhs = dhs.unflatten(-1, (2, h.shape[-1]))  # (B, H, n, 2, Din+1)
        torch.mul(dhs[..., 0, :], Dc[..., :1], out=dh).addcmul_(dhs[..., 1, :], Dc[..., 1:])
        mm_into(_t(rc), dy, dZ)
        return dhs.mul_(h.unsqueeze(-2)).sum(dim=-1)
    dbase = _pair(dy, Dc, ws("dbase", dy, *dy.shape[:-1], 2, dy.shape[-1]))  # (B, H, n, 2 Dout)
    mm_into(_t(h), dbase, dZ)
    mm_into(dbase, _t(Zl), dh)
    dbase = dbase.unflatten(-1, (2, dy.shape[-1]))  # (B, H, n, 2, Dout), its memory reused:
    return torch.mul(rc.unflatten(-1, (2, dy.shape[-1])), dy.unsqueeze(-2), out=dbase).sum(dim=-1)


def _carry_fwd(Zl: Tensor, x: Tensor, g: Tensor, w: Tensor, F: Tensor, rows: bool):
    """The carry after a block, ``W' = D_last W_0 + c0_last S_0 - X^T (wW g)``,
    ``S' = m_last S_0 - X^T (wS g)``, i.e. ``[W'; S'] = F [W_0; S_0] - ...`` with F (B, H, 2, 2):
    by rows one small GEMM ``F Z`` and one ``[wW x | wS x]^T g``, by columns elementwise and
    ``x^T [wW g | wS g]``. Returns Z' and that GEMM's weighted factor (the backward's cache)."""
    if rows:  # Z [2 (Din+1), Dout] is [W; S] in memory: F times its two halves as rows
        Zo = torch.matmul(F, Zl.flatten(-2).unflatten(-1, (2, -1))).view_as(Zl)
        xw = _pair(x, w)  # (B, H, n, 2 (Din+1)): [wW x | wS x]
        return sub_mm_(Zo, _t(xw), g), xw
    Zo = torch.empty_like(Zl)
    (W, S), (Wo, So) = _halves(Zl, rows), _halves(Zo, rows)
    fl = F[..., None, None]  # (B, H, 2, 2, 1, 1)
    torch.mul(W, fl[..., 0, 0, :, :], out=Wo).addcmul_(S, fl[..., 0, 1, :, :])
    torch.mul(S, fl[..., 1, 1, :, :], out=So)
    gw = _pair(g, w)  # (B, H, n, 2 Dout): [wW g | wS g]
    return sub_mm_(Zo, _t(x), gw), gw


def _carry_bwd(Zl, x, g, w, F, cc, dZo, dZl, dX, dg, rows: bool, ws: Scratch):
    """Backward of :func:`_carry_fwd` for ``dZo``: adds into dZl, dX, dg (in place) and returns
    (dL/dw (B, H, n, 2), dL/dF (B, H, 2, 2), its lower left entry not set)."""
    if rows:  # dZ += F^T dZo and dF = dZo Z^T over the halves as rows
        dZo = dZo.contiguous()  # (from the caller's gradient, possibly expanded)
        dp, zp = dZo.flatten(-2).unflatten(-1, (2, -1)), Zl.flatten(-2).unflatten(-1, (2, -1))
        dF = dp @ _t(zp)  # (B, H, 2, 2)
        add_mm_(dZl.flatten(-2).unflatten(-1, (2, -1)), _t(F), dp)
    else:
        (W, S), (dW, dS) = _halves(Zl, rows), _halves(dZo, rows)
        gww, gws, gss = ((a * b).sum(dim=(-1, -2)) for a, b in ((dW, W), (dW, S), (dS, S)))
        dF = torch.stack((gww, gws, torch.zeros_like(gws), gss), dim=-1).unflatten(-1, (2, 2))
        fl = F[..., None, None]
        dZW, dZS = _halves(dZl, rows)
        dZW.addcmul_(dW, fl[..., 0, 0, :, :])
        dZS.addcmul_(dS, fl[..., 1, 1, :, :]).addcmul_(dW, fl[..., 0, 1, :, :])
    # a = the factor that is not weighted (g by rows, x by columns), V = -dL/d(weighted factor)
    a, da, b, db = (g, dg, x, dX) if rows else (x, dX, g, dg)
    V = mm_into(a, _t(dZo) if rows else dZo, ws("V", a, *a.shape[:-1], 2 * b.shape[-1]))
    V = V.unflatten(-1, (2, b.shape[-1]))  # (B, H, n, 2, m)
    db.addcmul_(V[..., 0, :], w[..., :1], value=-1.0).addcmul_(V[..., 1, :], w[..., 1:], value=-1.0)
    dw = V.mul_(b.unsqueeze(-2)).sum(dim=-1).neg_()  # in V's memory (dead after this)
    sub_mm_(da, cc, dZo if rows else _t(dZo))
    return dw, dF


def _block_fwd(Z: list[Tensor], qa, xs, gs, co, kern1, att1, rows, save: bool, ws: Scratch):
    """One block of queries: z [B, H, n, D] (the call's scratch: copy it before the next block)
    and the carry Z after it (and a cache per layer: h, the read's cache, kernel, att, gelu' of
    the output (None at the last layer), the carry's)."""
    Dc, CE = co["Dc"], co["CE"]
    h, cache = qa, []
    for li, (Zl, x, g) in enumerate(zip(Z, xs, gs)):
        kern, att = (kern1, att1) if li == 0 else (None, None)
        if kern is None:
            kern = h @ _t(x)  # (B, H, n, n): h_i . x_t + 1
            att = kern * CE
        y = ws(f"y{li}", h, *h.shape[:-1], g.shape[-1])  # (B, H, n, Dout)
        y, rc = _read_fwd(Zl, h, Dc, rows[li], out=y)
        y = sub_mm_(y, att, g)
        entry = [h, rc, kern, att, None]
        if li + 1 < len(Z):
            h, entry[4] = _gelu_fwd(y, scratch=ws("s", y, *y.shape))  # with the ones column
        cache.append(entry)
    Zn = []
    for li, (Zl, x, g) in enumerate(zip(Z, xs, gs)):
        Zo, cc = _carry_fwd(Zl, x, g, co["w"], co["F"], rows[li])
        Zn.append(Zo)
        cache[li].append(cc)
    return y, Zn, cache if save else []


def _block_bwd(Z, xs, gs, cache, co, dz, dZo, rows, ws: Scratch, parity: int | None, dCE):
    """Backward of one block: dq, dX, dg of its tokens, dZ before it, coefficient gradients (dCE
    is written into the caller's tensor). All but the coefficient gradients and dZ are scratch of
    the call (``ws``) that lives until the next block's backward; dZ alternates between two per
    layer (``parity``: the block after this one wrote the other), or is fresh (parity None: the
    call's first block, whose dZ is returned)."""
    Dc, CE, w, F = co["Dc"], co["CE"], co["w"], co["F"]
    B, H, n, _ = dz.shape
    dX, dg, dZ = [None] * len(Z), [None] * len(Z), [None] * len(Z)
    dDc = 0.0
    dw = dF = None
    dy = dz
    for li in reversed(range(len(Z))):
        Zl, x, g = Z[li], xs[li], gs[li]
        h, rc, kern, att, _, cc = cache[li]
        dZl = torch.empty_like(Zl) if parity is None else ws(f"dZ{li}.{parity}", dz, *Zl.shape)
        dh = ws(f"dh{li}", dz, *h.shape)
        dDc = dDc + _read_bwd(Zl, h, Dc, rc, dy, rows[li], dZl, dh, ws)
        datt = mm_into(dy, _t(g), ws("datt", dz, B, H, n, n), alpha=-1.0)  # y = ... - att @ g
        if li == len(Z) - 1:
            torch.mul(datt, kern, out=dCE)
        else:
            dCE.addcmul_(datt, kern)
        dkern = datt.mul_(CE)  # (B, H, n, n)
        add_mm_(dh, dkern, x)
        dX_l = mm_into(_t(dkern), h, ws(f"dX{li}", dz, *x.shape))
        dg_l = mm_into(_t(att), dy, ws(f"dg{li}", dz, *g.shape), alpha=-1.0)
        if dZo is not None:
            dwl, dFl = _carry_bwd(Zl, x, g, w, F, cc, dZo[li], dZl, dX_l, dg_l, rows[li], ws)
            dw = dwl if dw is None else dw.add_(dwl)
            dF = dFl if dF is None else dF.add_(dFl)
        dX[li], dg[li], dZ[li] = dX_l, dg_l, dZl
        if li > 0:
            # through gelu of the previous layer's output, in dh's memory (dead after this)
            dy = dh[..., :-1].mul_(cache[li - 1][4])
    if dw is None:  # nothing flows back from the carry after this block
        dw, dF = dz.new_zeros((B, H, n, 2)), dz.new_zeros((B, H, 2, 2))
    return dh[..., :-1], dX, dg, dZ, (dCE, dw, dDc, dF)


# ----------------------------------------------------------------------------------------------
# the scan and its Function
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    start: int  # in the call's sequence
    length: int
    rel: int  # start inside its segment


def _plan(segs: list[Segment]):
    """Blocks of each segment, and groups of consecutive equally long blocks (coefficients batched)."""
    per_seg = []
    for s in segs:
        per_seg.append(
            [_Block(s.start + r, min(BLOCK, s.length - r), r) for r in range(0, s.length, BLOCK)]
        )
    groups: list[list[_Block]] = []
    for b in (b for bs in per_seg for b in bs):
        if groups and groups[-1][-1].length == b.length:
            groups[-1].append(b)
        else:
            groups.append([b])
    return per_seg, groups


def _scan_fwd(q, k, t, w2, eta, mom, dec, P, Z, segs, eps, save):
    """All segments. Returns z [B, H, L, D], the final P and Z (per layer) and the cache."""
    rows = _layouts(P, Z)
    qa, ka = _ones_col(q), _ones_col(k)
    per_seg, groups = _plan(segs)
    coefs = {}
    gsaved = []
    for grp in groups:
        es = stack_group(eta, grp)
        co = _coefs_fwd(es, stack_group(mom, grp), stack_group(dec, grp))
        kern = stack_group(qa, grp) @ _t(stack_group(ka, grp))  # layer-1 kernels of the group
        att = kern * co["CE"]
        parts = {n: co[n].unbind(0) for n in ("Dc", "CE", "w", "F")}  # what the blocks read
        for i, b in enumerate(grp):
            coefs[b] = ({n: v[i] for n, v in parts.items()}, kern[i], att[i])
        gsaved.append((grp, co, es))
    z, saved, ws = torch.empty_like(q), [], Scratch.of_thread("fwd", q)
    for seg, blocks in zip(segs, per_seg):
        sl = slice(seg.start, seg.start + seg.length)
        xs, gs, kcache = _key_fwd(P, ka[:, :, sl], t[:, :, sl], w2, eps, save, ws)
        bsaved = []
        for b in blocks:
            r = slice(b.rel, b.rel + b.length)
            xb, gb = [x[:, :, r] for x in xs], [g[:, :, r] for g in gs]
            co, kern, att = coefs[b]
            y, Zn, cache = _block_fwd(Z, qa[:, :, b.start : b.start + b.length], xb, gb, co,
                                      kern, att, rows, save, ws)  # fmt: skip
            z[:, :, b.start : b.start + b.length] = y
            if save:
                bsaved.append((b, Z, xb, gb, cache))
            Z = Zn
        if save:
            saved.append((seg, P, xs, gs, kcache, bsaved))
        if seg.completes:
            P = [_halves(Zl, r)[0] for Zl, r in zip(Z, rows)]
    ws.close()
    return z, P, Z, (saved, gsaved, coefs, rows)


def _layouts(P: list[Tensor], Z: list[Tensor]) -> list[bool]:
    """Per layer: is its carry stored by rows (``Z.shape[-1] == Dout``)? See :func:`titans_scan`."""
    return [Zl.shape[-1] == Pl.shape[-1] for Zl, Pl in zip(Z, P)]


class _TitansScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, q, k, t, w2, eta, mom, dec, *flat):
        segs, eps = meta
        nl = len(flat) // 2
        P, Z = list(flat[:nl]), list(flat[nl:])
        z, Pf, Zf, saved = _scan_fwd(q, k, t, w2, eta, mom, dec, P, Z, segs, eps, True)
        ctx.saved, ctx.w2, ctx.shape, ctx.like = saved, w2, q.shape, flat
        ctx.set_materialize_grads(False)
        return (z, *(p.clone() for p in Pf), *Zf)  # P may alias Z or an input: its own tensor

    @staticmethod
    def backward(ctx, dz, *dflat):
        if torch.is_grad_enabled():  # create_graph=True: the chain rule below is not recorded
            raise RuntimeError(
                "the torch backend's Titans form has a first-order backward only; for double "
                "backward (create_graph=True) use form='primal' or backend='generic'"
            )
        (saved, gsaved, coefs, rows), w2, like = ctx.saved, ctx.w2, ctx.like
        nl = len(like) // 2
        full = lambda g, r: torch.zeros_like(r) if g is None else g
        dP = None if all(g is None for g in dflat[:nl]) else list(map(full, dflat[:nl], like[:nl]))
        dZ = None if all(g is None for g in dflat[nl:]) else list(map(full, dflat[nl:], like[nl:]))
        if dz is None:
            dz = w2.new_zeros(ctx.shape)
        dq, dk, dt = (torch.empty_like(dz) for _ in range(3))
        dw2 = torch.zeros_like(w2)
        cgrads = {}
        ws, parity, own = Scratch.of_thread("bwd", dz), 0, False  # own: dZ is this call's
        dCEg = [ws(f"dCE{i}", dz, *co["CE"].shape) for i, (_, co, _) in enumerate(gsaved)]
        dCEs = {b: buf[i] for (grp, _, _), buf in zip(gsaved, dCEg) for i, b in enumerate(grp)}
        for seg, P, xs, gs, kcache, bsaved in reversed(saved):
            if seg.completes and dP is not None:  # P after the segment = W after it
                if dZ is None:
                    dZ = [torch.zeros_like(r) for r in like[nl:]]
                if not own:  # the caller's gradient (or zeros): add into a copy
                    dZ = [Zg.clone() for Zg in dZ]
                for Zg, Pg, r in zip(dZ, dP, rows):
                    _halves(Zg, r)[0].add_(Pg)
                dP = None
            if len(bsaved) > 1:  # accumulated over the segment's blocks
                dX = [ws(f"accX{i}", x, *x.shape) for i, x in enumerate(xs)]
                dg = [ws(f"accg{i}", g, *g.shape) for i, g in enumerate(gs)]
            for b, Z, xb, gb, cache in reversed(bsaved):
                r = slice(b.rel, b.rel + b.length)
                co = coefs[b][0]
                dzb = dz[:, :, b.start : b.start + b.length]
                pb = None if b.start == 0 else parity  # the call's first block: dZ returned
                dqb, dXb, dgb, dZ, cgrads[b] = _block_bwd(Z, xb, gb, cache, co, dzb, dZ, rows, ws,
                                                          pb, dCEs[b])  # fmt: skip
                parity, own = 1 - parity, True
                dq[:, :, b.start : b.start + b.length] = dqb
                if len(bsaved) == 1:
                    dX, dg = dXb, dgb
                    continue
                for acc, gr in zip(dX + dg, dXb + dgb):
                    acc[:, :, r] = gr  # blocks do not overlap
            sl = slice(seg.start, seg.start + seg.length)
            dk[:, :, sl], dt[:, :, sl], dw2_s, dPk = _key_bwd(P, xs, gs, kcache, dX, dg, w2, ws)
            dw2 += dw2_s.sum(dim=(0, 2), keepdim=True)
            dP = dPk if dP is None else [a + b_ for a, b_ in zip(dP, dPk)]
        de, dm, da = (torch.empty_like(dz[..., 0]) for _ in range(3))
        for (grp, co, es), dCE in zip(gsaved, dCEg):  # dCE: written by the blocks
            stacked = [torch.stack(x) for x in list(zip(*(cgrads[b] for b in grp)))[1:]]
            ge, gm, ga = _coefs_bwd(co, es, dCE, *stacked, ws)
            sl = slice(grp[0].start, grp[0].start + len(grp) * grp[0].length)
            for acc, x in ((de, ge), (dm, gm), (da, ga)):
                acc[:, :, sl] = x.movedim(0, 2).flatten(2)
        ws.close()
        return None, dq, dk, dt, dw2, de, dm, da, *dP, *(dZ or [None] * nl)


def titans_scan(q, k, t, w2, eta, mom, dec, P, W, S, layers, segs: list[Segment], eps: float):
    """Titans-form scan over [B, H, L, D] inputs (compute dtype): t = ln_w * (ln_b - target)
    [B, H, L, D], w2 = ln_w**2 [1, H, 1, D]; eta, mom, dec [B, H, L]; P, W, S: {name: [B, H, ...]}
    with ``layers`` the (weight, bias) names. Returns z [B, H, L, D] (the fast model's output for
    the queries, before LN) and the final P, W, S dicts."""
    aug = lambda d, Wn, bn: torch.cat((d[Wn], d[bn]), dim=-2)
    Pa = [aug(P, *names) for names in layers]
    # by rows where Din + 1 <= Dout (the cheaper read and carry), else by columns
    Za = [torch.cat((aug(W, *nm), aug(S, *nm)), dim=-2 if Pl.shape[-2] <= Pl.shape[-1] else -1)
          for nm, Pl in zip(layers, Pa)]  # fmt: skip
    tensors = (q, k, t, w2, eta, mom, dec, *Pa, *Za)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        z, *rest = _TitansScan.apply((segs, eps), *tensors)
        Pf, Zf = rest[: len(layers)], rest[len(layers) :]
    else:
        z, Pf, Zf, _ = _scan_fwd(q, k, t, w2, eta, mom, dec, Pa, Za, segs, eps, False)
    Pd, Wd, Sd = {}, {}, {}
    for (Wn, bn), Pl, Zl, r in zip(layers, Pf, Zf, _layouts(Pf, Zf)):
        for out, m in ((Pd, Pl), (Wd, _halves(Zl, r)[0]), (Sd, _halves(Zl, r)[1])):
            out[Wn], out[bn] = m[..., :-1, :], m[..., -1:, :]
    return z, Pd, Wd, Sd
