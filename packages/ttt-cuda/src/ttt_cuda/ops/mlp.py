"""The fused TTT-MLP ops as ``torch.library`` custom ops: ``ttt::mlp_fwd`` and ``ttt::mlp_bwd``,
each with a fake implementation, and autograd linking the two (as ``ops/linear.py`` for TTT-Linear).

Fast model ``f(x) = gelu_tanh(x W1 + b1) W2 + b2``. The ops check the kernels' contract
(``check_contract``: the shapes below, dtypes, q's device), not the semantics (the public
function ``ttt_cuda.mlp`` validates user input with ttt-core's messages):

    q, k, v   [B, H, L, D]  fp32/fp64 (CPU) or fp32/bf16/fp16 (CUDA, D = 64, F = 256)
    eta       [B, H, L]     acc dtype (fp32; fp64 for fp64 inputs)
    W10 [B, H, D, F], b10 [B, H, F], W20 [B, H, F, D], b20 [B, H, D]   acc dtype, start weights
    ln_weight, ln_bias [H, D] acc dtype;  scale [b] acc dtype (token scale by position, causal)

``mlp_fwd`` returns ``(o, W1_end, b1_end, W2_end, b2_end, W1_starts, b1_starts, W2_starts,
b2_starts)``: the end weights and the start weights of every segment ([B, H, nseg, ...]), from
which the backward recomputes: nseg * (2 D F + F + D) floats per chain instead of storing every
token's weights (L * (2 D F + F + D)). A call may start inside a mini-batch (``offset`` > 0) with
the state's grad_sum ``G10`` [B,H,D,F], ``gb10`` [B,H,F], ``G20`` [B,H,F,D], ``gb20`` [B,H,D].
``reconstruction_target`` / ``output_residual``: ttt-core's options, as ``ttt::linear_fwd``.
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

__all__ = ["mlp_bwd", "mlp_fwd"]


@torch.library.custom_op("ttt::mlp_fwd", mutates_args=())
def mlp_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W10: Tensor,
    b10: Tensor,
    W20: Tensor,
    b20: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    scale: Tensor,
    mini_batch_size: int,
    causal: bool,
    eps: float,
    end_unscaled: bool = False,
    offset: int = 0,
    unbounded: bool = False,
    G10: Tensor | None = None,
    gb10: Tensor | None = None,
    G20: Tensor | None = None,
    gb20: Tensor | None = None,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused TTT-MLP forward; see the module docstring for shapes.

    ``end_unscaled``: an incomplete last mini-batch ends with ``W_start - sum_j eta_j grad_j``
    (its grad_sum is then start - end); ``unbounded``: the call ends inside its first mini-batch
    (b None, or b > offset + L: never completes; ``mini_batch_size`` is then offset + L).
    ``offset``/``G*``: a start inside a mini-batch, as ``ttt::linear_fwd``.
    """
    check_contract("mlp_fwd", q, {"k": k, "v": v}, {
        "eta": (eta, "B H L"),
        "W10": (W10, "B H D F"), "b10": (b10, "B H F"),
        "W20": (W20, "B H F D"), "b20": (b20, "B H D"),
        "ln_weight": (ln_weight, "H D"), "ln_bias": (ln_bias, "H D"), "scale": (scale, "b"),
        "G10": (G10, "B H D F"), "gb10": (gb10, "B H F"),
        "G20": (G20, "B H F D"), "gb20": (gb20, "B H D"),
    }, b=mini_batch_size, F=W10.shape[-1])  # fmt: skip
    q, k, v = rowmajor(q), rowmajor(k), rowmajor(v)
    eta, ln_weight, ln_bias, scale = (t.contiguous() for t in (eta, ln_weight, ln_bias, scale))
    W10, b10, W20, b20 = (t.contiguous() for t in (W10, b10, W20, b20))
    B, H, L, D = q.shape
    F = W10.shape[-1]
    nseg = num_segments(L, mini_batch_size, offset)
    o = torch.empty(B, H, L, D, device=q.device, dtype=q.dtype)
    ends = [torch.empty_like(t) for t in (W10, b10, W20, b20)]
    starts = [W10.new_empty(B, H, nseg, *t.shape[2:]) for t in (W10, b10, W20, b20)]
    p = params("mlp", q, k, v, eta, ln_weight, ln_bias, scale, mini_batch_size, causal, eps,
               end_unscaled, offset, unbounded, reconstruction_target, output_residual)  # fmt: skip
    p.F = F
    grad_sum = _set_grad_sum(p, G10, gb10, G20, gb20)  # keeps the contiguous copies alive
    p.W0, p.b0, p.W20, p.b20 = W10.data_ptr(), b10.data_ptr(), W20.data_ptr(), b20.data_ptr()
    p.o = o.data_ptr()
    p.W_end, p.b_end, p.W2_end, p.b2_end = (t.data_ptr() for t in ends)
    p.W_starts, p.b_starts, p.W2_starts, p.b2_starts = (t.data_ptr() for t in starts)
    launch("mlp", p, q.device, backward=False)
    del grad_sum
    return (o, *ends, *starts)


