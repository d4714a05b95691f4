"""A whole ``TTTLayer``'s single streaming token in one C++ call (``ttt_layer_step``): on the CPU,
a streaming token of a layer ran ~30 small torch ops and Python calls around the fused step, each
cache-cold (the host model's weights stream through the caches between two tokens); here one call
does them all (``csrc/ttt_step_cpu.cpp``: ``ttt_layer_step_cpu``). For x [B, 1, C] (W = H D)::

    z      = x W_in^T + [b_qkv | b_rates]              q | k | v | rate logits   [B, 3W + rH]
    eta    = base_lr / D * sigmoid(z_lr)               (Titans: momentum, decay = sigmoid(z_m, z_a))
    o, S'  = the step from the state S (step.py, the same C++ step)           [B, H, 1, D]
    y      = tanh(alpha) * (post_norm(o) W_out^T + b_out)                      [B, 1, C]

ttt-core's ``TTTLayer.forward`` asks for it (``backends.layer_step_backend``) on one streaming token
and takes its ordinary road when it is refused: grad mode on (it has no autograd), a dtype other
than fp32/fp64, autocast, an option it does not fuse (the gelu gate, q/k L2 norm, the normalised
target), a fast model of the user's own, a traced call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ttt_core.learners import LinearLearner, MLPLearner
from ttt_core.state import TTTState
from ttt_cuda._ext import extension
from ttt_cuda.step import _ready, run_step

__all__ = ["layer_step", "layer_step_unsupported_reason"]

_DTYPES = (torch.float32, torch.float64)


def _tensors(layer, dtype: torch.dtype) -> dict[str, Tensor | None]:
    """The layer's tensors the fused step reads, contiguous in ``dtype`` (themselves when they
    already are; None: absent)."""
    post = layer.post_norm if isinstance(layer.post_norm, torch.nn.LayerNorm) else None
    tensors = {
        "in_proj": layer.in_proj.weight,  # (3W + rH, C)
        "in_bias": layer.in_bias,  # (3W,) or None
        "rate_bias": layer.rate_bias,  # (rH,)
        "o_proj": layer.o_proj.weight,  # (C, W)
        "o_bias": layer.o_proj.bias,  # (C,) or None
        "post_weight": None if post is None else post.weight,  # (W,)
        "post_bias": None if post is None else post.bias,
        "gate_alpha": getattr(layer, "gate_alpha", None),  # (C,)
        "ln_weight": layer.inner.ln_weight,  # (H, D)
        "ln_bias": layer.inner.ln_bias,
    }
    return {n: None if t is None else _ready(t, dtype) for n, t in tensors.items()}


def layer_step_unsupported_reason(x: Tensor, *, layer, **_: Any) -> str | None:
    """None when the fused layer step runs this one-token call of ``layer``, else why not (config,
    metadata, grad and autocast mode only). The layer's tensors are read in x's dtype, as the
    ordinary road's projections read them (it takes x in the in_proj's dtype)."""
    c = layer.config
    if x.device.type != "cpu":
        return f"the fused layer step runs on CPU tensors, got {x.device.type}"
    if torch.compiler.is_compiling():
        return "the fused layer step is a plain C++ call, which torch.compile does not trace"
    if torch.is_grad_enabled():
        return "the fused layer step has no autograd: it runs under torch.no_grad() (inference)"
    if torch.is_autocast_enabled("cpu"):
        return "under autocast the ordinary road computes the projections in the autocast dtype"
    if x.dtype not in _DTYPES or layer.in_proj.weight.dtype != x.dtype:
        return (f"the fused layer step takes float32/float64 x in the layer's dtype, got x "
                f"{x.dtype} and in_proj {layer.in_proj.weight.dtype}")  # fmt: skip
    if type(layer.inner) not in (LinearLearner, MLPLearner):
        return f"the fast model {type(layer.inner).__name__} is not TTT-Linear or TTT-MLP"
    unfused = [name for name, on in (("gate='gelu'", c.gate == "gelu"), ("qk_l2_norm", c.qk_l2_norm),
                                     ("normalize_target", c.normalize_target)) if on]  # fmt: skip
    if unfused:
        return f"{', '.join(unfused)} not fused in the layer step"
    post = layer.post_norm
    if not isinstance(post, (torch.nn.LayerNorm, torch.nn.Identity)) or (
        isinstance(post, torch.nn.LayerNorm) and post.weight is None
    ):
        return "post_norm is neither an affine LayerNorm nor Identity"
    return None


def layer_step(layer, x: Tensor, *, state: TTTState, **options: Any) -> tuple[Tensor, TTTState]:
    """One streaming token x [B, 1, C] of ``layer`` from ``state`` (validated, started) ->
    (y [B, 1, C], next state). ``options``: the layer's inner keywords (token_scale,
    reconstruction_target, output_residual, ...), as its ordinary road passes them to the step."""
    C = extension()
    c = layer.config
    t = _tensors(layer, x.dtype)  # held here until the C++ call returns
    B = x.shape[0]
    x = x.reshape(B, c.hidden_size).contiguous()  # (B, C)
    y = torch.empty(B, 1, c.hidden_size, dtype=x.dtype)
    lp = C.LayerStepParams()
    lp.C, lp.n_rates, lp.eta_scale = c.hidden_size, 3 if c.titans else 1, c.base_lr / c.head_dim
    lp.x, lp.y = x.data_ptr(), y.data_ptr()
    lp.in_w, lp.rate_bias, lp.out_w = (t[n].data_ptr() for n in ("in_proj", "rate_bias", "o_proj"))
    if t["in_bias"] is not None:
        lp.in_b, lp.out_b = t["in_bias"].data_ptr(), t["o_bias"].data_ptr()
    if t["post_weight"] is not None:
        lp.post_w, lp.post_b = t["post_weight"].data_ptr(), t["post_bias"].data_ptr()
        lp.post_eps = float(layer.post_norm.eps)
    if t["gate_alpha"] is not None:
        lp.gate = t["gate_alpha"].data_ptr()
    threads = torch.get_num_threads()
    new_state = run_step(C.StepParams(), state, x.dtype, t["ln_weight"], t["ln_bias"],
                         titans=c.titans, eps=layer.inner.eps,
                         launch=lambda p: C.ttt_layer_step_cpu(lp, p, threads),
                         **options)  # fmt: skip
    return y, new_state
