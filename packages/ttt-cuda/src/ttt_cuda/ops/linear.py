"""The fused TTT-Linear ops as ``torch.library`` custom ops: ``ttt::linear_fwd`` and
``ttt::linear_bwd``, each with a fake (meta) implementation, and autograd linking the two.

Layers (flash-linear-attention style): kernel (csrc/) -> launcher (``ops/launch.py``: fills the
params struct with pointers, strides and the stream) -> these custom ops -> the public function in
``ttt_cuda.linear``, which validates user input with ttt-core's messages. The ops check the
kernels' contract (``check_contract``: the shapes below, dtypes, q's device), not the semantics:

    q, k, v   [B, H, L, D]  fp32/fp64 (CPU) or fp32/bf16/fp16 (CUDA); last dim contiguous
    eta       [B, H, L]     acc dtype (fp32; fp64 for fp64 inputs)
    W0        [B, H, D, D]  acc dtype, start weights;  b0 [B, H, D]
    ln_weight, ln_bias [H, D] acc dtype;  scale [b] acc dtype (token scale s_i, causal only)

``linear_fwd`` returns ``(o [B,H,L,D], W_end [B,H,D,D], b_end [B,H,D], W_starts [B,H,nseg,D,D],
b_starts [B,H,nseg,D])``; the last two are the per-segment start weights the backward recomputes
from. A segment is a mini-batch, except that a call starting inside one (``offset`` > 0, from a
streaming state with grad_sum ``G0`` [B,H,D,D] / ``gb0`` [B,H,D]) first finishes it:
nseg = 1 + ceil((L - min(b - offset, L)) / b), i.e. ceil(L / b) at offset 0. Stored:
nseg * D * (D + 1) floats per chain instead of L * D * (D + 1). The options
``reconstruction_target`` ("residual": target v - k; "value": v) and ``output_residual``
(o = q + LN(f(q)), or LN(f(q))) are ttt-core's, with its defaults.
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

__all__ = ["linear_bwd", "linear_fwd"]


@torch.library.custom_op("ttt::linear_fwd", mutates_args=())
def linear_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W0: Tensor,
    b0: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    scale: Tensor,
    mini_batch_size: int,
    causal: bool,
    eps: float,
    end_unscaled: bool = False,
    offset: int = 0,
    unbounded: bool = False,
    G0: Tensor | None = None,
    gb0: Tensor | None = None,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused TTT-Linear forward; see the module docstring for shapes.

    ``end_unscaled`` (causal): an incomplete last segment ends with ``W_start - G0 - sum_j eta_j
    grad_j`` instead of the token-scaled update, so ``W_starts[:, :, -1] - W_end`` is the streaming
    state's ``grad_sum`` for a sequence cut inside a mini-batch. ``offset`` (causal): token 0 sits
    at that in-mini-batch position, and ``G0``/``gb0`` hold what the mini-batch's earlier tokens
    read (a state's grad_sum). ``unbounded``: the call ends inside its first mini-batch (b None,
    or b > offset + L; ``mini_batch_size`` is then offset + L, the one segment never completes).
    ``scale`` is indexed by in-mini-batch position.
    """
    check_contract("linear_fwd", q, {"k": k, "v": v}, {
        "eta": (eta, "B H L"), "W0": (W0, "B H D D"), "b0": (b0, "B H D"),
        "ln_weight": (ln_weight, "H D"), "ln_bias": (ln_bias, "H D"), "scale": (scale, "b"),
        "G0": (G0, "B H D D"), "gb0": (gb0, "B H D"),
    }, b=mini_batch_size)  # fmt: skip
    q, k, v = rowmajor(q), rowmajor(k), rowmajor(v)
    eta, W0, b0 = eta.contiguous(), W0.contiguous(), b0.contiguous()
    ln_weight, ln_bias, scale = ln_weight.contiguous(), ln_bias.contiguous(), scale.contiguous()
    if G0 is not None:
        G0, gb0 = G0.contiguous(), gb0.contiguous()
    B, H, L, D = q.shape
    nmb = num_segments(L, mini_batch_size, offset)
    o = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    W_end, b_end = torch.empty_like(W0), torch.empty_like(b0)
    W_starts = W0.new_empty(B, H, nmb, D, D)
    b_starts = b0.new_empty(B, H, nmb, D)
    p = params("linear", q, k, v, eta, ln_weight, ln_bias, scale, mini_batch_size, causal, eps,
               end_unscaled, offset, unbounded, reconstruction_target, output_residual)  # fmt: skip
    if G0 is not None:
        p.G0, p.gb0 = G0.data_ptr(), gb0.data_ptr()
    p.W0, p.b0, p.o = W0.data_ptr(), b0.data_ptr(), o.data_ptr()
    p.W_end, p.b_end = W_end.data_ptr(), b_end.data_ptr()
    p.W_starts, p.b_starts = W_starts.data_ptr(), b_starts.data_ptr()
    launch("linear", p, q.device, backward=False)
    return o, W_end, b_end, W_starts, b_starts