def _set_grad_sum(p, G10, gb10, G20, gb20):
    """Points p.G0/gb0/G20/gb20 at the grad_sum tensors (contiguous); returns them (or None)."""
    if G10 is None:
        return None
    gs = [t.contiguous() for t in (G10, gb10, G20, gb20)]
    p.G0, p.gb0, p.G20, p.gb20 = (t.data_ptr() for t in gs)
    return gs


@mlp_fwd.register_fake
def _(q, k, v, eta, W10, b10, W20, b20, ln_weight, ln_bias, scale, mini_batch_size, causal, eps,
      end_unscaled=False, offset=0, unbounded=False, G10=None, gb10=None, G20=None, gb20=None,
      reconstruction_target="residual", output_residual=True):  # fmt: skip
    B, H, L, D = q.shape
    nseg = num_segments(L, mini_batch_size, offset)
    weights = (W10, b10, W20, b20)
    return (
        q.new_empty(B, H, L, D),
        *(t.new_empty(t.shape) for t in weights),
        *(t.new_empty(B, H, nseg, *t.shape[2:]) for t in weights),
    )


@torch.library.custom_op("ttt::mlp_bwd", mutates_args=())
def mlp_bwd(
    dO: Tensor,
    dW1_end: Tensor,
    db1_end: Tensor,
    dW2_end: Tensor,
    db2_end: Tensor,
    dW1_starts: Tensor | None,
    db1_starts: Tensor | None,
    dW2_starts: Tensor | None,
    db2_starts: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    W1_starts: Tensor,
    b1_starts: Tensor,
    W2_starts: Tensor,
    b2_starts: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    scale: Tensor,
    mini_batch_size: int,
    causal: bool,
    eps: float,
    end_unscaled: bool = False,
    offset: int = 0,
    unbounded: bool = False,
    G10: Tensor | None = None,
    gb10: Tensor | None = None,
    G20: Tensor | None = None,
    gb20: Tensor | None = None,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor,
]:  # fmt: skip
    """Fused TTT-MLP backward: recomputes each segment from its start weights.

    Returns ``(dq, dk, dv, deta, dW10, db10, dW20, db20, dln_weight, dln_bias, dscale, dG10,
    dgb10, dG20, dgb20)``; the last four are empty [0] without a grad_sum; dln_* and dscale are
    reduced over the batch here (fixed order, deterministic).
    """
    check_contract("mlp_bwd", q, {"k": k, "v": v, "dO": dO}, {
        "dW1_end": (dW1_end, "B H D F"), "db1_end": (db1_end, "B H F"),
        "dW2_end": (dW2_end, "B H F D"), "db2_end": (db2_end, "B H D"),
        "dW1_starts": (dW1_starts, "B H nseg D F"), "db1_starts": (db1_starts, "B H nseg F"),
        "dW2_starts": (dW2_starts, "B H nseg F D"), "db2_starts": (db2_starts, "B H nseg D"),
        "eta": (eta, "B H L"),
        "W1_starts": (W1_starts, "B H nseg D F"), "b1_starts": (b1_starts, "B H nseg F"),
        "W2_starts": (W2_starts, "B H nseg F D"), "b2_starts": (b2_starts, "B H nseg D"),
        "ln_weight": (ln_weight, "H D"), "ln_bias": (ln_bias, "H D"), "scale": (scale, "b"),
        "G10": (G10, "B H D F"), "gb10": (gb10, "B H F"),
        "G20": (G20, "B H F D"), "gb20": (gb20, "B H D"),
    }, b=mini_batch_size, F=W1_starts.shape[-1],
       nseg=num_segments(q.shape[2], mini_batch_size, offset))  # fmt: skip
    q, k, v, dO = rowmajor(q), rowmajor(k), rowmajor(v), rowmajor(dO)
    eta, ln_weight, ln_bias, scale = (t.contiguous() for t in (eta, ln_weight, ln_bias, scale))
    starts = [t.contiguous() for t in (W1_starts, b1_starts, W2_starts, b2_starts)]
    d_end = [t.contiguous() for t in (dW1_end, db1_end, dW2_end, db2_end)]
    B, H, L, D = q.shape
    F = W1_starts.shape[-1]
    acc = W1_starts.dtype
    dq, dk, dv = (torch.empty(B, H, L, D, device=q.device, dtype=q.dtype) for _ in range(3))
    deta = torch.empty(B, H, L, device=q.device, dtype=acc)
    d_start = [torch.empty_like(t) for t in d_end]  # dW10, db10, dW20, db20
    dlnw, dlnb = (torch.empty(B, H, D, device=q.device, dtype=acc) for _ in range(2))
    dscale = torch.empty(B, H, mini_batch_size, device=q.device, dtype=acc)
    p = params("mlp", q, k, v, eta, ln_weight, ln_bias, scale, mini_batch_size, causal, eps,
               end_unscaled, offset, unbounded, reconstruction_target, output_residual)  # fmt: skip
    p.F = F
    grad_sum = _set_grad_sum(p, G10, gb10, G20, gb20)
    if grad_sum is not None:
        d_gs = [torch.empty_like(t) for t in grad_sum]
        p.dG0, p.dgb0, p.dG20, p.dgb20 = (t.data_ptr() for t in d_gs)
    else:
        d_gs = [q.new_empty(0, dtype=acc) for _ in range(4)]
    d_starts = (dW1_starts, db1_starts, dW2_starts, db2_starts)
    if all(t is not None for t in d_starts):
        d_starts = [t.contiguous() for t in d_starts]
        p.dW_starts, p.db_starts, p.dW2_starts, p.db2_starts = (t.data_ptr() for t in d_starts)
    p.do_sb, p.do_sh, p.do_sl = dO.stride()[:3]
    p.dO = dO.data_ptr()
    p.dW_end, p.db_end, p.dW2_end, p.db2_end = (t.data_ptr() for t in d_end)
    p.W_starts, p.b_starts, p.W2_starts, p.b2_starts = (t.data_ptr() for t in starts)
    p.dq, p.dk, p.dv, p.deta = dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), deta.data_ptr()
    p.dW0, p.db0, p.dW20, p.db20 = (t.data_ptr() for t in d_start)
    p.dln_w, p.dln_b, p.dscale = dlnw.data_ptr(), dlnb.data_ptr(), dscale.data_ptr()
    launch("mlp", p, q.device, backward=True)
    dscale = dscale.sum(dim=(0, 1))[: scale.shape[0]]
    return (dq, dk, dv, deta, *d_start, dlnw.sum(0), dlnb.sum(0), dscale, *d_gs)


