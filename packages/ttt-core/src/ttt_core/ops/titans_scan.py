"""The ``torch`` backend's Titans form (momentum + decay): one autograd Function, hand-written backward.

Same semantics as :mod:`ttt_core.ops.scan` (DESIGN.md). A mini-batch segment has gradient point P
(its start weights), current weights W_0 and momentum S_0; per fast layer, key-side inputs X_t and
output gradients g_t (at P). Biases ride along as a last row of ones in the inputs (``x_aug = [x, 1]``,
``W_aug = [W; b]``), and each layer's carry is one matrix ``Z = [W_aug | S_aug]`` [Din+1, 2 Dout]:

    query i:  Y_i = D_i (h_i W_0) + c0_i (h_i S_0) - sum_t CE_it (h_i . X_t) g_t     (one GEMM h Z;
              with the ones column, h_i . X_t is the dual form's q.k + 1)
    carry:    W'  = D_last W_0 + c0_last S_0 - X^T (wW g),   S' = m_last S_0 - X^T (wS g)
              (one GEMM X^T [wW g | wS g])

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
blocks done in one batched step. First order only: a backward with ``create_graph=True`` raises
(use ``form="primal"`` or the ``generic`` backend for double backward). Tested against the autograd
path (``form="primal"``) and the naive loop in fp64 (``tests/test_titans_scan.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import Segment, ln_loss_grad_parts, segment_products, stack_group

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


def _sub_mm_(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``out -= a @ b`` in place for [B, H, ...] stacks (fresh outputs cost page faults on CPU)."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.flatten(0, 1), b.flatten(0, 1), alpha=-1.0)
    return out


def _gelu_fwd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[gelu_tanh(x), 1] (the ones column of the next layer's input), gelu_tanh'(x) and
    ``s = sigmoid(2u)`` (u the tanh argument), with few fresh tensors (each costs page faults).
    ``0.5 (1 + tanh(u)) = sigmoid(2u)``: one sigmoid instead of a tanh (much faster on CPU)."""
    x2 = x * x
    s = x2.mul(2.0 * _C * _K).add_(2.0 * _C).mul_(x).sigmoid_()
    q = x2.mul_(6.0 * _C * _K).add_(2.0 * _C)  # d(2u)/dx, in x2's memory
    ya = x.new_empty((*x.shape[:-1], x.shape[-1] + 1))
    ya[..., -1] = 1.0
    y = torch.mul(x, s, out=ya[..., :-1])
    dy = (y * s).neg_().add_(y).mul_(q).add_(s)  # s + x s (1 - s) q
    return ya, dy, s


def _gelu_grad2(x: Tensor, s: Tensor) -> Tensor:
    """d^2 gelu_tanh(x) / dx^2 from ``s = sigmoid(2u)``."""
    x2 = x * x
    q = x2.mul(6.0 * _C * _K).add_(2.0 * _C)  # 2C (1 + 3K x^2)
    out = s.mul(-2.0).add_(1.0).mul_(x).mul_(q).add_(2.0).mul_(q)  # 2q + x (1 - 2s) q^2
    out.add_(x2, alpha=12.0 * _C * _K)
    return out.mul_(torch.addcmul(s, s, s, value=-1.0, out=x2))  # times s - s^2 (in x2's memory)


