"""The fused Titans-form TTT-Linear ops as ``torch.library`` custom ops: ``ttt::titans_fwd`` and
``ttt::titans_bwd``, each with a fake implementation, and autograd linking the two.

Rule (ttt-core's Titans form, causal): per token j, gradients at the mini-batch's start weights P,

    S_j = m_j S_{j-1} - eta_j grad l_j(P),   W_j = (1 - a_j) W_{j-1} + S_j,   o_j from W_j

with S carried across mini-batches and P <- W at each mini-batch end. Shapes (the ops check
them, the dtypes and q's device: ``check_contract``; the public function ``ttt_cuda.titans``
validates user input with ttt-core's messages):

    q, k, v [B, H, L, D]; eta, mom, dec [B, H, L] acc dtype
    W0, C0, S0 [B, H, D, D] acc: the state's P, current weights W and momentum S; b0, cb0, sb0 [B, H, D]
    ln_weight, ln_bias [H, D] acc

``titans_fwd`` returns ``(o, W_end, b_end, S_end, sb_end, W_starts, b_starts, S_starts,
sb_starts)``: the weights and momentum after the last token and, per segment, P and S at its start
(the backward recomputes from them: nseg * 2 D (D + 1) floats per chain). S_starts/sb_starts are
not differentiable outputs. ``reconstruction_target`` / ``output_residual``: ttt-core's options, as
``ttt::linear_fwd``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ttt_cuda.ops.launch import (
    check_contract,
    first_order_only,
    launch,
    num_segments,
    params,
    rowmajor,
)

__all__ = ["titans_bwd", "titans_fwd"]


def titans_params(q, k, v, eta, mom, dec, ln_weight, ln_bias, mini_batch_size, eps, offset,
                  unbounded, reconstruction_target, output_residual, kind="titans"):  # fmt: skip
    """The launch params of a Titans-form op (``kind``: "titans" or "titans_mlp"): the shared
    fields plus the momentum and decay pointers."""
    # scale is unused by the Titans form (no token scale): pass any acc tensor's pointer
    p = params(kind, q, k, v, eta, ln_weight, ln_bias, ln_weight, mini_batch_size, True, eps,
               False, offset, unbounded, reconstruction_target, output_residual)  # fmt: skip
    p.mom, p.dec = mom.data_ptr(), dec.data_ptr()
    return p


@torch.library.custom_op("ttt::titans_fwd", mutates_args=())
def titans_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    mom: Tensor,
    dec: Tensor,
    W0: Tensor,
    b0: Tensor,
    C0: Tensor,
    cb0: Tensor,
    S0: Tensor,
    sb0: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    eps: float,
    offset: int = 0,
    unbounded: bool = False,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused Titans-form TTT-Linear forward; see the module docstring for shapes.

    ``offset``: in-mini-batch position of token 0 (a state cut inside a mini-batch: P = W0, the
    current weights C0 may differ). ``unbounded``: the call ends inside its first mini-batch (b
    None, or b > offset + L; ``mini_batch_size`` is then offset + L, the one segment never
    completes).
    """
    check_contract("titans_fwd", q, {"k": k, "v": v}, {
        "eta": (eta, "B H L"), "mom": (mom, "B H L"), "dec": (dec, "B H L"),
        "W0": (W0, "B H D D"), "b0": (b0, "B H D"), "C0": (C0, "B H D D"), "cb0": (cb0, "B H D"),
        "S0": (S0, "B H D D"), "sb0": (sb0, "B H D"),
        "ln_weight": (ln_weight, "H D"), "ln_bias": (ln_bias, "H D"),
    })  # fmt: skip
    q, k, v = rowmajor(q), rowmajor(k), rowmajor(v)
    eta, mom, dec = eta.contiguous(), mom.contiguous(), dec.contiguous()
    W0, b0, C0, cb0, S0, sb0 = (t.contiguous() for t in (W0, b0, C0, cb0, S0, sb0))
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    B, H, L, D = q.shape
    nseg = num_segments(L, mini_batch_size, offset)
    o = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    W_end, b_end, S_end, sb_end = (torch.empty_like(t) for t in (W0, b0, S0, sb0))
    W_starts, S_starts = (W0.new_empty(B, H, nseg, D, D) for _ in range(2))
    b_starts, sb_starts = (b0.new_empty(B, H, nseg, D) for _ in range(2))
    p = titans_params(q, k, v, eta, mom, dec, ln_weight, ln_bias, mini_batch_size, eps, offset,
                       unbounded, reconstruction_target, output_residual)  # fmt: skip
    p.W0, p.b0, p.C0, p.cb0 = W0.data_ptr(), b0.data_ptr(), C0.data_ptr(), cb0.data_ptr()
    p.S0, p.sb0, p.o = S0.data_ptr(), sb0.data_ptr(), o.data_ptr()
    p.W_end, p.b_end, p.S_end, p.sb_end = (t.data_ptr() for t in (W_end, b_end, S_end, sb_end))
    p.W_starts, p.b_starts = W_starts.data_ptr(), b_starts.data_ptr()
    p.S_starts, p.sb_starts = S_starts.data_ptr(), sb_starts.data_ptr()
    launch("titans", p, q.device, backward=False)
    return o, W_end, b_end, S_end, sb_end, W_starts, b_starts, S_starts, sb_starts


