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
from .ops.common import layer_norm_heads
from .ops.decode import decode_flat
from .state import TTTState
from .validation import check_state

__all__ = ["TTTLayer"]

_MATH_DTYPES = (torch.float32, torch.float64)  # the inner loop's own dtypes (compute_dtype)


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

    def inner_inputs(
        self, x: Tensor, parts: list[Tensor] | None = None, *, flat: bool = False
    ) -> dict[str, Tensor]:
        """q, k, v [B, H, L, D], eta [B, H, L] (and momentum/decay) of the inner loop for x [B, L, C]
        (``parts``: ``self.project(x)`` when already computed). ``flat`` (one token, L = 1): the
        decode step's layout, q, k, v [B*H, 1, D] and the rates [B*H, 1, 1]."""
        c = self.config
        parts = self.project(x) if parts is None else parts
        B, H = x.shape[0], c.num_heads
        if flat:
            q, k, v = (t.reshape(B * H, 1, c.head_dim) for t in parts[:3])
        else:
            q, k, v = (self._heads(t) for t in parts[:3])
        if c.qk_l2_norm:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if c.normalize_target:  # target v - k standardised per token
            t = v - k
            t = (t - t.mean(-1, keepdim=True)) * torch.rsqrt(
                t.var(-1, keepdim=True, unbiased=False) + 1e-6
            )
            v = k + t
        rates = torch.sigmoid(parts[-1])  # (B, L, H or 3H)
        scale = c.base_lr / c.head_dim
        if flat and not c.titans:  # one token: (B*H, 1, 1), samples and heads flattened
            rates = rates.view(B * H, 1, 1)
        elif flat:  # (3*B*H, 1, 1): lr | momentum | decay, each over (sample, head)
            rates = rates.view(B, 3, H).transpose(0, 1).reshape(3 * B * H, 1, 1)
        else:
            rates = rates.transpose(1, 2)  # (B, H or 3H, L)
        if not c.titans:
            return {"q": q, "k": k, "v": v, "eta": rates * scale}
        lr, momentum, decay = rates.split(B * H if flat else H, dim=0 if flat else 1)
        return {"q": q, "k": k, "v": v, "eta": lr * scale, "momentum": momentum, "decay": decay}

    def _inner_kwargs(self) -> dict:
        c = self.config
        ts = self.token_scale if c.token_scale == "learnable" else c.token_scale
        return dict(mini_batch_size=c.mini_batch_size, causal=c.causal, token_scale=ts,
                    backend=c.backend, form="auto" if c.use_dual_form else "primal")  # fmt: skip

    def _run_inner(self, inputs: dict[str, Tensor], state: TTTState | None, stream: bool):
        i = inputs
        extra = {"momentum": i["momentum"], "decay": i["decay"]} if "momentum" in i else {}
        return self.inner(i["q"], i["k"], i["v"], i["eta"], state=state, output_final_state=stream,
                          **extra, **self._inner_kwargs())  # fmt: skip

    def _decode_token(self, x: Tensor, parts: list[Tensor], state: TTTState | None):
        """One streaming token x [B, 1, C] straight to the torch backend's decode step, without the
        functional API's per-call bookkeeping (a streaming step is bound by its number of Python
        and tensor ops): the layer builds q, k, v and eta itself, so only the carried state is
        checked. Same result as the general path. Returns (o [B, 1, H*D], state), or None where the
        general path must run (another backend, bf16/fp16 inputs, a custom inner learner)."""
        c, inner = self.config, self.inner
        if (type(inner) not in (LinearLearner, MLPLearner) or x.dtype not in _MATH_DTYPES
                or not backends.is_torch(c.backend, x.device.type)):  # fmt: skip
            return None
        B, b = x.shape[0], c.mini_batch_size
        weights = inner.fast_params()
        if state is None:
            state = TTTState.from_params(weights, B, b, x.dtype)
        else:
            check_state(state, weights, B, b, c.titans)
        i = self.inner_inputs(x, parts, flat=True)
        ts = self.token_scale if c.token_scale == "learnable" else c.token_scale
        o, state = decode_flat(i["q"], i["k"], i["v"], i["eta"], state, inner.ln_weight,
                               inner.ln_bias, batch=B, kind=c.inner, mini_batch_size=b,
                               token_scale=ts, momentum=i.get("momentum"), decay=i.get("decay"),
                               eps=inner.eps)  # fmt: skip
        return o.view(B, 1, c.inner_width), state

    def _merge(self, o: Tensor) -> Tensor:  # [B, H, L, D] -> [B, L, H*D]
        B, H, L, D = o.shape
        if L == 1:  # one token: no transpose needed
            return o.reshape(B, 1, H * D)
        return o.transpose(1, 2).reshape(B, L, H * D)

    def forward(self, x: Tensor, state: TTTState | None = None) -> tuple[Tensor, TTTState | None]:
        """x [B, L, C] -> (y [B, L, C], state). The state (causal, one-directional layers) lets the
        next call continue the sequence exactly; it is None otherwise."""
        c = self.config
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[-1] != c.hidden_size:
            shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, L, C={c.hidden_size}], got {shape}")
        stream = c.causal and not c.bidirectional
        if state is not None and not stream:
            raise ValueError(
                "state is only accepted by causal, one-directional TTT layers (streaming)"
            )
        parts = self.project(x)
        token = self._decode_token(x, parts, state) if stream and x.shape[1] == 1 else None
        if token is not None:
            o, new_state = token  # (B, 1, H*D)
        else:
            inputs = self.inner_inputs(x, parts)
            o, new_state = self._run_inner(inputs, state, stream)
            o = self._merge(o)  # (B, L, H*D)
        y = self.post_norm(o)
        if c.gate == "gelu":
            y = F.gelu(parts[3], approximate="tanh") * y
        y = self.o_proj(y)  # (B, L, C)
        if c.gate == "tanh_alpha":
            y = torch.tanh(self.gate_alpha) * y
        if c.bidirectional:
            rev = {n: t.flip(2) for n, t in inputs.items()}  # reversed along L
            o_rev, _ = self._run_inner(rev, None, False)
            y_rev = self.o_proj(self.post_norm(self._merge(o_rev.flip(2))))
            y = y + torch.tanh(self.reverse_alpha) * y_rev
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
        return 0.5 * (pred - (chunk["v"].float() - k)).pow(2).sum(-1)
