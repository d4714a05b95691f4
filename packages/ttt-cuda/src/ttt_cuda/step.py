"""The single-token streaming step: ttt-core's public step entry calls it through the backend
(``ttt_linear_step`` / ``ttt_mlp_step``), one call per token and layer, from a ``TTTState`` to the
next.

On CPU tensors one call of the fused C++ step (``csrc/ttt_step_cpu.cpp``) reads the state's
tensors and writes o and the next state's; on CUDA tensors the whole-sequence op runs on the one
token. The streaming bookkeeping stays ``TTTState``'s: the token scale s of the state's offset
(``TTTState.token_scale_at``), whether the token ends the mini-batch (``end_offset``) and the next
state (``advance``). For one token at offset o with start weights P (DESIGN.md):

    plain:  G' = G + eta x^T g;  the query sees W = P - s_o G'   (W is the next P when o = b - 1)
    Titans: S' = m S - eta x^T g;  W' = (1 - a) W + S'           (the next P at the mini-batch end)
    o = q + LN_h(f_W(q))

Shapes: q, k, v [B, H, 1, D]; eta (momentum, decay) [B, H, 1]; returns ``(o [B, H, 1, D],
TTTState)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ttt_core.state import TensorDict, TTTState
from ttt_cuda._ext import extension
from ttt_cuda.common import acc_dtype, cpu_computes_fp32, unsupported_reason
from ttt_cuda.linear import linear_call, linear_unsupported_reason
from ttt_cuda.mlp import mlp_call, mlp_unsupported_reason
from ttt_cuda.ops.launch import rowmajor

__all__ = ["linear_step", "mlp_step", "run_step", "step_unsupported_reason"]

# the step's tensors besides q and the state that could carry a gradient
_GRAD_INPUTS = ("k", "v", "eta", "ln_weight", "ln_bias", "momentum", "decay", "token_scale")


def step_unsupported_reason(op: str, q: Tensor, **kwargs: Any) -> str | None:
    """None when the backend's step runs this ``ttt_linear_step`` / ``ttt_mlp_step`` call, else why
    not (metadata only). CPU: the fused C++ step (fp32/fp64, bf16/fp16 computed in fp32;
    TTT-Linear and TTT-MLP, plain and Titans form, both reconstruction targets, with or without
    the output residual), for inference only: refused when any input or the state requires grad;
    CUDA: what the whole-sequence op takes."""
    if q.device.type != "cpu":
        reason = mlp_unsupported_reason if op == "ttt_mlp_step" else linear_unsupported_reason
        return reason(q, **kwargs)
    if torch.compiler.is_compiling():
        return "the fused CPU step is a plain C++ call, which torch.compile does not trace"
    if torch.is_grad_enabled() and (names := _needing_grad(q, **kwargs)):
        return (f"{'/'.join(names)} require grad: the fused CPU step has no autograd (streaming "
                "inference); call it under torch.no_grad() or use backend='torch' to train "
                "through the step")  # fmt: skip
    return unsupported_reason(q, head_dims=(), **kwargs)


def _needing_grad(q: Tensor, *, initial_state=None, **kwargs: Any) -> list[str]:
    """The names of the call's tensors that require grad (the state's as ``initial_state``)."""
    given = {"q": q, **{n: kwargs.get(n) for n in _GRAD_INPUTS}}
    names = [n for n, t in given.items() if isinstance(t, Tensor) and t.requires_grad]
    if initial_state is not None and any(t.requires_grad for t in initial_state.tensors()):
        names.append("initial_state")
    return names


def linear_step(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, W1: Tensor, b1: Tensor,
                ln_weight: Tensor, ln_bias: Tensor, *, state: TTTState, **kwargs: Any):  # fmt: skip
    """One token of TTT-Linear (plain or Titans form) from ``state`` (validated, supported)."""
    if q.device.type == "cpu":
        return cpu_step(q, k, v, eta, ln_weight, ln_bias, state=state, **kwargs)
    return linear_call(q, k, v, eta, W1, b1, ln_weight, ln_bias, causal=True,
                       initial_state=state, output_final_state=True, **kwargs)  # fmt: skip


def mlp_step(q: Tensor, k: Tensor, v: Tensor, eta: Tensor, W1: Tensor, b1: Tensor, W2: Tensor,
             b2: Tensor, ln_weight: Tensor, ln_bias: Tensor, *, state: TTTState, **kwargs: Any):  # fmt: skip
    """One token of TTT-MLP (plain or Titans form on CPU) from ``state`` (validated, supported)."""
    if q.device.type == "cpu":
        return cpu_step(q, k, v, eta, ln_weight, ln_bias, state=state, **kwargs)
    return mlp_call(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, causal=True,
                    initial_state=state, output_final_state=True, **kwargs)  # fmt: skip


@cpu_computes_fp32
def cpu_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    state: TTTState,
    momentum: Tensor | None = None,
    decay: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, TTTState]:
    """The fused C++ step on one token: q, k, v [B, H, 1, D], eta (momentum, decay) [B, H, 1],
    ln_weight/ln_bias [H, D], ``state`` holding W1, b1 (, W2, b2) -> (o [B, H, 1, D], next state).
    ``options``: token_scale, eps, reconstruction_target, output_residual (see `run_step`)."""
    C = extension()  # (a call needing grad was refused by step_unsupported_reason)
    acc = acc_dtype(q.dtype)
    B, H, _, D = q.shape
    q, k, v, eta = _rows(q, acc), _rows(k, acc), _rows(v, acc), _ready(eta, acc)
    o = torch.empty(B, H, 1, D, dtype=acc, device=q.device)
    fields = {"q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "eta": eta.data_ptr(),
              "o": o.data_ptr()}  # fmt: skip
    fields["q_sb"], fields["q_sh"] = q.stride()[:2]
    fields["k_sb"], fields["k_sh"] = k.stride()[:2]
    fields["v_sb"], fields["v_sh"] = v.stride()[:2]
    fields["eta_sb"], fields["eta_sh"] = eta.stride()[:2]
    if momentum is not None:  # (B, H, 1); absent: 0
        m = _ready(momentum, acc)
        fields["momentum"], (fields["m_sb"], fields["m_sh"]) = m.data_ptr(), m.stride()[:2]
    if decay is not None:
        a = _ready(decay, acc)
        fields["decay"], (fields["a_sb"], fields["a_sh"]) = a.data_ptr(), a.stride()[:2]
    titans = momentum is not None or decay is not None
    threads = torch.get_num_threads()
    new_state = run_step(fields, state, acc, ln_weight, ln_bias, titans=titans,
                         launch=lambda step: C.ttt_step_cpu(step, threads), **options)  # fmt: skip
    return o, new_state


def run_step(
    fields: dict[str, Any],
    state: TTTState,
    acc: torch.dtype,
    ln_weight: Tensor,
    ln_bias: Tensor,
    *,
    titans: bool,
    launch: Callable[[dict[str, Any]], None],
    token_scale: str | Tensor = "mean",
    eps: float = 1e-6,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
    **_: Any,
) -> TTTState:
    """Adds the step's state, options and state outputs to ``fields`` (StepParams' fields by name,
    ``csrc/ttt_step_cpu.h``; the token's inputs and o are the caller's), runs ``launch(fields)``
    (the C++ call: the step, or the layer step around it) and returns the next state. The tensors
    whose pointers ``fields`` holds live here until then."""
    P = {n: _ready(t, acc) for n, t in state.params.items()}
    completes = state.end_offset(1) == 0  # this token ends the mini-batch
    W1 = P["W1"]  # (B, H, D, F)
    ln_weight, ln_bias = _ready(ln_weight, acc), _ready(ln_bias, acc)
    # the token's weights W, kept when they become state (Titans, or the mini-batch's end)
    W = {n: torch.empty_like(t) for n, t in P.items()} if titans or completes else None
    fields.update(B=W1.shape[0], H=W1.shape[1], D=W1.shape[2], F=W1.shape[3] if "W2" in P else 0,
                  float64=acc == torch.float64, titans=titans, eps=float(eps),
                  value_target=reconstruction_target == "value",
                  output_residual=bool(output_residual), ln_w=ln_weight.data_ptr(),
                  ln_b=ln_bias.data_ptr(), params=_pointers(P), weights_out=_pointers(W))  # fmt: skip
    if titans:  # carry: the momentum S (zeros at the start); current: C (P at a boundary)
        current = _ready_dict(state.current, acc)
        fields["current"] = _pointers(current)
        carry = _ready_dict(state.momentum, acc)
        carry_out = {n: torch.empty_like(t) for n, t in P.items()}  # S'
    else:  # carry: grad_sum G (zeros at the start), dropped when the token ends the mini-batch
        fields["scale"] = float(TTTState.token_scale_at(token_scale, state.offset))
        carry = _ready_dict(state.grad_sum, acc)
        carry_out = None if completes else {n: torch.empty_like(t) for n, t in P.items()}  # G'
    fields["carry"], fields["carry_out"] = _pointers(carry), _pointers(carry_out)
    launch(fields)
    params = W if completes else P  # the next mini-batch starts from W
    if titans:
        return state.advance(1, params=params, momentum=carry_out, current=W)
    return state.advance(1, params=params, grad_sum=carry_out)


def _ready(t: Tensor, acc: torch.dtype) -> Tensor:
    """t contiguous in ``acc`` (itself when it already is: a carried state costs no copy)."""
    return t if t.dtype == acc and t.is_contiguous() else t.to(acc).contiguous()


def _ready_dict(d: TensorDict | None, acc: torch.dtype) -> TensorDict | None:
    return None if d is None else {n: _ready(t, acc) for n, t in d.items()}


def _rows(t: Tensor, acc: torch.dtype) -> Tensor:
    """A [B, H, 1, D] input in ``acc`` with unit stride over D (its strides over B and H are
    passed on: a view of the layer's projection is not copied)."""
    return rowmajor(t if t.dtype == acc else t.to(acc))


def _pointers(d: TensorDict | None) -> tuple[int, ...]:
    """A fast-weight dict's data pointers in layer order (W1, b1, W2, b2); () when absent."""
    return () if d is None else tuple(t.data_ptr() for t in d.values())