@titans_fwd.register_fake
def _(q, k, v, eta, mom, dec, W0, b0, C0, cb0, S0, sb0, ln_weight, ln_bias, mini_batch_size, eps,
      offset=0, unbounded=False, reconstruction_target="residual", output_residual=True):  # fmt: skip
    B, H, L, D = q.shape
    nseg = num_segments(L, mini_batch_size, offset)
    return (
        q.new_empty(B, H, L, D),
        *(t.new_empty(t.shape) for t in (W0, b0, S0, sb0)),
        W0.new_empty(B, H, nseg, D, D),
        b0.new_empty(B, H, nseg, D),
        W0.new_empty(B, H, nseg, D, D),
        b0.new_empty(B, H, nseg, D),
    )


@torch.library.custom_op("ttt::titans_bwd", mutates_args=())
def titans_bwd(
    dO: Tensor,
    dW_end: Tensor,
    db_end: Tensor,
    dS_end: Tensor,
    dsb_end: Tensor,
    dW_starts: Tensor | None,
    db_starts: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    mom: Tensor,
    dec: Tensor,
    C0: Tensor,
    cb0: Tensor,
    W_starts: Tensor,
    b_starts: Tensor,
    S_starts: Tensor,
    sb_starts: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    mini_batch_size: int,
    eps: float,
    offset: int = 0,
    unbounded: bool = False,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor,
]:  # fmt: skip
    """Fused Titans-form backward: recomputes each segment from its stored P and S.

    Returns ``(dq, dk, dv, deta, dmom, ddec, dW0, db0, dC0, dcb0, dS0, dsb0, dln_weight,
    dln_bias)``; dln_* are reduced over the batch here (fixed order, deterministic).
    """
    check_contract("titans_bwd", q, {"k": k, "v": v, "dO": dO}, {
        "dW_end": (dW_end, "B H D D"), "db_end": (db_end, "B H D"),
        "dS_end": (dS_end, "B H D D"), "dsb_end": (dsb_end, "B H D"),
        "dW_starts": (dW_starts, "B H nseg D D"), "db_starts": (db_starts, "B H nseg D"),
        "eta": (eta, "B H L"), "mom": (mom, "B H L"), "dec": (dec, "B H L"),
        "C0": (C0, "B H D D"), "cb0": (cb0, "B H D"),
        "W_starts": (W_starts, "B H nseg D D"), "b_starts": (b_starts, "B H nseg D"),
        "S_starts": (S_starts, "B H nseg D D"), "sb_starts": (sb_starts, "B H nseg D"),
        "ln_weight": (ln_weight, "H D"), "ln_bias": (ln_bias, "H D"),
    }, nseg=num_segments(q.shape[2], mini_batch_size, offset))  # fmt: skip
    q, k, v, dO = rowmajor(q), rowmajor(k), rowmajor(v), rowmajor(dO)
    eta, mom, dec = eta.contiguous(), mom.contiguous(), dec.contiguous()
    C0, cb0, ln_weight, ln_bias = (t.contiguous() for t in (C0, cb0, ln_weight, ln_bias))
    starts = [t.contiguous() for t in (W_starts, b_starts, S_starts, sb_starts)]
    d_end = [t.contiguous() for t in (dW_end, db_end, dS_end, dsb_end)]
    B, H, L, D = q.shape
    acc = W_starts.dtype
    dq, dk, dv = (torch.empty(B, H, L, D, device=q.device, dtype=q.dtype) for _ in range(3))
    deta, dmom, ddec = (torch.empty(B, H, L, device=q.device, dtype=acc) for _ in range(3))
    dW0, dC0, dS0 = (C0.new_empty(C0.shape) for _ in range(3))
    db0, dcb0, dsb0, dlnw, dlnb = (cb0.new_empty(cb0.shape) for _ in range(5))
    p = titans_params(q, k, v, eta, mom, dec, ln_weight, ln_bias, mini_batch_size, eps, offset,
                       unbounded, reconstruction_target, output_residual)  # fmt: skip
    if dW_starts is not None and db_starts is not None:
        dW_starts, db_starts = dW_starts.contiguous(), db_starts.contiguous()
        p.dW_starts, p.db_starts = dW_starts.data_ptr(), db_starts.data_ptr()
    p.do_sb, p.do_sh, p.do_sl = dO.stride()[:3]
    p.dO = dO.data_ptr()
    p.dW_end, p.db_end, p.dS_end, p.dsb_end = (t.data_ptr() for t in d_end)
    p.C0, p.cb0 = C0.data_ptr(), cb0.data_ptr()
    p.W_starts, p.b_starts, p.S_starts, p.sb_starts = (t.data_ptr() for t in starts)
    p.dq, p.dk, p.dv, p.deta = dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), deta.data_ptr()
    p.dmom, p.ddec = dmom.data_ptr(), ddec.data_ptr()
    p.dW0, p.db0, p.dC0, p.dcb0 = dW0.data_ptr(), db0.data_ptr(), dC0.data_ptr(), dcb0.data_ptr()
    p.dS0, p.dsb0 = dS0.data_ptr(), dsb0.data_ptr()
    p.dln_w, p.dln_b = dlnw.data_ptr(), dlnb.data_ptr()
    launch("titans", p, q.device, backward=True)
    return (dq, dk, dv, deta, dmom, ddec, dW0, db0, dC0, dcb0, dS0, dsb0, dlnw.sum(0),
            dlnb.sum(0))  # fmt: skip


