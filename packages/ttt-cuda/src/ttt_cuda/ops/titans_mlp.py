"""The fused Titans-form TTT-MLP ops (C++ CPU path only) as ``torch.library`` custom ops:
``ttt::titans_mlp_fwd`` and ``ttt::titans_mlp_bwd``, each with a fake implementation, and autograd
linking the two (as ``ops/titans.py`` for the linear model).

Rule (ttt-core's Titans form, causal), per fast layer of ``f(x) = gelu_tanh(x W1 + b1) W2 + b2``:
per token j, gradients at the mini-batch's start weights P,

    S_j = m_j S_{j-1} - eta_j grad l_j(P),   W_j = (1 - a_j) W_{j-1} + S_j,   o_j from W_j

with S carried across mini-batches and P <- W at each mini-batch end. Shapes (the ops check
them, the dtypes and q's device: ``check_contract``; the public function ``ttt_cuda.titans``
validates user input with ttt-core's messages):

    q, k, v [B, H, L, D] fp32/fp64; eta, mom, dec [B, H, L] acc dtype
    P = (W10 [B, H, D, F], b10 [B, H, F], W20 [B, H, F, D], b20 [B, H, D]): the gradient point;
    C = (C10, cb10, C20, cb20): the current weights W; S = (S10, sb10, S20, sb20): the momentum
    (C and S in P's shapes, all acc dtype); ln_weight, ln_bias [H, D] acc

``titans_mlp_fwd`` returns ``(o, *W_end, *S_end, *P_starts, *S_starts, *C_starts)``, each group
of four in the order (W1, b1, W2, b2): the weights and momentum after the last token and, per block
([B, H, nblk, ...]: each mini-batch segment read in blocks of at most 32 tokens, the C++ chain's
rule, ``titans_mlp_num_blocks``), P, S and W at its start (the backward recomputes from them).
S_starts and C_starts are not differentiable outputs. ``reconstruction_target`` /
``output_residual``: ttt-core's options.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ttt_cuda._ext import extension
from ttt_cuda.ops.launch import check_contract, first_order_only, launch, rowmajor
from ttt_cuda.ops.titans import titans_params

__all__ = ["titans_mlp_bwd", "titans_mlp_fwd"]


def _titans_mlp_params(q, k, v, eta, mom, dec, ln_weight, ln_bias, F, mini_batch_size, eps,
                       offset, unbounded, reconstruction_target, output_residual):  # fmt: skip
    p = titans_params(q, k, v, eta, mom, dec, ln_weight, ln_bias, mini_batch_size, eps, offset,
                      unbounded, reconstruction_target, output_residual, kind="titans_mlp")  # fmt: skip
    p.F = F
    return p


def _set(p, names: tuple[str, ...], tensors) -> None:
    """Points p.<name> at each tensor (contiguous, kept alive by the caller)."""
    for name, t in zip(names, tensors):
        setattr(p, name, t.data_ptr())


# the params' pointer names per group, in the order (W1, b1, W2, b2)
P_IN = ("W0", "b0", "W20", "b20")
C_IN = ("C0", "cb0", "C20", "cb20")
S_IN = ("S0", "sb0", "S20", "sb20")
W_END = ("W_end", "b_end", "W2_end", "b2_end")
S_END = ("S_end", "sb_end", "S2_end", "sb2_end")
P_STARTS = ("W_starts", "b_starts", "W2_starts", "b2_starts")
S_STARTS = ("S_starts", "sb_starts", "S2_starts", "sb2_starts")
C_STARTS = ("C_starts", "cb_starts", "C2_starts", "cb2_starts")
DW_END = ("dW_end", "db_end", "dW2_end", "db2_end")
DS_END = ("dS_end", "dsb_end", "dS2_end", "dsb2_end")
DP_STARTS = ("dW_starts", "db_starts", "dW2_starts", "db2_starts")
DP_IN = ("dW0", "db0", "dW20", "db20")
DC_IN = ("dC0", "dcb0", "dC20", "dcb20")
DS_IN = ("dS0", "dsb0", "dS20", "dsb20")


# the ops' return types: o and five groups of four; the backward's 20 gradients
FwdOut = tuple[(Tensor,) * 21]
BwdOut = tuple[(Tensor,) * 20]


def num_blocks(L: int, mini_batch_size: int, offset: int, unbounded: bool) -> int:
    """Blocks of a call: the C++ chain's rule (``titans_mlp_num_blocks``)."""
    return extension().titans_mlp_num_blocks(L, mini_batch_size, offset, unbounded)


