"""A whole ``TTTLayer``'s single streaming token in one C++ call (``ttt_layer_step``): on the CPU,
a streaming token of a layer ran ~30 small torch ops and Python calls around the fused step, each
cache-cold (the host model's weights stream through the caches between two tokens); here one call
does them all (``csrc/ttt_step_cpu.cpp``: ``ttt_layer_step_cpu``). For x [B, 1, C] (W = H D)::

    h      = rms_norm(x)  (the block's pre-norm, TTTLayer.forward's pre_norm; or h = x)
    z      = h W_in^T + [b_qkv | b_rates]              q | k | v | rate logits   [B, 3W + rH]
    eta    = base_lr / D * sigmoid(z_lr)               (Titans: momentum, decay = sigmoid(z_m, z_a))
    o, S'  = the step from the state S (step.py, the same C++ step)           [B, H, 1, D]
    y      = tanh(alpha) * (post_norm(o) W_out^T + b_out)  (+ x: the block's residual)  [B, 1, C]

ttt-core's ``TTTLayer.forward`` asks for it (``backends.layer_step_backend``) on one streaming token
and takes its ordinary road when it is refused: grad mode on (it has no autograd), a dtype other
than fp32/fp64, autocast, an option it does not fuse (the gelu gate, q/k L2 norm, the normalised
target), a fast model of the user's own, a pre-norm other than an RMS norm, a traced call, and an
``o_proj``, ``post_norm`` or pre-norm that is a subclass (a LoRA linear, Gemma's ``1 + w`` norm)
or has forward hooks: the step computes them from their tensors and would skip what their own
forward adds (``in_proj`` is read as a weight on both roads).

The pre-norm is fused when it is a ``torch.nn.RMSNorm`` over C, or a module that states its RMS
norm for this x through ``rms_norm_params(x) -> (weight or None, eps)``, or None when it does not
compute one for this x (ttt-moshi's ``TTTRMSNorm`` does: its weight ``alpha`` [1, 1, C]; any
weight of C elements works). Its forward must then compute ``x * rsqrt(mean(x^2) + eps) *
weight`` over the last dim.
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


def _tensors(layer, dtype: torch.dtype) -> dict[str, Tensor]:
    """The layer's tensors the fused step reads, by LayerStepParams field (``ttt_step_cpu.h``),
    contiguous in ``dtype`` (themselves when they already are); absent ones left out."""
    o_proj, post = layer.o_proj, layer.post_norm
    post = post if type(post) is torch.nn.LayerNorm else None
    tensors = {
        "in_w": layer.in_proj.weight,  # (3W + rH, C)
        "in_b": layer.in_bias,  # (3W,) or None
        "rate_bias": layer.rate_bias,  # (rH,)
        "out_w": o_proj.weight,  # (C, W)
        "out_b": o_proj.bias,  # (C,) or None
        "post_w": None if post is None else post.weight,  # (W,)
        "post_b": None if post is None else post.bias,
        "gate": getattr(layer, "gate_alpha", None),  # (C,)
    }
    return {n: _ready(t, dtype) for n, t in tensors.items() if t is not None}


def _runs_as(module, cls: type) -> bool:
    """Whether calling ``module`` computes what the layer step computes from its tensors: it is
    exactly a ``cls`` (a subclass may override forward: a LoRA linear, a Gemma-style ``1 + w``
    norm) and has no forward hook of its own (global hooks: :func:`_global_forward_hooks`)."""
    return type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)


def _global_forward_hooks() -> bool:
    """Whether a global forward hook is registered: it runs around every module call of the
    ordinary road (o_proj, post_norm, the pre-norm), which the layer step does not make."""
    module_py = torch.nn.modules.module  # where torch keeps the global hooks
    return bool(module_py._global_forward_hooks or module_py._global_forward_pre_hooks)


def _rms_norm(pre_norm, x: Tensor) -> tuple[Tensor | None, float] | None:
    """(weight [C] or None, eps) of an RMS pre-norm the layer step computes for x, else None."""
    C = x.shape[-1]
    if _runs_as(pre_norm, torch.nn.RMSNorm):
        if tuple(pre_norm.normalized_shape) != (C,):
            return None
        eps = pre_norm.eps if pre_norm.eps is not None else torch.finfo(x.dtype).eps
        return pre_norm.weight, float(eps)
    params = getattr(pre_norm, "rms_norm_params", None)
    if params is None or not _runs_as(pre_norm, type(pre_norm)):  # (a hook on it)
        return None
    found = params(x)
    if found is None or (found[0] is not None and found[0].numel() != C):
        return None
    return found[0], float(found[1])


def layer_step_unsupported_reason(x: Tensor, *, layer, pre_norm=None, **_: Any) -> str | None:
    """None when the fused layer step runs this one-token call of ``layer``, else why not (config,
    metadata, grad and autocast mode only). The layer's tensors are read in x's dtype, as the
    ordinary road's projections read them (it takes x in the in_proj's dtype)."""
    if torch.is_grad_enabled():
        return "the fused layer step has no autograd: it runs under torch.no_grad() (inference)"
    if x.device.type != "cpu":
        return f"the fused layer step runs on CPU tensors, got {x.device.type}"
    if torch.is_autocast_enabled("cpu"):
        return "under autocast the ordinary road computes the projections in the autocast dtype"
    if torch.compiler.is_compiling():
        return "the fused layer step is a plain C++ call, which torch.compile does not trace"
    if x.dtype not in _DTYPES or layer.in_proj.weight.dtype != x.dtype:
        return (f"the fused layer step takes float32/float64 x in the layer's dtype, got x "
                f"{x.dtype} and in_proj {layer.in_proj.weight.dtype}")  # fmt: skip
    c = layer.config
    if c.gate == "gelu" or c.qk_l2_norm or c.normalize_target:
        unfused = [name for name, on in (("gate='gelu'", c.gate == "gelu"),
                                         ("qk_l2_norm", c.qk_l2_norm),
                                         ("normalize_target", c.normalize_target)) if on]  # fmt: skip
        return f"{', '.join(unfused)} not fused in the layer step"
    if type(layer.inner) not in (LinearLearner, MLPLearner):
        return f"the fast model {type(layer.inner).__name__} is not TTT-Linear or TTT-MLP"
    if _global_forward_hooks():
        return "a global forward hook is registered: the ordinary road runs it around each module"
    post = layer.post_norm
    if not _runs_as(post, torch.nn.Identity) and not (
        _runs_as(post, torch.nn.LayerNorm) and post.weight is not None
    ):
        return "post_norm is neither an affine LayerNorm nor Identity (or has forward hooks)"
    if not _runs_as(layer.o_proj, torch.nn.Linear):
        return (f"o_proj is a {type(layer.o_proj).__name__} or has forward hooks: the layer step "
                "computes a plain torch.nn.Linear")  # fmt: skip
    if pre_norm is not None:
        norm = _rms_norm(pre_norm, x)
        if norm is None or (norm[0] is not None and norm[0].dtype != x.dtype):
            return (f"pre_norm {type(pre_norm).__name__} is not an RMS norm over C in x's dtype "
                    "(torch.nn.RMSNorm, or rms_norm_params(x))")  # fmt: skip
    return None


def layer_step(layer, x: Tensor, *, state: TTTState, pre_norm=None, residual: bool = False,
               **options: Any) -> tuple[Tensor, TTTState]:  # fmt: skip
    """One streaming token x [B, 1, C] of ``layer`` from ``state`` (validated, started) ->
    (y [B, 1, C], next state); ``pre_norm`` and ``residual``: the block around the layer
    (``TTTLayer.forward``'s). ``options``: the layer's inner keywords (token_scale,
    reconstruction_target, output_residual, ...), as its ordinary road passes them to the step."""
    C = extension()
    c = layer.config
    t = _tensors(layer, x.dtype)  # held here until the C++ call returns
    if pre_norm is not None:
        weight, pre_eps = _rms_norm(pre_norm, x)
        if weight is not None:
            t["pre_w"] = _ready(weight, x.dtype)  # C elements
    B = x.shape[0]
    x = x.contiguous()  # (B, 1, C): the C++ call reads it as (B, C)
    y = torch.empty(B, 1, c.hidden_size, dtype=x.dtype, device=x.device)
    fields = {n: v.data_ptr() for n, v in t.items()}  # LayerStepParams' fields by name
    fields.update(C=c.hidden_size, n_rates=3 if c.titans else 1, eta_scale=c.base_lr / c.head_dim,
                  x=x.data_ptr(), y=y.data_ptr())  # fmt: skip
    if "post_w" in t:
        fields["post_eps"] = float(layer.post_norm.eps)
    if pre_norm is not None:
        fields["pre_norm"], fields["pre_eps"] = True, pre_eps
    fields["residual"] = residual
    threads = torch.get_num_threads()
    inner = layer.inner
    new_state = run_step({}, state, x.dtype, inner.ln_weight, inner.ln_bias, titans=c.titans,
                         eps=inner.eps, **options,
                         launch=lambda step: C.ttt_layer_step_cpu(fields, step, threads))  # fmt: skip
    return y, new_state