@titans_bwd.register_fake
def _(dO, dW_end, db_end, dS_end, dsb_end, dWs, dbs, q, k, v, eta, mom, dec, C0, cb0, *rest):
    ln_weight = rest[4]
    B, H, L, D = q.shape
    acc = C0.dtype
    return (
        *(q.new_empty(B, H, L, D) for _ in range(3)),
        *(eta.new_empty(B, H, L, dtype=acc) for _ in range(3)),
        C0.new_empty(C0.shape),
        cb0.new_empty(cb0.shape),
        C0.new_empty(C0.shape),
        cb0.new_empty(cb0.shape),
        C0.new_empty(C0.shape),
        cb0.new_empty(cb0.shape),
        ln_weight.new_empty(H, D),
        ln_weight.new_empty(H, D),
    )


_DEFAULTS = {"offset": 0, "unbounded": False, "reconstruction_target": "residual",
             "output_residual": True}  # fmt: skip
_NAMES = ("q", "k", "v", "eta", "mom", "dec", "W0", "b0", "C0", "cb0", "S0", "sb0", "ln_weight",
          "ln_bias", "mini_batch_size", "eps", *_DEFAULTS)  # fmt: skip


def _setup_context(ctx, inputs, output):
    a = {**_DEFAULTS, **dict(zip(_NAMES, inputs))}  # by name (trailing defaults omitted)
    W_starts, b_starts, S_starts, sb_starts = output[5:]
    # an output the loss does not use gets None, not a materialised zero gradient: the per-segment
    # start weights are large (nseg copies of the weights) and rarely used
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(S_starts, sb_starts)
    ctx.save_for_backward(a["q"], a["k"], a["v"], a["eta"], a["mom"], a["dec"], a["C0"], a["cb0"],
                          W_starts, b_starts, S_starts, sb_starts, a["ln_weight"],
                          a["ln_bias"])  # fmt: skip
    ctx.kw = {n: a[n] for n in ("mini_batch_size", "eps", *_DEFAULTS)}


def _backward(ctx, dO, dW_end, db_end, dS_end, dsb_end, dW_starts, db_starts, _dS, _dsb):
    first_order_only("Titans TTT-Linear")
    q, k, v, eta, mom, dec, C0, cb0, W_starts, b_starts, S_starts, sb_starts, lnw, lnb = (
        ctx.saved_tensors
    )
    if dO is None:
        dO = torch.zeros_like(q)
    d_end = [
        torch.zeros_like(ref) if g is None else g
        for g, ref in zip((dW_end, db_end, dS_end, dsb_end), (C0, cb0, C0, cb0))
    ]
    if dW_starts is None and db_starts is None:
        d_starts = (None, None)
    else:
        d_starts = tuple(
            torch.zeros_like(ref) if g is None else g
            for g, ref in zip((dW_starts, db_starts), (W_starts, b_starts))
        )
    kw = ctx.kw
    dq, dk, dv, deta, dmom, ddec, dW0, db0, dC0, dcb0, dS0, dsb0, dlnw, dlnb = titans_bwd(
        dO, *d_end, *d_starts, q, k, v, eta, mom, dec, C0, cb0, W_starts, b_starts, S_starts,
        sb_starts, lnw, lnb, kw["mini_batch_size"], kw["eps"], *(kw[n] for n in _DEFAULTS),
    )  # fmt: skip
    return (dq, dk, dv, deta, dmom, ddec, dW0, db0, dC0, dcb0, dS0, dsb0, dlnw, dlnb, None, None,
            None, None, None, None)  # fmt: skip


titans_fwd.register_autograd(_backward, setup_context=_setup_context)
