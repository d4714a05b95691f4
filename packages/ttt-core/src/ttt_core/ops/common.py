"""Pieces every backend shares: the per-head LayerNorm, the closed-form gradient of the token loss,
token scales, and how a sequence splits into mini-batch segments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Math runs in fp32 for fp32/bf16/fp16 inputs (fp32 fast-weight state) and in fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_view(p: Tensor, ndim: int) -> Tensor:
    """Per-head vector ``[H, D]`` viewed to broadcast against ``[B, H, ..., D]`` of rank ``ndim``."""
    H, D = p.shape
    return p.view(1, H, *([1] * (ndim - 3)), D)


def layer_norm_heads(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LN_h(z): LayerNorm over the last dim with per-head affine. z: [B, H, ..., D]; weight, bias: [H, D]."""
    zhat = F.layer_norm(z, z.shape[-1:], eps=eps)
    return zhat * head_view(weight, z.ndim) + head_view(bias, z.ndim)


def ln_loss_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """d/dz of 0.5 * ||LN_h(z) - target||^2, in closed form (differentiable by autograd).

    With x = (z - mu) * r, r = 1/sqrt(var + eps) and dx = weight * (weight * x + bias - target):
    ``grad = r * (dx - mean(dx) - x * mean(dx * x))`` (means over the last dim D).

    z, target: [B, H, ..., D]; weight, bias: [H, D].
    """
    w = head_view(weight, z.ndim)
    return ln_loss_grad_pre(z, w * (head_view(bias, z.ndim) - target), w * w, eps)


def ln_loss_grad_pre(z: Tensor, wbt: Tensor, w2: Tensor, eps: float) -> Tensor:
    """:func:`ln_loss_grad` with the z-independent parts precomputed (a hot loop's version):
    ``wbt = weight * (bias - target)`` and ``w2 = weight**2``, broadcastable against z."""
    var, mu = torch.var_mean(z, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    x = (z - mu) * rstd
    dx = torch.addcmul(wbt, x, w2)  # weight * (weight * x + bias - target)
    t = dx - dx.mean(dim=-1, keepdim=True)
    return rstd * torch.addcmul(t, x, (dx * x).mean(dim=-1, keepdim=True), value=-1.0)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """d gelu_tanh(x) / dx, in closed form."""
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


def position_scales(token_scale: str | Tensor, start: int, n: int, device, dtype) -> Tensor:
    """s_i for in-mini-batch positions ``start .. start+n-1``: [n] in ``dtype``.

    "mean": 1/(i+1) (the TTT paper), "sum": 1, a tensor: ``token_scale[start:start+n]``.
    """
    if isinstance(token_scale, Tensor):
        return token_scale[start : start + n].to(dtype)
    if token_scale == "mean":
        return 1.0 / torch.arange(start + 1, start + n + 1, device=device, dtype=dtype)
    return torch.ones(n, device=device, dtype=dtype)


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
