"""Pieces every backend shares: the per-head LayerNorm, the closed-form gradient of the token loss,
token scales, and how a sequence splits into mini-batch segments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# (weight, bias) names of each fast layer of the closed-form fast models
LAYERS = {"linear": (("W1", "b1"),), "mlp": (("W1", "b1"), ("W2", "b2"))}


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
    return ln_loss_grad_parts(z, wbt, w2, eps)[0]


def ln_loss_grad_parts(z: Tensor, wbt: Tensor, w2: Tensor, eps: float):
    """:func:`ln_loss_grad_pre` and the intermediates a hand-written backward needs:
    ``(g, (x, rstd, dx, s, g))`` with x the normalised z, ``dx = w2 * x + wbt``, ``s = mean(dx * x)``."""
    # not torch.var_mean (over a short last dim, D = 16, ~10x slower on CPU) nor Tensor.mean (four
    # kernels on CPU): sums, with 1/D folded into the next op
    D = z.shape[-1]
    inv_d = 1.0 / D
    zc = torch.sub(z, z.sum(dim=-1, keepdim=True), alpha=inv_d)
    rstd = torch.rsqrt(torch.add((zc * zc).sum(dim=-1, keepdim=True), eps * D)) * math.sqrt(D)
    x = zc * rstd
    dx = torch.addcmul(wbt, x, w2)  # weight * (weight * x + bias - target)
    s = (dx * x).sum(dim=-1, keepdim=True) * inv_d
    g = rstd * torch.addcmul(torch.sub(dx, dx.sum(dim=-1, keepdim=True), alpha=inv_d), x, s,
                             value=-1.0)  # fmt: skip
    return g, (x, rstd, dx, s, g)


def ln_loss_grad_fused(z: Tensor, wbt: Tensor, w2: Tensor, eps: float) -> Tensor:
    """:func:`ln_loss_grad_pre` in three ops: aten's LayerNorm forward gives x and r, and its
    backward without affine is exactly ``r * (dx - mean(dx) - x * mean(dx * x))`` for
    ``dx = w2 * x + wbt`` (differentiable: torch's LayerNorm double backward). A single token's
    step is bound by the number of ops, not by their size; the scan keeps the explicit sums.

    z: [..., D]; wbt, w2 shaped like z (not broadcast)."""
    D = z.shape[-1]
    x, mean, rstd = torch.native_layer_norm(z, (D,), None, None, eps)
    dx = torch.addcmul(wbt, x, w2)  # weight * (weight * x + bias - target)
    mask = (True, False, False)
    return torch.ops.aten.native_layer_norm_backward(dx, z, (D,), mean, rstd, None, None, mask)[0]


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """d gelu_tanh(x) / dx, in closed form."""
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


def affine(x: Tensor, W: Tensor, b: Tensor) -> Tensor:
    """``x W + b`` as one batched GEMM over every leading dim: x [..., n, Din], W [..., Din, Dout],
    b [..., 1, Dout] -> [..., n, Dout]."""
    if x.dim() == 3:
        return torch.baddbmm(b, x, W)
    out = torch.baddbmm(b.flatten(0, -3), x.flatten(0, -3), W.flatten(0, -3))
    return out.view(*x.shape[:-1], W.shape[-1])


def key_grads(P: dict[str, Tensor], k: Tensor, wbt: Tensor, w2: Tensor, eps: float, kind: str,
              loss_grad=ln_loss_grad_pre):  # fmt: skip
    """Inputs X_l and output gradients g_l of every fast layer for the keys, at the weights P.

    k: [..., n, D]; wbt = ln_w * (ln_b - target), w2 = ln_w**2 (see ln_loss_grad_pre), against k;
    ``loss_grad``: ln_loss_grad_pre or ln_loss_grad_fused.
    Returns lists over layers of X [..., n, Din] and g [..., n, Dout]."""
    if kind == "linear":
        return [k], [loss_grad(affine(k, P["W1"], P["b1"]), wbt, w2, eps)]
    z1 = affine(k, P["W1"], P["b1"])  # (..., n, F)
    x2 = gelu_tanh(z1)
    g2 = loss_grad(affine(x2, P["W2"], P["b2"]), wbt, w2, eps)  # (..., n, D)
    g1 = (g2 @ P["W2"].transpose(-1, -2)) * gelu_tanh_grad(z1)  # (..., n, F)
    return [k, x2], [g1, g2]


def flatten_heads(d: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """{name: [B, H, ...]} -> {name: [B*H, ...]} (views); None stays None."""
    return None if d is None else {n: t.flatten(0, 1) for n, t in d.items()}


def unflatten_heads(d: dict[str, Tensor] | None, B: int) -> dict[str, Tensor] | None:
    """Inverse of :func:`flatten_heads` for batch size B."""
    # a view, as unflatten(0, (B, -1)) but without Tensor.unflatten's Python wrapper
    return None if d is None else {n: t.view(B, -1, *t.shape[1:]) for n, t in d.items()}


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