@linear_fwd.register_fake
def _(
    q,
    k,
    v,
    eta,
    W0,
    b0,
    ln_weight,
    ln_bias,
    scale,
    mini_batch_size,
    causal,
    eps,
    end_unscaled=False,
    offset=0,
    unbounded=False,
    G0=None,
    gb0=None,
    reconstruction_target="residual",
    output_residual=True,
):
    B, H, L, D = q.shape
    nmb = num_segments(L, mini_batch_size, offset)
    o = q.new_empty(B, H, L, D)
    return (
        o,
        W0.new_empty(B, H, D, D),
        b0.new_empty(B, H, D),
        W0.new_empty(B, H, nmb, D, D),
        b0.new_empty(B, H, nmb, D),
    )


@torch.library.custom_op("ttt::linear_bwd", mutates_args=())
def linear_bwd(
    dO: Tensor,
    dW_end: Tensor,
    db_end: Tensor,
    dW_starts: Tensor | None,
    db_starts: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W_starts: Tensor,
    b_starts: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    scale: Tensor,
    mini_batch_size: int,
    causal: bool,
    eps: float,
    end_unscaled: bool = False,
    offset: int = 0,
    unbounded: bool = False,
    G0: Tensor | None = None,
    gb0: Tensor | None = None,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused TTT-Linear backward: recomputes each segment from its start weights.

    Returns ``(dq, dk, dv, deta, dW0, db0, dln_weight, dln_bias, dscale, dG0, dgb0)`` with the
    shapes of the forward's inputs (dG0/dgb0 empty [0] when G0 is None); dln_* and dscale are
    reduced over the batch here (fixed order, deterministic).
    """
    check_contract("linear_bwd", q, {"k": k, "v": v, "dO": dO}, {
        "dW_end": (dW_end, "B H D D"), "db_end": (db_end, "B H D"),
        "dW_starts": (dW_starts, "B H nseg D D"), "db_starts": (db_starts, "B H nseg D"),
        "eta": (eta, "B H L"), "W_starts": (W_starts, "B H nseg D D"),
        "b_starts": (b_starts, "B H nseg D"), "ln_weight": (ln_weight, "H D"),
        "ln_bias": (ln_bias, "H D"), "scale": (scale, "b"),
        "G0": (G0, "B H D D"), "gb0": (gb0, "B H D"),
    }, b=mini_batch_size, nseg=num_segments(q.shape[2], mini_batch_size, offset))  # fmt: skip
    q, k, v, dO = rowmajor(q), rowmajor(k), rowmajor(v), rowmajor(dO)
    eta, W_starts, b_starts = eta.contiguous(), W_starts.contiguous(), b_starts.contiguous()
    dW_end, db_end = dW_end.contiguous(), db_end.contiguous()
    ln_weight, ln_bias, scale = ln_weight.contiguous(), ln_bias.contiguous(), scale.contiguous()
    B, H, L, D = q.shape
    acc = W_starts.dtype
    dq, dk, dv = (torch.empty(B, H, L, D, device=q.device, dtype=q.dtype) for _ in range(3))
    deta = torch.empty(B, H, L, device=q.device, dtype=acc)
    dW0 = torch.empty(B, H, D, D, device=q.device, dtype=acc)
    db0, dlnw, dlnb = (torch.empty(B, H, D, device=q.device, dtype=acc) for _ in range(3))
    dscale = torch.empty(B, H, mini_batch_size, device=q.device, dtype=acc)
    if G0 is not None:
        G0, gb0 = G0.contiguous(), gb0.contiguous()
        dG0, dgb0 = torch.empty_like(G0), torch.empty_like(gb0)
    else:
        dG0, dgb0 = q.new_empty(0, dtype=acc), q.new_empty(0, dtype=acc)
    p = params("linear", q, k, v, eta, ln_weight, ln_bias, scale, mini_batch_size, causal, eps,
               end_unscaled, offset, unbounded, reconstruction_target, output_residual)  # fmt: skip
    if G0 is not None:
        p.G0, p.gb0 = G0.data_ptr(), gb0.data_ptr()
    if G0 is not None:
        p.dG0, p.dgb0 = dG0.data_ptr(), dgb0.data_ptr()
    if dW_starts is not None and db_starts is not None:
        dW_starts, db_starts = dW_starts.contiguous(), db_starts.contiguous()
        p.dW_starts, p.db_starts = dW_starts.data_ptr(), db_starts.data_ptr()
    p.do_sb, p.do_sh, p.do_sl = dO.stride()[:3]
    p.dO, p.dW_end, p.db_end = dO.data_ptr(), dW_end.data_ptr(), db_end.data_ptr()
    p.W_starts, p.b_starts = W_starts.data_ptr(), b_starts.data_ptr()
    p.dq, p.dk, p.dv, p.deta = dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), deta.data_ptr()
    p.dW0, p.db0, p.dln_w, p.dln_b = (
        dW0.data_ptr(),
        db0.data_ptr(),
        dlnw.data_ptr(),
        dlnb.data_ptr(),
    )
    p.dscale = dscale.data_ptr()
    launch("linear", p, q.device, backward=True)
    dscale = dscale.sum(dim=(0, 1))[: scale.shape[0]]
    return dq, dk, dv, deta, dW0, db0, dlnw.sum(0), dlnb.sum(0), dscale, dG0, dgb0


@linear_bwd.register_fake
def _(
    dO, dW_end, db_end, dWs, dbs, q, k, v, eta, W_starts, b_starts, ln_weight, ln_bias, scale,
    mini_batch_size, causal, eps, end_unscaled=False, offset=0, unbounded=False, G0=None, gb0=None,
    reconstruction_target="residual", output_residual=True,
):  # fmt: skip
    B, H, L, D = q.shape
    acc = W_starts.dtype
    if G0 is not None:
        dG0, dgb0 = G0.new_empty(G0.shape), gb0.new_empty(gb0.shape)
    else:
        dG0, dgb0 = q.new_empty(0, dtype=acc), q.new_empty(0, dtype=acc)
    return (
        q.new_empty(B, H, L, D),
        q.new_empty(B, H, L, D),
        q.new_empty(B, H, L, D),
        eta.new_empty(B, H, L, dtype=acc),
        W_starts.new_empty(B, H, D, D),
        b_starts.new_empty(B, H, D),
        ln_weight.new_empty(H, D),
        ln_bias.new_empty(H, D),
        scale.new_empty(scale.shape[0]),
        dG0,
        dgb0,
    )


_FWD_DEFAULTS = {"end_unscaled": False, "offset": 0, "unbounded": False, "G0": None, "gb0": None,
                 "reconstruction_target": "residual", "output_residual": True}  # fmt: skip
_FWD_NAMES = ("q", "k", "v", "eta", "W0", "b0", "ln_weight", "ln_bias", "scale",
              "mini_batch_size", "causal", "eps", *_FWD_DEFAULTS)  # fmt: skip


def _setup_context(ctx, inputs, output):
    a = {**_FWD_DEFAULTS, **dict(zip(_FWD_NAMES, inputs))}  # by name (trailing defaults omitted)
    _, _, _, W_starts, b_starts = output
    # an output the loss does not use gets None, not a materialised zero gradient: the per-segment
    # start weights are large (nseg copies of the weights) and rarely used
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a["q"], a["k"], a["v"], a["eta"], W_starts, b_starts, a["ln_weight"],
                          a["ln_bias"], a["scale"], a["G0"], a["gb0"])  # fmt: skip
    ctx.mini_batch_size, ctx.causal, ctx.eps = a["mini_batch_size"], a["causal"], a["eps"]
    ctx.end_unscaled, ctx.offset, ctx.unbounded = a["end_unscaled"], a["offset"], a["unbounded"]
    ctx.options = (a["reconstruction_target"], a["output_residual"])


def _backward(ctx, dO, dW_end, db_end, dW_starts, db_starts):
    first_order_only("TTT-Linear")
    q, k, v, eta, W_starts, b_starts, ln_weight, ln_bias, scale, G0, gb0 = ctx.saved_tensors
    B, H, _, D = q.shape
    if dO is None:
        dO = torch.zeros_like(q)
    if dW_end is None:
        dW_end = W_starts.new_zeros(B, H, D, D)
    if db_end is None:
        db_end = b_starts.new_zeros(B, H, D)
    if dW_starts is not None or db_starts is not None:  # one of them used: the other is zero
        dW_starts = torch.zeros_like(W_starts) if dW_starts is None else dW_starts
        db_starts = torch.zeros_like(b_starts) if db_starts is None else db_starts
    dq, dk, dv, deta, dW0, db0, dlnw, dlnb, dscale, dG0, dgb0 = linear_bwd(
        dO,
        dW_end,
        db_end,
        dW_starts,
        db_starts,
        q,
        k,
        v,
        eta,
        W_starts,
        b_starts,
        ln_weight,
        ln_bias,
        scale,
        ctx.mini_batch_size,
        ctx.causal,
        ctx.eps,
        ctx.end_unscaled,
        ctx.offset,
        ctx.unbounded,
        G0,
        gb0,
        *ctx.options,
    )
    if G0 is None:
        dG0 = dgb0 = None
    return (dq, dk, dv, deta, dW0, db0, dlnw, dlnb, dscale, None, None, None, None, None, None,
            dG0, dgb0, None, None)  # fmt: skip


linear_fwd.register_autograd(_backward, setup_context=_setup_context)
