"""A plain per-token reference written for the tests: Python loops and ``torch.autograd.grad``.

It shares no code with ttt_core (not its LayerNorm, not its scan, not torch.func): every token's
gradient is taken at its mini-batch's start weights with autograd, and every query's weights are
accumulated by hand, exactly as DESIGN.md states the semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_ttt(fast_model, params, q, k, v, eta, ln_w, ln_b, *, b, causal=True, token_scale="mean",
              momentum=None, decay=None, eps=1e-6):  # fmt: skip
    """params: {name: [H, ...]}; q, k, v [B, H, L, D]; eta [B, H, L]. Returns o [B, H, L, D]."""
    B, H, L, D = q.shape
    b = L if b is None else b
    out = torch.zeros_like(q)
    for bi in range(B):
        for h in range(H):
            P = {n: p[h] for n, p in params.items()}
            S = {n: torch.zeros_like(t) for n, t in P.items()}
            W = dict(P)
            for s0 in range(0, L, b):
                idx = list(range(s0, min(s0 + b, L)))
                grads = []
                for j in idx:
                    Pj = {n: t.detach().requires_grad_(True) for n, t in P.items()}
                    z = fast_model(Pj, k[bi, h, j][None])[0]
                    pred = F.layer_norm(z, (D,), ln_w[h].detach(), ln_b[h].detach(), eps)
                    loss = 0.5 * ((pred - (v[bi, h, j] - k[bi, h, j])) ** 2).sum()
                    g = torch.autograd.grad(loss, list(Pj.values()))
                    grads.append({n: eta[bi, h, j] * gi for n, gi in zip(Pj, g)})
                for pos, i in enumerate(idx):
                    if momentum is not None or decay is not None:
                        m = momentum[bi, h, i] if momentum is not None else 0.0
                        a = decay[bi, h, i] if decay is not None else 0.0
                        S = {n: m * S[n] - grads[pos][n] for n in S}
                        W = {n: (1 - a) * W[n] + S[n] for n in W}
                        Wi = W
                    else:
                        seen = grads[: pos + 1] if causal else grads
                        if not causal:
                            s = 1.0
                        elif isinstance(token_scale, torch.Tensor):
                            s = token_scale[pos]
                        else:
                            s = 1.0 / (pos + 1) if token_scale == "mean" else 1.0
                        Wi = {n: P[n] - s * sum(g[n] for g in seen) for n in P}
                    z = fast_model(Wi, q[bi, h, i][None])[0]
                    out[bi, h, i] = q[bi, h, i] + F.layer_norm(z, (D,), ln_w[h], ln_b[h], eps)
                P = {n: t.detach() for n, t in Wi.items()}
                if momentum is not None or decay is not None:
                    W = dict(P)
    return out
