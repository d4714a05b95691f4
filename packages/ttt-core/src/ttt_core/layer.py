"""`TTTLayer`: a sequence-mixing layer ``[B, L, C] -> [B, L, C]`` whose hidden state is a fast model.

    q, k, v = x Wq, x Wk, x Wv                       (per head, [B, H, L, D]; optional L2 norm)
    eta     = base_lr * sigmoid(x W_lr + b_lr) / D   ([B, H, L], learnable per-token inner lr)

(q, k, v, the gelu gate's and the rates' projections are one fused ``in_proj``: one GEMM per call.)
    o, S    = inner(q, k, v, eta, state)             (TTT-Linear / TTT-MLP, see ttt_core.functional)
    y       = o_proj(gate(post_norm(o)))              (+ the reversed pass when bidirectional)

Gates: "none"; "gelu" multiplies by ``gelu(x W_g)`` before o_proj (TTT paper); "tanh_alpha" scales
the projected output per dimension by ``tanh(alpha)`` (video TTT), so ``gate_init=0`` makes the
layer output exactly zero: adding it residually to a pretrained model starts from that model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from . import backends
from .config import TTTConfig
from .learners import InnerLearner, LinearLearner, MLPLearner
from .ops.common import compute_dtype, layer_norm_heads, reconstruction
from .split import sequence_bounds
from .state import TTTState
from .validation import check_state

__all__ = ["TTTLayer"]


class TTTLayer(nn.Module):
    """TTT layer built from a :class:`TTTConfig`.

    Examples:
        >>> layer = TTTLayer(TTTConfig(hidden_size=64, num_heads=4))
        >>> y, state = layer(torch.randn(2, 40, 64))                 # y [2, 40, 64]
        >>> y2, state = layer(torch.randn(2, 1, 64), state=state)    # streaming, one token
    """

    def __init__(self, config: TTTConfig) -> None:
        super().__init__()
        if not isinstance(config, TTTConfig):
            raise TypeError(f"config must be a TTTConfig, got {type(config).__name__}")
        self.config = c = config
        backends.available_backends()  # settle the registry here, outside any traced code
        C, H, D, std = c.hidden_size, c.num_heads, c.head_dim, c.init_std
        W = c.inner_width
        # one input projection, rows: q | k | v | (g: gelu gate) | rates: lr (| momentum | decay)
        n_wide, n_rates = (4 if c.gate == "gelu" else 3), (3 if c.titans else 1)
        self._widths = [W] * n_wide + [n_rates * H]
        self.in_proj = nn.Linear(C, sum(self._widths), bias=False)
        nn.init.normal_(self.in_proj.weight, std=std)
        self.in_bias = nn.Parameter(torch.zeros(n_wide * W)) if c.bias else None
        # rate logits' biases: lr 0, momentum 1.5 (sigmoid ~0.82), decay -5 (sigmoid ~0.007)
        rate_bias = [0.0, 1.5, -5.0] if c.titans else [0.0]
        self.rate_bias = nn.Parameter(torch.tensor(rate_bias).repeat_interleave(H))
        self.o_proj = nn.Linear(W, C, bias=c.bias)
        nn.init.normal_(self.o_proj.weight, std=std)
        if self.o_proj.bias is not None:
            nn.init.zeros_(self.o_proj.bias)
        self.inner: InnerLearner = (
            LinearLearner(H, D, eps=c.ln_eps, init_std=std)
            if c.inner == "linear"
            else MLPLearner(H, D, c.mlp_ratio, eps=c.ln_eps, init_std=std)
        )
        if c.token_scale == "learnable":
            b = c.mini_batch_size
            self.token_scale = nn.Parameter(1.0 / torch.arange(1, b + 1, dtype=torch.float32))
        if c.target_norm_affine:  # per-head affine after standardising the target
            self.target_norm_weight = nn.Parameter(torch.ones(H, D))
            self.target_norm_bias = nn.Parameter(torch.zeros(H, D))
        self.post_norm = nn.LayerNorm(W, eps=1e-6) if c.post_norm else nn.Identity()
        if c.gate == "tanh_alpha":
            self.gate_alpha = nn.Parameter(torch.full((C,), float(c.gate_init)))
        if c.bidirectional:
            self.reverse_alpha = nn.Parameter(torch.full((C,), float(c.gate_init)))

    # ------------------------------------------------------------------------------------------
    def _heads(self, t: Tensor) -> Tensor:  # [B, L, H*D] -> [B, H, L, D]
        B, L, _ = t.shape
        H, D = self.config.num_heads, self.config.head_dim
        if L == 1:  # one token (streaming): the same view in one op
            return t.view(B, H, 1, D)
        return t.view(B, L, H, D).transpose(1, 2)

    def project(self, x: Tensor) -> list[Tensor]:
        """The fused input projection of x [B, L, C]: [q, k, v, (g), rates] logits, q/k/v/g
        [B, L, H*D] and the rates [B, L, H] (lr) or [B, L, 3H] (lr | momentum | decay)."""
        W = self.in_proj.weight
        if self.in_bias is not None:
            y = F.linear(x, W, torch.cat([self.in_bias, self.rate_bias]))
            return list(y.split_with_sizes(self._widths, dim=-1))
        *wide, rates = F.linear(x, W).split_with_sizes(self._widths, dim=-1)
        return [*wide, rates + self.rate_bias]  # no q/k/v/g bias: add the rates' alone

    def inner_inputs(self, x: Tensor, parts: list[Tensor] | None = None) -> dict[str, Tensor]:
        """q, k, v [B, H, L, D], eta [B, H, L] (and momentum/decay [B, H, L]) of the inner loop for
        x [B, L, C] (``parts``: ``self.project(x)`` when already computed)."""
        c = self.config
        parts = self.project(x) if parts is None else parts
        q, k, v = (self._heads(t) for t in parts[:3])  # (B, H, L, D)
        if c.qk_l2_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if c.normalize_target:
            v = self._normalized_value(k, v)
        rates = torch.sigmoid(parts[-1]).transpose(1, 2)  # (B, H or 3H, L)
        eta_scale = c.base_lr / c.head_dim
        if not c.titans:
            return {"q": q, "k": k, "v": v, "eta": rates * eta_scale}
        lr, momentum, decay = rates.split(c.num_heads, dim=1)  # (B, H, L) each
        return {"q": q, "k": k, "v": v, "eta": lr * eta_scale, "momentum": momentum, "decay": decay}

    def _normalized_value(self, k: Tensor, v: Tensor) -> Tensor:
        """The v whose reconstruction target (v - k, or v) is the standardised target per token
        (zero mean, unit variance over D), with the learnable per-head affine when
        ``target_norm_affine`` (as the video TTT code does). k, v: [B, H, L, D]."""
        c = self.config
        target = reconstruction(k, v, c.reconstruction_target)  # (B, H, L, D)
        var, mean = torch.var_mean(target, dim=-1, keepdim=True, correction=0)
        target = (target - mean) * torch.rsqrt(var + 1e-6)
        if c.target_norm_affine:
            target = target * self.target_norm_weight[:, None] + self.target_norm_bias[:, None]
        return k + target if c.reconstruction_target == "residual" else target

    def _inner_kwargs(self) -> dict:
        c = self.config
        ts = self.token_scale if c.token_scale == "learnable" else c.token_scale
        return dict(mini_batch_size=c.mini_batch_size, token_scale=ts, backend=c.backend,
                    reconstruction_target=c.reconstruction_target,
                    output_residual=c.output_residual)  # fmt: skip

    def _run_inner(self, inputs: dict[str, Tensor], state, stream: bool, varlen: dict):
        """The inner learner on inputs [B, H, L, ...]: one streaming token through its ``step``
        (the public single-step entry), anything else through its ``forward`` (``varlen``: the
        ``lengths``/``cu_seqlens`` keywords, states then being lists, one per sequence)."""
        c = self.config
        i = inputs
        extra = {"momentum": i["momentum"], "decay": i["decay"]} if "momentum" in i else {}
        if stream and i["q"].shape[2] == 1 and not varlen:
            o, new_state = self.inner.step(i["q"], i["k"], i["v"], i["eta"], state=state, **extra,
                                           **self._inner_kwargs())  # fmt: skip
        else:
            form = "auto" if c.use_dual_form else "primal"
            o, new_state = self.inner(i["q"], i["k"], i["v"], i["eta"], state=state,
                                      output_final_state=stream, causal=c.causal, form=form,
                                      checkpoint_group_size=c.checkpoint_group_size, **extra,
                                      **varlen, **self._inner_kwargs())  # fmt: skip
        self._check_finite(new_state)
        return o, new_state

    def _check_finite(self, new_state: TTTState | list[TTTState] | None) -> None:
        """``check_finite_state``: raise when a carried state turned NaN/Inf."""
        states = new_state if isinstance(new_state, list) else [new_state]
        if self.config.check_finite_state and any(
            s is not None and not bool(s.is_finite().all()) for s in states
        ):
            raise FloatingPointError(
                "TTTLayer: the carried fast-weight state became non-finite (NaN/Inf); lower base_lr "
                "or check the inputs (TTTConfig.check_finite_state=True raised this)"
            )

    def _fused_step(self, backend, x: Tensor, state: TTTState | None, block: dict):
        """One streaming token x [B, 1, C] through ``backend.ttt_layer_step``: the pre-norm, the
        projections, the step, the post-norm, gate, output projection and residual in one call
        (see ``backends``; ``block``: forward's pre_norm and residual). The state is checked and
        started as the ordinary road's dispatch does it."""
        c = self.config
        weights = self.inner.fast_params()
        b = c.mini_batch_size
        if state is not None:
            check_state(state, weights, x, b, c.titans, name="state")  # x stands for q
        state = TTTState.start(state, weights, x.shape[0], b, compute_dtype(x.dtype))
        y, new_state = backend.ttt_layer_step(self, x, state=state, **block, **self._inner_kwargs())
        self._check_finite(new_state)
        return y, new_state

    def _merge(self, o: Tensor) -> Tensor:  # [B, H, L, D] -> [B, L, H*D]
        B, H, L, D = o.shape
        if L == 1:  # one token: no transpose needed
            return o.reshape(B, 1, H * D)
        return o.transpose(1, 2).reshape(B, L, H * D)

    def forward(
        self,
        x: Tensor,
        state: TTTState | list[TTTState] | None = None,
        *,
        lengths: Tensor | list[int] | None = None,
        cu_seqlens: Tensor | list[int] | None = None,
        pre_norm: nn.Module | None = None,
        residual: bool = False,
    ) -> tuple[Tensor, TTTState | list[TTTState] | None]:
        """x [B, L, C] -> (y [B, L, C], state). The state (causal, one-directional layers) lets the
        next call continue the sequence exactly; it is None otherwise.

        Variable-length batches (as :func:`ttt_core.ttt_linear`): ``lengths`` [B], the real tokens
        of each sample of a right-padded x (padding never reaches a real token); ``cu_seqlens``
        [N + 1], the offsets of N sequences packed in x [1, T, C]. Every sequence runs alone from
        its own state: ``state`` and the returned state are lists, one ``TTTState`` per sequence
        (batch 1). Bidirectional layers reverse each sequence within its own tokens.

        The block around the layer, ``x + TTT(pre_norm(x))`` (a transformer's pre-norm residual
        block): ``pre_norm`` a module applied to x first (e.g. the host model's RMSNorm), and
        ``residual`` adds x to the output. Passed here rather than applied around the call, they
        are part of a backend's fused single-token step (ttt-cuda's CPU layer step fuses an RMS
        norm: see ``backends``)."""
        c = self.config
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != c.hidden_size:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, L, C={c.hidden_size}], got {shape}")
        stream = c.causal and not c.bidirectional
        if state is not None and not stream:
            raise ValueError(
                "state is only accepted by causal, one-directional TTT layers (streaming)"
            )
        if cu_seqlens is not None and x.shape[0] != 1:
            raise ValueError(f"cu_seqlens packs sequences along L: x must be [1, T, C], got "
                             f"{list(x.shape)}")  # fmt: skip
        if pre_norm is not None and not callable(pre_norm):
            raise TypeError(f"pre_norm must be a module (x -> x), got {type(pre_norm).__name__}")
        if not isinstance(residual, bool):
            raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
        varlen = {n: t for n, t in (("lengths", lengths), ("cu_seqlens", cu_seqlens))
                  if t is not None}  # fmt: skip
        if stream and x.shape[1] == 1 and not varlen:  # one streaming token: a fused layer step?
            block = {"pre_norm": pre_norm, "residual": residual}
            fused = backends.layer_step_backend(c.backend, x, layer=self, **block)
            if fused is not None:
                return self._fused_step(fused, x, state, block)
        h = x if pre_norm is None else pre_norm(x)  # (B, L, C)
        parts = self.project(h)
        inputs = self.inner_inputs(h, parts)
        o, new_state = self._run_inner(inputs, state, stream, varlen)
        o = self._merge(o)  # (B, L, H*D)
        y = self.post_norm(o)
        if c.gate == "gelu":
            y = F.gelu(parts[3], approximate="tanh") * y
        y = self.o_proj(y)  # (B, L, C)
        if c.gate == "tanh_alpha":
            y = torch.tanh(self.gate_alpha) * y
        if c.bidirectional:
            order = reversal_order(x.shape[0], x.shape[1], x.device, lengths, cu_seqlens)
            rev = {n: reverse(t, order) for n, t in inputs.items()}  # reversed along L
            o_rev, _ = self._run_inner(rev, None, False, varlen)
            y_rev = self.o_proj(self.post_norm(self._merge(reverse(o_rev, order))))
            y = y + torch.tanh(self.reverse_alpha) * y_rev
        if residual:
            y = x.to(y) + y
        return y, new_state

    @torch.no_grad()
    def inner_loss_report(self, x: Tensor) -> dict[str, Tensor]:
        """Mean inner token loss of x's tokens at their mini-batch's start weights ("before") and at
        the weights after that mini-batch's update ("after") -- how much the inner loop learns.

        Returns scalars ``{"before": ..., "after": ...}`` (fp32)."""
        c = self.config
        inputs = self.inner_inputs(x)
        L = x.shape[1]
        b = L if c.mini_batch_size is None else c.mini_batch_size
        kw = {**self._inner_kwargs(), "causal": True, "mini_batch_size": b}
        if not c.causal:  # a non-causal mini-batch ends at W - sum_j eta_j grad_j: the "sum" scale
            kw["token_scale"] = "sum"
        learner, total = self.inner, {"before": 0.0, "after": 0.0}
        state = learner.init_state(x.shape[0])
        for s in range(0, L, b):
            chunk = {n: t[:, :, s : s + b] for n, t in inputs.items()}
            total["before"] += self._token_loss(state.fast_weights(kw["token_scale"]), chunk).sum()
            extra = {"momentum": chunk["momentum"], "decay": chunk["decay"]} if c.titans else {}
            _, state = learner(chunk["q"], chunk["k"], chunk["v"], chunk["eta"], state=state,
                               output_final_state=True, **extra, **kw)  # fmt: skip
            total["after"] += self._token_loss(state.fast_weights(kw["token_scale"]), chunk).sum()
        n = x.shape[0] * c.num_heads * L
        return {name: (t / n).float() for name, t in total.items()}

    def _token_loss(self, weights: dict[str, Tensor], chunk: dict[str, Tensor]) -> Tensor:
        """l_j at per-sample weights [B, H, ...] for the chunk's tokens: [B, H, n]."""
        f = vmap(vmap(self.inner.fast_model))  # over B, H
        k = chunk["k"].float()
        z = f(weights, k)  # (B, H, n, D)
        pred = layer_norm_heads(
            z, self.inner.ln_weight.float(), self.inner.ln_bias.float(), self.inner.eps
        )
        target = reconstruction(k, chunk["v"].float(), self.config.reconstruction_target)
        return 0.5 * (pred - target).pow(2).sum(-1)


def reversal_order(B: int, L: int, device, lengths=None, cu_seqlens=None) -> Tensor | None:
    """The positions [B, L] that reverse every sequence within its own tokens (padding stays where
    it is): sequence ``[s, e)`` of a sample reads position ``s + e - 1 - j`` at j. None (a plain
    flip of L) without ``lengths``/``cu_seqlens``."""
    if lengths is None and cu_seqlens is None:
        return None
    order = torch.arange(L, device=device).repeat(B, 1)  # (B, L)
    for sample, start, end in sequence_bounds(cu_seqlens, lengths):
        order[sample, start:end] = order[sample, start:end].flip(0)
    return order


def reverse(t: Tensor, order: Tensor | None) -> Tensor:
    """t [B, H, L, ...] reordered along L by :func:`reversal_order` (its own inverse)."""
    if order is None:
        return t.flip(2)
    B, L = order.shape
    index = order.view(B, 1, L, *([1] * (t.ndim - 3))).expand_as(t)  # (B, H, L, ...)
    return t.gather(2, index)