@mlp_bwd.register_fake
def _(dO, dW1_end, db1_end, dW2_end, db2_end, dW1s, db1s, dW2s, db2s, q, k, v, eta, W1_starts,
      b1_starts, W2_starts, b2_starts, ln_weight, ln_bias, scale, mini_batch_size, causal, eps,
      end_unscaled=False, offset=0, unbounded=False, G10=None, gb10=None, G20=None, gb20=None,
      reconstruction_target="residual", output_residual=True):  # fmt: skip
    B, H, L, D = q.shape
    acc = W1_starts.dtype
    if G10 is None:
        d_gs = [q.new_empty(0, dtype=acc) for _ in range(4)]
    else:
        d_gs = [t.new_empty(t.shape) for t in (G10, gb10, G20, gb20)]
    return (
        *(q.new_empty(B, H, L, D) for _ in range(3)),
        eta.new_empty(B, H, L, dtype=acc),
        *(t.new_empty(t.shape) for t in (dW1_end, db1_end, dW2_end, db2_end)),
        ln_weight.new_empty(H, D),
        ln_bias.new_empty(H, D),
        scale.new_empty(scale.shape[0]),
        *d_gs,
    )


_DEFAULTS = {"end_unscaled": False, "offset": 0, "unbounded": False, "G10": None, "gb10": None,
             "G20": None, "gb20": None, "reconstruction_target": "residual",
             "output_residual": True}  # fmt: skip
