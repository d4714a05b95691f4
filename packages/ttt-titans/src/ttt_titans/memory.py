"""NeuralMemory: Titans' long-term memory as a fast-weight model, computed chunk-parallel.

Per head, the memory is a fast model M (linear ``M(x) = x W1 + b1`` or a 2-layer MLP) trained while
it reads, with the Titans rule (t = step, c(t) = start of t's chunk):

    l_t(M)  = 0.5 || LN_h(M(k_t)) - v_t ||^2                        associative (surprise) loss
    S_t     = eta_t S_{t-1} - theta_t grad l_t(M_{c(t)})             momentum of the surprise
    M_t     = (1 - alpha_t) M_{t-1} + S_t                            forgetting
    m_t     = LN_h(M_t(q_t))                                         retrieval

with gradients taken at the weights the chunk started from, ``M_{c(t)}``; ``chunk = 1`` is the exact
per-step rule. It is computed by ttt-core's Titans form (``ttt_linear`` / ``ttt_mlp`` with
``momentum=eta``, ``decay=alpha``, ``eta=theta``, ``mini_batch_size=chunk``): within a chunk the
gradients are batched and momentum/forgetting are linear recurrences, so one call handles a
whole window, with ttt-core's options ``reconstruction_target="value"`` (the loss targets ``v``)
and ``output_residual=False`` (the output is the retrieval ``LN_h(M(q))`` itself). LN_h (weight/bias (H, D)) is a
learnable outer parameter. q and k are L2-normalised per head (as in Titans). ``memory.backend``
chooses ttt-core's backend of that call (``"cpp"``: ttt-cuda's fused C++ path on the CPU).

The memory's initial weights (``W1, b1`` (``W2, b2``)) are *buffers*: never in the outer optimiser.
Across windows the memory's state is a ``ttt_core.TTTState`` carried by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ttt_core import TTTState, ttt_linear, ttt_mlp

from .config import MemoryConfig


class NeuralMemory(nn.Module):
    def __init__(self, d_model: int, cfg: MemoryConfig) -> None:
        super().__init__()
        if d_model % cfg.num_heads:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by memory.num_heads ({cfg.num_heads})"
            )
        if cfg.chunk < 1:
            raise ValueError(f"memory.chunk must be >= 1, got {cfg.chunk}")
        self.cfg = cfg
        self.num_heads = h = cfg.num_heads
        self.head_dim = d = d_model // h
        self.chunk = cfg.chunk
        self.inner = cfg.inner
        self.qkv_proj = nn.Linear(d_model, 3 * h * d, bias=False)  # fused q, k, v projections
        self.out_proj = nn.Linear(h * d, d_model)
        self.ln_weight = nn.Parameter(torch.ones(h, d))  # (H, D) LN_h weight, outer param
        self.ln_bias = nn.Parameter(torch.zeros(h, d))  # (H, D)
        g = cfg.init_std
        if cfg.inner == "linear":
            self.register_buffer("W1", g * torch.randn(h, d, d))  # (H, D, D)
            self.register_buffer("b1", torch.zeros(h, 1, d))  # (H, 1, D)
        elif cfg.inner == "mlp":
            f = cfg.mlp_ratio * d
            self.register_buffer("W1", g * torch.randn(h, d, f))  # (H, D, F)
            self.register_buffer("b1", torch.zeros(h, 1, f))  # (H, 1, F)
            self.register_buffer("W2", g * torch.randn(h, f, d))  # (H, F, D)
            self.register_buffer("b2", torch.zeros(h, 1, d))  # (H, 1, D)
        else:
            raise ValueError(f"memory.inner must be 'linear' or 'mlp', got {cfg.inner!r}")

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, L, C) -> q, k, v each (B, H, L, D); q, k L2-normalised over D."""
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).view(b, n, 3, self.num_heads, self.head_dim)  # (B, L, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).contiguous()  # each (B, H, L, D), one copy
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v

    def fast_weights(self) -> tuple[torch.Tensor, ...]:
        """The initial fast weights (buffers): (W1, b1) or (W1, b1, W2, b2)."""
        if self.inner == "linear":
            return (self.W1, self.b1)
        return (self.W1, self.b1, self.W2, self.b2)

    def _ttt(self, q, k, v, theta, eta, alpha, state, final: bool = True):
        fn = ttt_linear if self.inner == "linear" else ttt_mlp
        return fn(
            q,
            k,
            v,
            theta,
            *self.fast_weights(),
            self.ln_weight,
            self.ln_bias,
            mini_batch_size=self.chunk,
            causal=True,
            momentum=eta,
            decay=alpha,
            initial_state=state,
            output_final_state=final,
            reconstruction_target="value",  # l_t targets v_t (Titans), not v_t - k_t
            output_residual=False,  # the read-out is LN_h(M_t(q_t)) alone
            backend=self.cfg.backend,
        )

    def retrieve(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        theta: torch.Tensor,
        eta: torch.Tensor,
        alpha: torch.Tensor,
        state: TTTState | None = None,
        commit: int = 0,
    ) -> tuple[torch.Tensor, TTTState | None]:
        """Write (k, v) and read q chunk-parallel.

        q, k, v: (B, H, L, D); theta, eta, alpha: (B, H, L). Returns the retrievals
        r (B, H, L, D) = LN_h(M_t(q_t)) and the state after the first ``commit`` steps
        (``None`` when commit == 0); streaming cuts give the same outputs as one call.
        """
        n = q.shape[2]
        if not 0 <= commit <= n:
            raise ValueError(f"commit must be in [0, L={n}], got {commit}")
        if commit in (0, n):
            o, final = self._ttt(q, k, v, theta, eta, alpha, state, final=commit == n)
            return o, final
        c = commit
        o1, mid = self._ttt(
            q[:, :, :c],
            k[:, :, :c],
            v[:, :, :c],
            theta[..., :c],
            eta[..., :c],
            alpha[..., :c],
            state,
        )
        o2, _ = self._ttt(
            q[:, :, c:],
            k[:, :, c:],
            v[:, :, c:],
            theta[..., c:],
            eta[..., c:],
            alpha[..., c:],
            mid,
            final=False,
        )
        return torch.cat([o1, o2], dim=2), mid

    def forward(
        self,
        x: torch.Tensor,
        theta: torch.Tensor,
        eta: torch.Tensor,
        alpha: torch.Tensor,
        state: TTTState | None = None,
        commit: int = 0,
    ) -> tuple[torch.Tensor, TTTState | None]:
        """x: (B, L, C); rates (B, H, L) -> memory read-out (B, L, C), committed state."""
        b, n, _ = x.shape
        for name, t in (("theta", theta), ("eta", eta), ("alpha", alpha)):
            if t.shape != (b, self.num_heads, n):
                raise ValueError(
                    f"{name} must have shape (B, H, L) = {(b, self.num_heads, n)}, got "
                    f"{tuple(t.shape)}"
                )
        q, k, v = self.project(x)
        r, new_state = self.retrieve(q, k, v, theta, eta, alpha, state, commit)  # (B, H, L, D)
        r = r.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)  # (B, L, H*D)
        return self.out_proj(r), new_state