def _starts_like(weights, nblk: int) -> list[Tensor]:
    """[B, H, nblk, ...] tensors for the per-block starts of four [B, H, ...] weights."""
    return [t.new_empty(*t.shape[:2], nblk, *t.shape[2:]) for t in weights]


@torch.library.custom_op("ttt::titans_mlp_fwd", mutates_args=())
def titans_mlp_fwd(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, mom: Tensor, dec: Tensor,
    W10: Tensor, b10: Tensor, W20: Tensor, b20: Tensor,
    C10: Tensor, cb10: Tensor, C20: Tensor, cb20: Tensor,
    S10: Tensor, sb10: Tensor, S20: Tensor, sb20: Tensor,
    ln_weight: Tensor, ln_bias: Tensor, mini_batch_size: int, eps: float, offset: int = 0,
    unbounded: bool = False, reconstruction_target: str = "residual", output_residual: bool = True,
) -> FwdOut:  # fmt: skip
    """Fused Titans-form TTT-MLP forward; see the module docstring for shapes.

    ``offset``: in-mini-batch position of token 0 (a state cut inside a mini-batch: P = W10.., the
    current weights C10.. may differ). ``unbounded``: the call ends inside its first mini-batch
    (b None, or b > offset + L; ``mini_batch_size`` is then offset + L, the one segment never
    completes).
    """
    check_contract("titans_mlp_fwd", q, {"k": k, "v": v}, {
        "eta": (eta, "B H L"), "mom": (mom, "B H L"), "dec": (dec, "B H L"),
        "W10": (W10, "B H D F"), "b10": (b10, "B H F"),
        "W20": (W20, "B H F D"), "b20": (b20, "B H D"),
        "C10": (C10, "B H D F"), "cb10": (cb10, "B H F"),
        "C20": (C20, "B H F D"), "cb20": (cb20, "B H D"),
        "S10": (S10, "B H D F"), "sb10": (sb10, "B H F"),
        "S20": (S20, "B H F D"), "sb20": (sb20, "B H D"),
        "ln_weight": (ln_weight, "H D"), "ln_bias": (ln_bias, "H D"),
    }, F=W10.shape[-1])  # fmt: skip
    q, k, v = rowmajor(q), rowmajor(k), rowmajor(v)
    eta, mom, dec = eta.contiguous(), mom.contiguous(), dec.contiguous()
    P = [t.contiguous() for t in (W10, b10, W20, b20)]
    C = [t.contiguous() for t in (C10, cb10, C20, cb20)]
    S = [t.contiguous() for t in (S10, sb10, S20, sb20)]
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    B, H, L, D = q.shape
    nblk = num_blocks(L, mini_batch_size, offset, unbounded)
    o = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    W_end, S_end = [torch.empty_like(t) for t in P], [torch.empty_like(t) for t in P]
    P_starts, S_starts, C_starts = (_starts_like(P, nblk) for _ in range(3))
    p = _titans_mlp_params(q, k, v, eta, mom, dec, ln_weight, ln_bias, P[0].shape[-1],
                           mini_batch_size, eps, offset, unbounded, reconstruction_target,
                           output_residual)  # fmt: skip
    for names, ts in ((P_IN, P), (C_IN, C), (S_IN, S), (W_END, W_end), (S_END, S_end),
                      (P_STARTS, P_starts), (S_STARTS, S_starts), (C_STARTS, C_starts)):  # fmt: skip
        _set(p, names, ts)
    p.o = o.data_ptr()
    launch("titans_mlp", p, q.device, backward=False)
    return (o, *W_end, *S_end, *P_starts, *S_starts, *C_starts)


@titans_mlp_fwd.register_fake
def _(q, k, v, eta, mom, dec, W10, b10, W20, b20, *rest, **kw):
    mini_batch_size = rest[10] if len(rest) > 10 else kw["mini_batch_size"]
    offset = rest[12] if len(rest) > 12 else kw.get("offset", 0)
    unbounded = rest[13] if len(rest) > 13 else kw.get("unbounded", False)
    B, H, L, D = q.shape
    nblk = num_blocks(L, mini_batch_size, offset, unbounded)
    P = (W10, b10, W20, b20)
    ends = [t.new_empty(t.shape) for t in (*P, *P)]
    starts = [t for _ in range(3) for t in _starts_like(P, nblk)]
    return (q.new_empty(B, H, L, D), *ends, *starts)


