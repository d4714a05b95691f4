"""Pieces every backend shares: the per-head LayerNorm, the closed-form gradient of the token loss,
the fast layers' key-side gradients, and how a sequence splits into mini-batch segments."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# (weight, bias) names of each fast layer of the closed-form fast models
LAYERS = {"linear": (("W1", "b1"),), "mlp": (("W1", "b1"), ("W2", "b2"))}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in fp32 for fp32/bf16/fp16 inputs (fp32 fast-weight state) and in fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when t has it (a streaming token passes ~8 tensors)."""
    return t if t.dtype == dtype else t.to(dtype)


def head_view(p: Tensor, ndim: int) -> Tensor:
    """Per-head vector ``[H, D]`` viewed to broadcast against ``[B, H, ..., D]`` of rank ``ndim``."""
    H, D = p.shape
    return p.view(1, H, *([1] * (ndim - 3)), D)


def layer_norm_heads(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LN_h(z): LayerNorm over the last dim with per-head affine. z: [B, H, ..., D]; weight, bias: [H, D]."""
    zhat = F.layer_norm(z, z.shape[-1:], eps=eps)
    return zhat * head_view(weight, z.ndim) + head_view(bias, z.ndim)


RECONSTRUCTION_TARGETS = ("residual", "value")


def reconstruction(k: Tensor, v: Tensor, reconstruction_target: str) -> Tensor:
    """The token loss's target: ``v - k`` ("residual", the TTT paper) or ``v`` ("value", Titans'
    associative memory). k, v: [B, H, ..., D] -> [B, H, ..., D]."""
    return v - k if reconstruction_target == "residual" else v


def output(q: Tensor, ln_z: Tensor, output_residual: bool) -> Tensor:
    """The TTT output from ``ln_z = LN_h(f_W(q))``: ``q + ln_z`` (``output_residual``) or ``ln_z``."""
    return q + ln_z if output_residual else ln_z


def ln_loss_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """d/dz of the token loss 0.5 * ||LN_h(z) - target||^2, in closed form (differentiable).

    With x = (z - mu) * r the normalised z (r = 1/sqrt(var + eps)) and
    dx = weight * (weight * x + bias - target) the gradient at x:
    ``grad = r * (dx - mean(dx) - x * mean(dx * x))`` (means over the last dim D).

    z, target: [B, H, ..., D]; weight, bias: [H, D].
    """
    w, b = head_view(weight, z.ndim), head_view(bias, z.ndim)
    var, mu = torch.var_mean(z, dim=-1, keepdim=True, correction=0)  # (..., 1)
    r = torch.rsqrt(var + eps)
    x = (z - mu) * r  # (..., D)
    dx = w * (w * x + b - target)
    return r * (dx - dx.mean(dim=-1, keepdim=True) - x * (dx * x).mean(dim=-1, keepdim=True))


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_vjp(dy: Tensor, x: Tensor) -> Tensor:
    """``dy * gelu_tanh'(x)`` (gelu's backward for the output gradient dy), one fused aten kernel;
    differentiable. With u = C (x + K x^3) (C = sqrt(2 / pi), K = 0.044715) and t = tanh u:
    ``gelu_tanh'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) C (1 + 3 K x^2)``. dy, x: same shape."""
    return torch.ops.aten.gelu_backward(dy, x, approximate="tanh")


def affine(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x W + b`` as one batched GEMM over every leading dim: x [..., n, Din], W [..., Din, Dout],
    b [..., 1, Dout] -> [..., n, Dout]."""
    if x.dim() == 3:
        return torch.baddbmm(b, x, W)
    out = torch.baddbmm(b.flatten(0, -3), x.flatten(0, -3), W.flatten(0, -3))
    return out.view(*x.shape[:-1], W.shape[-1])


def key_grads(P: dict[str, Tensor], k: Tensor, target: Tensor, ln_weight: Tensor,
              ln_bias: Tensor, eps: float, kind: str):  # fmt: skip
    """Inputs X_l and output gradients g_l = d l_j / d(X_l W_l + b_l) of every fast layer for the
    keys, at the weights P (the chain rule through the fast model, in closed form).

    P: {name: [B, H, Din, Dout] / [B, H, 1, Dout]}; k, target: [B, H, n, D]; ln_*: [H, D].
    Returns lists over layers of X [B, H, n, Din] and g [B, H, n, Dout]."""
    if kind == "linear":
        return [k], [ln_loss_grad(affine(k, P["W1"], P["b1"]), target, ln_weight, ln_bias, eps)]
    z1 = affine(k, P["W1"], P["b1"])  # (B, H, n, F)
    x2 = gelu_tanh(z1)
    g2 = ln_loss_grad(affine(x2, P["W2"], P["b2"]), target, ln_weight, ln_bias, eps)  # (B, H, n, D)
    g1 = gelu_tanh_vjp(g2 @ P["W2"].transpose(-1, -2), z1)  # (B, H, n, F)
    return [k, x2], [g1, g2]


@dataclass(frozen=True)
class Segment:
    """A run of tokens inside one mini-batch: ``[start, start + length)`` of the call's sequence,
    beginning at in-mini-batch position ``offset``; ``completes`` when it reaches the mini-batch end."""

    start: int
    length: int
    offset: int
    completes: bool


def plan_segments(L: int, b: int | None, offset: int) -> list[Segment]:
    """Split a call's L tokens into mini-batch segments given the carried in-mini-batch ``offset``.

    ``b=None`` is one unbounded mini-batch (never completes)."""
    if b is None:
        return [Segment(0, L, offset, False)] if L > 0 else []
    segs, pos, off = [], 0, offset
    while pos < L:
        n = min(b - off, L - pos)
        segs.append(Segment(pos, n, off, off + n == b))
        pos, off = pos + n, (off + n) % b
    return segs


def group_segments(segs: list[Segment]) -> list[list[Segment]]:
    """Consecutive segments of equal length and offset run as one group (coefficients batched)."""
    groups: list[list[Segment]] = []
    for s in segs:
        g = groups[-1] if groups else None
        if g and g[-1].length == s.length and g[-1].offset == s.offset and g[-1].completes:
            g.append(s)
        else:
            groups.append([s])
    return groups


def stack_group(x: Tensor | None, group: list[Segment]) -> Tensor | None:
    """[B, H, L, ...] -> [N, B, H, n, ...] for a group of N consecutive segments of n tokens."""
    if x is None:
        return None
    start, n, N = group[0].start, group[0].length, len(group)
    y = x[:, :, start : start + n * N]
    y = y.reshape(*y.shape[:2], N, n, *y.shape[3:])
    return y.movedim(2, 0)


def segment_products(x: Tensor) -> tuple[Tensor, Tensor]:
    """For x [..., n]: ``mat[..., j, t] = prod_{t<r<=j} x_r`` (j >= t, else 0) and
    ``cum_j = prod_{r<=j} x_r``. Without autograd one fresh [..., n, n] tensor, written in place
    (the largest of a Titans scan; on CPU each fresh tensor costs page faults)."""
    idx = torch.arange(x.shape[-1], device=x.device)
    mat = torch.where(idx[:, None] > idx[None, :], x.unsqueeze(-1), 1.0)  # x_j below the diagonal
    cum = torch.cumprod(x, dim=-1)
    if x.requires_grad and torch.is_grad_enabled():  # cumprod's backward needs its output
        return mat.cumprod(dim=-2).tril(), cum
    return mat.cumprod_(dim=-2).tril_(), cum