def _ln_grad_bwd(a: Tensor, cache, w2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`_ln_grad_fwd` for ``a = dL/dg``: (dL/dz, dL/dt, dL/dw2 per token)."""
    xh, r, dx, s, g = cache
    a_xh = (a * xh).mean(dim=-1, keepdim=True)
    g_dx = r * (a - a.mean(dim=-1, keepdim=True) - xh * a_xh)
    g_xh = g_dx * w2 - r * (s * a + a_xh * dx)
    g_r = (a * g).sum(dim=-1, keepdim=True) * (r / xh.shape[-1])  # (dL/dr) * r^2 / D
    gx = (g_xh * xh).mean(dim=-1, keepdim=True)
    g_z = r * (g_xh - g_xh.mean(dim=-1, keepdim=True) - xh * gx) - g_r * xh
    return g_z, g_dx, g_dx * xh


def _segment_products_bwd(mat: Tensor, cum: Tensor, dmat: Tensor, dcum: Tensor) -> Tensor:
    """Backward of ``segment_products`` (zero-safe, no division): ``d mat_jt / d x_r =
    mat_{r-1,t} mat_jr`` for t < r <= j and ``d cum_j / d x_r = cum_{r-1} mat_jr``.

    Matrix-vector products are written as multiply + sum: a batched matmul of many tiny
    matrices costs about a microsecond per matrix on CPU."""
    dx = (mat * dcum.unsqueeze(-1)).sum(dim=-2)  # (..., n): sum_j mat_jr dcum_j
    dx[..., 1:] *= cum[..., :-1]  # cum_{r-1}; 1 at r = 0
    Q = _t(mat) @ dmat  # Q[r, t] = sum_j mat_jr dmat_jt
    dx[..., 1:] += (Q[..., 1:, :] * mat[..., :-1, :]).sum(dim=-1)  # times mat_{r-1,t}; 0 at r = 0
    return dx


# ----------------------------------------------------------------------------------------------
# coefficients of a group of N equally long blocks: [N, B, H, n(, n)]
# ----------------------------------------------------------------------------------------------
def _coefs_fwd(eta: Tensor, mom: Tensor, dec: Tensor) -> dict[str, Tensor]:
    # the momentum and the decay products in one call: mats [2, N, B, H, n, n], cums [2, ..., n]
    mats, cums = segment_products(torch.stack((mom, 1.0 - dec)))
    (M, A), (mc, Dv) = mats.unbind(0), cums.unbind(0)
    C = A @ M
    CE = C * eta.unsqueeze(-2)
    c0 = (A * mc.unsqueeze(-2)).sum(dim=-1)  # A @ mc
    return {
        "mats": mats, "cums": cums, "C": C, "CE": CE,
        "Dc": torch.stack((Dv, c0), dim=-1),  # (..., n, 2): weights of W_0 and S_0 in W_i
        "w": torch.stack((CE[..., -1, :], M[..., -1, :] * eta), dim=-1),  # (..., n, 2): wW, wS
        "fac": torch.stack((Dv[..., -1], mc[..., -1], c0[..., -1]), dim=-1),  # D_last, m_last, c0_last
    }  # fmt: skip


def _coefs_bwd(co, eta, dCE, dw, dDc, dfac):
    """Gradients of eta, momentum and decay [N, B, H, n] from those of the coefficients
    (``dCE``, ``dDc`` are the caller's own stacks: updated in place)."""
    (M, A), mc = co["mats"].unbind(0), co["cums"][0]
    dCE[..., -1, :] += dw[..., 0]
    de = (dCE * co["C"]).sum(dim=-2) + dw[..., 1] * M[..., -1, :]
    dC = dCE.mul_(eta.unsqueeze(-2))
    dmats = torch.empty_like(co["mats"])  # [dM, dA], both sides' products backward in one call
    dM = torch.matmul(_t(A), dC, out=dmats[0])
    dM[..., -1, :] += dw[..., 1] * eta
    dcums = dDc.movedim(-1, 0).flip(0)  # [dc0, dD]: dc0 becomes dmc below, dD stays
    dD, dc0 = dcums[1], dcums[0].clone()
    dD[..., -1] += dfac[..., 0]
    dc0[..., -1] += dfac[..., 2]
    torch.matmul(dC, _t(M), out=dmats[1]).addcmul_(dc0.unsqueeze(-1), mc.unsqueeze(-2))  # dA
    dcums[0] = (A * dc0.unsqueeze(-1)).sum(dim=-2)  # dmc = A^T dc0
    dcums[0][..., -1] += dfac[..., 1]
    dx = _segment_products_bwd(co["mats"], co["cums"], dmats, dcums)  # [2, N, B, H, n]
    return de, dx[0], dx[1].neg_()


# ----------------------------------------------------------------------------------------------
# the key pass of a mini-batch segment (at P) and one block of queries
# ----------------------------------------------------------------------------------------------
def _key_fwd(P: list[Tensor], ka: Tensor, t: Tensor, w2: Tensor, eps: float):
    """Inputs X (with the ones column) and output gradients g of every layer at P, and a cache."""
    z1 = ka @ P[0]  # (B, H, n, F)
    if len(P) == 1:
        g1, ln = ln_loss_grad_parts(z1, t, w2, eps)
        return [ka], [g1], (ln,)
    x2a, d1, s1 = _gelu_fwd(z1)
    g2, ln = ln_loss_grad_parts(x2a @ P[1], t, w2, eps)  # (B, H, n, D)
    gp = g2 @ _t(P[1][..., :-1, :])  # (B, H, n, F)
    return [ka, x2a], [gp * d1, g2], (ln, z1, d1, s1, gp)


def _key_bwd(P: list[Tensor], xs, gs, cache, dX, dg, w2):
    """dk, dt, dw2 and the gradients of P from those of the key-side X and g."""
    if len(P) == 1:
        (ln,) = cache
        dz1, dt, dw2 = _ln_grad_bwd(dg[0], ln, w2)
        dP = []
    else:
        ln, z1, d1, s1, gp = cache
        W2 = P[1][..., :-1, :]
        dgp = dg[0] * d1
        dz2, dt, dw2 = _ln_grad_bwd(dg[1] + dgp @ W2, ln, w2)
        dx2 = (dz2 @ _t(W2)).add_(dX[1][..., :-1])  # (B, H, n, F): dL/d gelu(z1)
        # dg[0] is this backward's own accumulator: reused in place (fresh tensors cost page faults)
        dz1 = dg[0].mul_(gp).mul_(_gelu_grad2(z1, s1)).addcmul_(dx2, d1)
        dP2 = _t(xs[1]) @ dz2
        dP2[..., :-1, :] += _t(dgp) @ gs[1]
        dP = [dP2]
    dk = dX[0][..., :-1] + dz1 @ _t(P[0][..., :-1, :])
    return dk, dt, dw2, [_t(xs[0]) @ dz1, *dP]


def _block_fwd(Z: list[Tensor], qa, xs, gs, co, kern1, att1, save: bool):
    """One block of queries: z [B, H, n, D] and the carry Z after it (and a cache)."""
    Dc, CE, w = co["Dc"], co["CE"], co["w"]
    h, cache = qa, []
    for li, (Zl, x, g) in enumerate(zip(Z, xs, gs)):
        d = g.shape[-1]
        base = h @ Zl  # (B, H, n, 2 Dout): h W_0 | h S_0
        kern, att = (kern1, att1) if li == 0 else (None, None)
        if kern is None:
            kern = h @ _t(x)  # (B, H, n, n): h_i . x_t + 1
            att = kern * CE
        y = (base[..., :d] * Dc[..., :1]).addcmul_(base[..., d:], Dc[..., 1:])
        y = _sub_mm_(y, att, g)
        entry = [h, base, kern, att]
        if li + 1 < len(Z):
            h, dy, _ = _gelu_fwd(y)  # with the ones column
            entry.append(dy)
        if save:
            cache.append(entry)
    fac = co["fac"]  # (B, H, 3): D_last, m_last, c0_last
    Zn = []
    for li, (Zl, x, g) in enumerate(zip(Z, xs, gs)):
        d = g.shape[-1]
        gw = (g.unsqueeze(-2) * w.unsqueeze(-1)).flatten(-2)  # (B, H, n, 2 Dout): [wW g | wS g]
        Zo = _sub_mm_(Zl * _scale(fac, d), _t(x), gw)  # [D_last W - U_W | m_last S - U_S]
        Zo[..., :d].addcmul_(Zl[..., d:], fac[..., 2, None, None])  # + c0_last S
        Zn.append(Zo)
        if save:
            cache[li].append(gw)
    return y, Zn, cache


def _scale(fac: Tensor, d: int) -> Tensor:
    """The carry's per-column factor [D_last] * d + [m_last] * d as a row (B, H, 1, 2d)."""
    return fac[..., :2, None].expand(*fac.shape[:-1], 2, d).flatten(-2).unsqueeze(-2)


def _block_bwd(Z, xs, gs, cache, co, dz, dZo):
    """Backward of one block: dq, dX, dg of its tokens, dZ before it, coefficient gradients."""
    Dc, CE, w, fac = co["Dc"], co["CE"], co["w"], co["fac"]
    n = dz.shape[-2]
    dX, dg, dZ = [None] * len(Z), [None] * len(Z), [None] * len(Z)
    dDc = dCE = 0.0
    dw = dfac = None
    dy = dz
    for li in reversed(range(len(Z))):
        Zl, x, g = Z[li], xs[li], gs[li]
        h, base, kern, att = cache[li][:4]
        d = g.shape[-1]
        dbase = (dy.unsqueeze(-2) * Dc.unsqueeze(-1)).flatten(-2)  # (B, H, n, 2 Dout)
        dDc = dDc + (dy.unsqueeze(-2) * base.unflatten(-1, (2, d))).sum(dim=-1)
        dZl = _t(h) @ dbase
        datt = dy @ _t(g)  # (B, H, n, n), sign: y = ... - att @ g
        dCE = -(datt * kern) if li == len(Z) - 1 else dCE.addcmul_(datt, kern, value=-1.0)
        dkern = datt.mul_(CE)  # minus the kernel's gradient
        dh = _sub_mm_(dbase @ _t(Zl), dkern, x)
        dX_l = (_t(dkern) @ h).neg_()
        dg_l = (_t(att) @ dy).neg_()
        if dZo is not None:  # Z' = Z * [D_last | m_last] + [c0_last S | 0] - X^T [wW g | wS g]
            dZol = dZo[li]
            prod = (dZol * Zl).sum(dim=-2)  # (B, H, 2 Dout)
            fl = torch.stack(
                (
                    prod[..., :d].sum(dim=-1),
                    prod[..., d:].sum(dim=-1),
                    (dZol[..., :d] * Zl[..., d:]).sum(dim=(-1, -2)),
                ),
                dim=-1,
            )
            dfac = fl if dfac is None else dfac + fl
            dZl.addcmul_(dZol, _scale(fac, d))
            dZl[..., d:].addcmul_(dZol[..., :d], fac[..., 2, None, None])
            V = (x @ dZol).unflatten(-1, (2, d))  # (B, H, n, 2, Dout) = -dL/d[wW g | wS g]
            dwl = (V * g.unsqueeze(-2)).sum(dim=-1)  # (B, H, n, 2), minus dL/dw
            dw = dwl.neg_() if dw is None else dw.sub_(dwl)
            dg_l.addcmul_(V[..., 0, :], w[..., :1], value=-1.0)
            dg_l.addcmul_(V[..., 1, :], w[..., 1:], value=-1.0)
            _sub_mm_(dX_l, cache[li][-1], _t(dZol))  # gw = [wW g | wS g]
        dX[li], dg[li], dZ[li] = dX_l, dg_l, dZl
        if li > 0:
            dy = dh[..., :-1] * cache[li - 1][4]  # through gelu of the previous layer's output
    if dw is None:  # nothing flows back from the carry after this block
        dw, dfac = dz.new_zeros((*dz.shape[:2], n, 2)), dz.new_zeros((*dz.shape[:2], 3))
    return dh[..., :-1], dX, dg, dZ, (dCE, dw, dDc, dfac)


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
    qa, ka = _ones_col(q), _ones_col(k)
    per_seg, groups = _plan(segs)
    coefs = {}
    gsaved = []
    for grp in groups:
        es = stack_group(eta, grp)
        co = _coefs_fwd(es, stack_group(mom, grp), stack_group(dec, grp))
        kern = stack_group(qa, grp) @ _t(stack_group(ka, grp))  # layer-1 kernels of the group
        att = kern * co["CE"]
        parts = {n: co[n].unbind(0) for n in ("Dc", "CE", "w", "fac")}  # what the blocks read
        for i, b in enumerate(grp):
            coefs[b] = ({n: v[i] for n, v in parts.items()}, kern[i], att[i])
        gsaved.append((grp, co, es))
    outs, saved = [], []
    for seg, blocks in zip(segs, per_seg):
        sl = slice(seg.start, seg.start + seg.length)
        xs, gs, kcache = _key_fwd(P, ka[:, :, sl], t[:, :, sl], w2, eps)
        bsaved = []
        for b in blocks:
            r = slice(b.rel, b.rel + b.length)
            xb, gb = [x[:, :, r] for x in xs], [g[:, :, r] for g in gs]
            co, kern, att = coefs[b]
            y, Zn, cache = _block_fwd(Z, qa[:, :, b.start : b.start + b.length], xb, gb, co,
                                      kern, att, save)  # fmt: skip
            outs.append(y)
            if save:
                bsaved.append((b, Z, xb, gb, cache))
            Z = Zn
        if save:
            saved.append((seg, P, xs, gs, kcache, bsaved))
        if seg.completes:
            P = [Zl[..., : Pl.shape[-1]] for Zl, Pl in zip(Z, P)]
    return torch.cat(outs, dim=2), P, Z, (saved, gsaved, coefs)


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
        (saved, gsaved, coefs), w2, like = ctx.saved, ctx.w2, ctx.like
        nl = len(like) // 2
        full = lambda g, r: torch.zeros_like(r) if g is None else g
        dP = None if all(g is None for g in dflat[:nl]) else list(map(full, dflat[:nl], like[:nl]))
        dZ = None if all(g is None for g in dflat[nl:]) else list(map(full, dflat[nl:], like[nl:]))
        if dz is None:
            dz = w2.new_zeros(ctx.shape)
        dq, dk, dt = (torch.empty_like(dz) for _ in range(3))
        dw2 = torch.zeros_like(w2)
        cgrads = {}
        for seg, P, xs, gs, kcache, bsaved in reversed(saved):
            if seg.completes and dP is not None:  # P after the segment = W after it
                if dZ is None:
                    dZ = [torch.zeros_like(r) for r in like[nl:]]
                dZ = [torch.cat((Zg[..., : Pg.shape[-1]] + Pg, Zg[..., Pg.shape[-1] :]), dim=-1)
                      for Zg, Pg in zip(dZ, dP)]  # fmt: skip
                dP = None
            if len(bsaved) > 1:  # accumulated over the segment's blocks
                dX = [torch.empty_like(x) for x in xs]
                dg = [torch.empty_like(g) for g in gs]
            for b, Z, xb, gb, cache in reversed(bsaved):
                r = slice(b.rel, b.rel + b.length)
                co = coefs[b][0]
                dqb, dXb, dgb, dZ, cgrads[b] = _block_bwd(
                    Z, xb, gb, cache, co, dz[:, :, b.start : b.start + b.length], dZ
                )
                dq[:, :, b.start : b.start + b.length] = dqb
                if len(bsaved) == 1:
                    dX, dg = dXb, dgb
                    continue
                for acc, gr in zip(dX + dg, dXb + dgb):
                    acc[:, :, r] = gr  # blocks do not overlap
            sl = slice(seg.start, seg.start + seg.length)
            dk[:, :, sl], dt[:, :, sl], dw2_s, dPk = _key_bwd(P, xs, gs, kcache, dX, dg, w2)
            dw2 += dw2_s.sum(dim=(0, 2), keepdim=True)
            dP = dPk if dP is None else [a + b_ for a, b_ in zip(dP, dPk)]
        de, dm, da = (torch.empty_like(dz[..., 0]) for _ in range(3))
        for grp, co, es in gsaved:
            stacked = [torch.stack(x) for x in zip(*(cgrads[b] for b in grp))]
            ge, gm, ga = _coefs_bwd(co, es, *stacked)
            sl = slice(grp[0].start, grp[0].start + len(grp) * grp[0].length)
            for acc, x in ((de, ge), (dm, gm), (da, ga)):
                acc[:, :, sl] = x.movedim(0, 2).flatten(2)
        return None, dq, dk, dt, dw2, de, dm, da, *dP, *(dZ or [None] * nl)


def titans_scan(q, k, t, w2, eta, mom, dec, P, W, S, layers, segs: list[Segment], eps: float):
    """Titans-form scan over [B, H, L, D] inputs (compute dtype): t = ln_w * (ln_b - target)
    [B, H, L, D], w2 = ln_w**2 [1, H, 1, D]; eta, mom, dec [B, H, L]; P, W, S: {name: [B, H, ...]}
    with ``layers`` the (weight, bias) names. Returns z [B, H, L, D] (the fast model's output for
    the queries, before LN) and the final P, W, S dicts."""
    aug = lambda d, Wn, bn: torch.cat((d[Wn], d[bn]), dim=-2)
    Pa = [aug(P, *names) for names in layers]
    Za = [torch.cat((aug(W, *names), aug(S, *names)), dim=-1) for names in layers]
    tensors = (q, k, t, w2, eta, mom, dec, *Pa, *Za)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        z, *rest = _TitansScan.apply((segs, eps), *tensors)
        Pf, Zf = rest[: len(layers)], rest[len(layers) :]
    else:
        z, Pf, Zf, _ = _scan_fwd(q, k, t, w2, eta, mom, dec, Pa, Za, segs, eps, False)
    Pd, Wd, Sd = {}, {}, {}
    for (Wn, bn), Pl, Zl in zip(layers, Pf, Zf):
        d = Pl.shape[-1]
        for out, m in ((Pd, Pl), (Wd, Zl[..., :d]), (Sd, Zl[..., d:])):
            out[Wn], out[bn] = m[..., :-1, :], m[..., -1:, :]
    return z, Pd, Wd, Sd