@torch.library.custom_op("ttt::titans_mlp_bwd", mutates_args=())
def titans_mlp_bwd(
    dO: Tensor, dW1_end: Tensor, db1_end: Tensor, dW2_end: Tensor, db2_end: Tensor,
    dS1_end: Tensor, dsb1_end: Tensor, dS2_end: Tensor, dsb2_end: Tensor,
    dW1_starts: Tensor | None, db1_starts: Tensor | None, dW2_starts: Tensor | None,
    db2_starts: Tensor | None,
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, mom: Tensor, dec: Tensor,
    W1_starts: Tensor, b1_starts: Tensor, W2_starts: Tensor, b2_starts: Tensor,
    S1_starts: Tensor, sb1_starts: Tensor, S2_starts: Tensor, sb2_starts: Tensor,
    C1_starts: Tensor, cb1_starts: Tensor, C2_starts: Tensor, cb2_starts: Tensor,
    ln_weight: Tensor, ln_bias: Tensor, mini_batch_size: int, eps: float, offset: int = 0,
    unbounded: bool = False, reconstruction_target: str = "residual", output_residual: bool = True,
) -> BwdOut:  # fmt: skip
    """Fused Titans-form TTT-MLP backward: recomputes each block from its stored P, S and W.

    Returns ``(dq, dk, dv, deta, dmom, ddec, *dP, *dC, *dS, dln_weight, dln_bias)`` (dP, dC, dS:
    the gradients of the inputs P, C, S, four each); dln_* are reduced over the batch here (fixed
    order, deterministic).
    """
    check_contract("titans_mlp_bwd", q, {"k": k, "v": v, "dO": dO}, {
        "dW1_end": (dW1_end, "B H D F"), "db1_end": (db1_end, "B H F"),
        "dW2_end": (dW2_end, "B H F D"), "db2_end": (db2_end, "B H D"),
        "dS1_end": (dS1_end, "B H D F"), "dsb1_end": (dsb1_end, "B H F"),
        "dS2_end": (dS2_end, "B H F D"), "dsb2_end": (dsb2_end, "B H D"),
        "dW1_starts": (dW1_starts, "B H nblk D F"), "db1_starts": (db1_starts, "B H nblk F"),
        "dW2_starts": (dW2_starts, "B H nblk F D"), "db2_starts": (db2_starts, "B H nblk D"),
        "eta": (eta, "B H L"), "mom": (mom, "B H L"), "dec": (dec, "B H L"),
        "W1_starts": (W1_starts, "B H nblk D F"), "b1_starts": (b1_starts, "B H nblk F"),
        "W2_starts": (W2_starts, "B H nblk F D"), "b2_starts": (b2_starts, "B H nblk D"),
        "S1_starts": (S1_starts, "B H nblk D F"), "sb1_starts": (sb1_starts, "B H nblk F"),
        "S2_starts": (S2_starts, "B H nblk F D"), "sb2_starts": (sb2_starts, "B H nblk D"),
        "C1_starts": (C1_starts, "B H nblk D F"), "cb1_starts": (cb1_starts, "B H nblk F"),
        "C2_starts": (C2_starts, "B H nblk F D"), "cb2_starts": (cb2_starts, "B H nblk D"),
        "ln_weight": (ln_weight, "H D"), "ln_bias": (ln_bias, "H D"),
    }, F=dW1_end.shape[-1],
       nblk=num_blocks(q.shape[2], mini_batch_size, offset, unbounded))  # fmt: skip
    q, k, v, dO = rowmajor(q), rowmajor(k), rowmajor(v), rowmajor(dO)
    eta, mom, dec = eta.contiguous(), mom.contiguous(), dec.contiguous()
    P_starts = [t.contiguous() for t in (W1_starts, b1_starts, W2_starts, b2_starts)]
    S_starts = [t.contiguous() for t in (S1_starts, sb1_starts, S2_starts, sb2_starts)]
    C_starts = [t.contiguous() for t in (C1_starts, cb1_starts, C2_starts, cb2_starts)]
    dW_end = [t.contiguous() for t in (dW1_end, db1_end, dW2_end, db2_end)]
    dS_end = [t.contiguous() for t in (dS1_end, dsb1_end, dS2_end, dsb2_end)]
    ln_weight, ln_bias = ln_weight.contiguous(), ln_bias.contiguous()
    B, H, L, D = q.shape
    acc = dW_end[0].dtype
    dq, dk, dv = (torch.empty(B, H, L, D, device=q.device, dtype=q.dtype) for _ in range(3))
    deta, dmom, ddec = (torch.empty(B, H, L, device=q.device, dtype=acc) for _ in range(3))
    dP, dC, dS = ([torch.empty_like(t) for t in dW_end] for _ in range(3))
    dlnw, dlnb = (torch.empty(B, H, D, device=q.device, dtype=acc) for _ in range(2))
    p = _titans_mlp_params(q, k, v, eta, mom, dec, ln_weight, ln_bias, dW_end[0].shape[-1],
                           mini_batch_size, eps, offset, unbounded, reconstruction_target,
                           output_residual)  # fmt: skip
    dP_starts = (dW1_starts, db1_starts, dW2_starts, db2_starts)
    if all(t is not None for t in dP_starts):
        dP_starts = [t.contiguous() for t in dP_starts]
        _set(p, DP_STARTS, dP_starts)
    p.do_sb, p.do_sh, p.do_sl = dO.stride()[:3]
    p.dO = dO.data_ptr()
    for names, ts in ((DW_END, dW_end), (DS_END, dS_end), (P_STARTS, P_starts),
                      (S_STARTS, S_starts), (C_STARTS, C_starts), (DP_IN, dP), (DC_IN, dC),
                      (DS_IN, dS)):  # fmt: skip
        _set(p, names, ts)
    p.dq, p.dk, p.dv, p.deta = dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), deta.data_ptr()
    p.dmom, p.ddec = dmom.data_ptr(), ddec.data_ptr()
    p.dln_w, p.dln_b = dlnw.data_ptr(), dlnb.data_ptr()
    launch("titans_mlp", p, q.device, backward=True)
    return (dq, dk, dv, deta, dmom, ddec, *dP, *dC, *dS, dlnw.sum(0), dlnb.sum(0))