_NAMES = ("q", "k", "v", "eta", "W10", "b10", "W20", "b20", "ln_weight", "ln_bias", "scale",
          "mini_batch_size", "causal", "eps", *_DEFAULTS)  # fmt: skip


def _setup_context(ctx, inputs, output):
    a = {**_DEFAULTS, **dict(zip(_NAMES, inputs))}  # by name (trailing defaults omitted)
    starts = output[5:]
    # an output the loss does not use gets None, not a materialised zero gradient: the per-segment
    # start weights are large (nseg copies of the weights) and rarely used
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a["q"], a["k"], a["v"], a["eta"], *starts, a["ln_weight"],
                          a["ln_bias"], a["scale"], a["G10"], a["gb10"], a["G20"], a["gb20"])  # fmt: skip
    ctx.kw = {n: a[n] for n in ("mini_batch_size", "causal", "eps", "end_unscaled", "offset",
                                "unbounded", "reconstruction_target", "output_residual")}  # fmt: skip


def _backward(ctx, dO, dW1e, db1e, dW2e, db2e, dW1s, db1s, dW2s, db2s):
    first_order_only("TTT-MLP")
    q, k, v, eta, W1s, b1s, W2s, b2s, ln_weight, ln_bias, scale, *grad_sum = ctx.saved_tensors
    if dO is None:
        dO = torch.zeros_like(q)
    d_end = [
        torch.zeros_like(ref) if g is None else g
        for g, ref in zip((dW1e, db1e, dW2e, db2e), (W1s[:, :, 0], b1s[:, :, 0], W2s[:, :, 0],
                                                     b2s[:, :, 0]))
    ]  # fmt: skip
    d_starts = (dW1s, db1s, dW2s, db2s)
    if any(g is not None for g in d_starts):
        d_starts = tuple(
            torch.zeros_like(ref) if g is None else g
            for g, ref in zip(d_starts, (W1s, b1s, W2s, b2s))
        )
    else:
        d_starts = (None,) * 4
    k_ = ctx.kw
    *grads, dG10, dgb10, dG20, dgb20 = mlp_bwd(
        dO, *d_end, *d_starts, q, k, v, eta, W1s, b1s, W2s, b2s, ln_weight, ln_bias, scale,
        k_["mini_batch_size"], k_["causal"], k_["eps"], k_["end_unscaled"], k_["offset"],
        k_["unbounded"], *grad_sum, k_["reconstruction_target"], k_["output_residual"],
    )  # fmt: skip
    d_gs = (None,) * 4 if grad_sum[0] is None else (dG10, dgb10, dG20, dgb20)
    return (*grads, None, None, None, None, None, None, *d_gs, None, None)


mlp_fwd.register_autograd(_backward, setup_context=_setup_context)
