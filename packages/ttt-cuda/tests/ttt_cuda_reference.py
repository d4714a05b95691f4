"""A plain fp64 reference of DESIGN.md's TTT-Linear semantics, independent of the fused op.

Primal form, token by token: every token's gradient comes from ``torch.func.grad`` of the token
loss (no closed form), W_i is materialised, and the output reads q_i W_i + b_i. It is slow and
obviously right; outer gradients flow through it with ordinary autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor


def layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return weight * (z - mu) / torch.sqrt(var + eps) + bias


def reference_ttt_linear(
    q: Tensor,  # (B, H, L, D)
    k: Tensor,
    v: Tensor,
    eta: Tensor,  # (B, H, L)
    W0: Tensor,  # (B, H, D, D)
    b0: Tensor,  # (B, H, D)
    ln_weight: Tensor,  # (H, D)
    ln_bias: Tensor,
    *,
    mini_batch_size: int,
    causal: bool,
    scale: Tensor,  # (b,) token scale s_i (causal)
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (o [B, H, L, D], W_end [B, H, D, D], b_end [B, H, D])."""
    B, H, L, D = q.shape

    def token_loss(W, b, kj, vj, h):
        return (
            0.5 * ((layer_norm(kj @ W + b, ln_weight[h], ln_bias[h], eps) - (vj - kj)) ** 2).sum()
        )

    grad = torch.func.grad(token_loss, argnums=(0, 1))
    outs, W_ends, b_ends = [], [], []
    for bi in range(B):
        for h in range(H):
            W, b = W0[bi, h], b0[bi, h]
            rows = []
            for t0 in range(0, L, mini_batch_size):
                n = min(mini_batch_size, L - t0)
                gs = [grad(W, b, k[bi, h, t0 + j], v[bi, h, t0 + j], h) for j in range(n)]
                for i in range(n):
                    if causal:
                        gW = scale[i] * sum(eta[bi, h, t0 + j] * gs[j][0] for j in range(i + 1))
                        gb = scale[i] * sum(eta[bi, h, t0 + j] * gs[j][1] for j in range(i + 1))
                    else:
                        gW = sum(eta[bi, h, t0 + j] * gs[j][0] for j in range(n))
                        gb = sum(eta[bi, h, t0 + j] * gs[j][1] for j in range(n))
                    Wi, bi_ = W - gW, b - gb
                    qi = q[bi, h, t0 + i]
                    rows.append(qi + layer_norm(qi @ Wi + bi_, ln_weight[h], ln_bias[h], eps))
                W, b = Wi, bi_  # the last query's weights start the next mini-batch
            outs.append(torch.stack(rows))
            W_ends.append(W)
            b_ends.append(b)
    o = torch.stack(outs).reshape(B, H, L, D)
    return o, torch.stack(W_ends).reshape(B, H, D, D), torch.stack(b_ends).reshape(B, H, D)


def make_inputs(B, H, L, D, *, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    """Random TTT-Linear inputs at a scale where the inner updates matter (eta ~ 0.1-0.5)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(
            device, dtype
        )
        return t.requires_grad_(requires_grad)

    q, k, v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
    eta = (0.1 + 0.4 * torch.rand(B, H, L, generator=g, dtype=torch.float64)).to(device, dtype)
    W1 = rnd(H, D, D, scale=D**-0.5)
    b1 = rnd(H, 1, D, scale=0.1)
    ln_weight, ln_bias = rnd(H, D, scale=0.2, shift=1.0), rnd(H, D, scale=0.1)
    return dict(q=q, k=k, v=v, eta=eta.requires_grad_(requires_grad), W1=W1, b1=b1,
                ln_weight=ln_weight, ln_bias=ln_bias)  # fmt: skip


def scale_vector(token_scale, b: int, dtype=torch.float64) -> Tensor:
    """The s_i vector that a token_scale name stands for (mean: 1/(i+1), sum: 1)."""
    if isinstance(token_scale, Tensor):
        return token_scale
    if token_scale == "mean":
        return 1.0 / torch.arange(1, b + 1, dtype=dtype)
    return torch.ones(b, dtype=dtype)