@titans_mlp_bwd.register_fake
def _(dO, *rest, **kw):
    dW_end, q, eta, ln_weight = rest[0:4], rest[12], rest[15], rest[30]
    B, H, L, D = q.shape
    acc = dW_end[0].dtype
    return (
        *(q.new_empty(B, H, L, D) for _ in range(3)),
        *(eta.new_empty(B, H, L, dtype=acc) for _ in range(3)),
        *(t.new_empty(t.shape) for _ in range(3) for t in dW_end),
        ln_weight.new_empty(H, D),
        ln_weight.new_empty(H, D),
    )


_DEFAULTS = {"offset": 0, "unbounded": False, "reconstruction_target": "residual",
             "output_residual": True}  # fmt: skip
_NAMES = ("q", "k", "v", "eta", "mom", "dec", "W10", "b10", "W20", "b20", "C10", "cb10", "C20",
          "cb20", "S10", "sb10", "S20", "sb20", "ln_weight", "ln_bias", "mini_batch_size", "eps",
          *_DEFAULTS)  # fmt: skip


def _setup_context(ctx, inputs, output):
    a = {**_DEFAULTS, **dict(zip(_NAMES, inputs))}  # by name (trailing defaults omitted)
    starts = output[9:21]  # P, S, W at each block start
    ctx.mark_non_differentiable(*starts[4:])
    # outputs nobody differentiates (the per-block starts, mostly) reach _backward as None, not as
    # zero-filled tensors: _backward passes None for the starts' gradients when all are None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*(a[n] for n in ("q", "k", "v", "eta", "mom", "dec")), *starts,
                          a["ln_weight"], a["ln_bias"])  # fmt: skip
    ctx.kw = {n: a[n] for n in ("mini_batch_size", "eps", *_DEFAULTS)}


def _backward(ctx, dO, *d_out):
    first_order_only("Titans TTT-MLP")
    saved = ctx.saved_tensors
    seq, starts, ln = saved[:6], saved[6:18], saved[18:]
    P_starts = starts[:4]
    if dO is None:
        dO = torch.zeros_like(seq[0])
    dW_end, dS_end, dP_starts = d_out[0:4], d_out[4:8], d_out[8:12]
    weights = [t[:, :, 0] for t in P_starts]  # (B, H, ...): the shapes of the end gradients
    d_end = [torch.zeros_like(ref) if g is None else g for g, ref in zip((*dW_end, *dS_end),
                                                                         (*weights, *weights))]  # fmt: skip
    if all(g is None for g in dP_starts):
        d_starts = (None,) * 4
    else:
        d_starts = tuple(torch.zeros_like(ref) if g is None else g
                         for g, ref in zip(dP_starts, P_starts))  # fmt: skip
    kw = ctx.kw
    dq, dk, dv, deta, dmom, ddec, *d_weights, dlnw, dlnb = titans_mlp_bwd(
        dO, *d_end, *d_starts, *seq, *starts, *ln, kw["mini_batch_size"],
        kw["eps"], *(kw[n] for n in _DEFAULTS),
    )  # fmt: skip
    return (dq, dk, dv, deta, dmom, ddec, *d_weights, dlnw, dlnb, None, None,
            *(None for _ in _DEFAULTS))  # fmt: skip


titans_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)
