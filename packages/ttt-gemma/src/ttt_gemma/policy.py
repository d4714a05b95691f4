"""Flow-matching policy head of pi0.5 around the action expert: time embedding, in/out
projections, training loss and Euler sampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ActionExpertConfig
from .expert import ActionExpert
from .prefix import PrefixKV


def sincos_time_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """openpi's sine-cosine embedding of the flow time.

    ``period_k = min_period * (max_period / min_period) ** (k / (dim/2 - 1))``,
    ``emb = [sin(2 pi t / period), cos(2 pi t / period)]``.

    Args:
        t: [B] times in [0, 1].

    Returns:
        [B, dim] float32.
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac  # (dim/2,)
    arg = (2 * math.pi / period)[None, :] * t.double()[:, None]  # (B, dim/2)
    return torch.cat([arg.sin(), arg.cos()], dim=1).float()


def flow_time(batch: int, beta: tuple[float, float], device=None, generator=None) -> Tensor:
    """Training flow times ``t ~ Beta(a, b) * 0.999 + 0.001``, [batch] float32.

    Drawn by the inverse CDF ``u^(1/a)`` when ``b == 1`` (pi0.5's Beta(1.5, 1); takes
    ``generator``), else with ``torch.distributions.Beta`` (global RNG)."""
    a, b = beta
    if b == 1.0:
        t = torch.rand(batch, generator=generator, device=device).pow(1.0 / a)
    else:
        t = torch.distributions.Beta(
            torch.tensor(float(a), device="cpu"), torch.tensor(float(b), device="cpu")
        ).sample((batch,))
    return t.to(device) * 0.999 + 0.001


class FlowMatchingPolicy(nn.Module):
    """pi0.5's action head: a flow-matching denoiser of action chunks built on :class:`ActionExpert`.

    - time: ``cond = swish(time_mlp_out(swish(time_mlp_in(sincos(t)))))`` feeds every AdaRMS norm
      (pi0.5). With ``use_adarms=False`` the time is mixed into the action tokens instead (pi0:
      ``action_time_mlp_out(swish(action_time_mlp_in([a, sincos(t)])))``).
    - tokens: ``action_in_proj(x_t)``; velocity ``v = action_out_proj(expert(tokens))``.
    - training: ``x_t = t * noise + (1 - t) * actions``, target ``u = noise - actions``,
      ``t ~ Beta(1.5, 1) * 0.999 + 0.001``, loss ``mean((v - u)^2)``.
    - sampling: Euler from t = 1 (noise) to t = 0: ``x <- x + dt * v(x, t)``, ``dt = -1/steps``.

    Parameter names match openpi's (``action_in_proj``, ``action_out_proj``, ``time_mlp_in``,
    ``time_mlp_out``; the expert under ``expert.``); see :mod:`ttt_gemma.checkpoint`.
    """

    def __init__(self, config: ActionExpertConfig):
        super().__init__()
        self.config = c = config
        self.expert = ActionExpert(config)
        self.action_in_proj = nn.Linear(c.action_dim, c.width)
        self.action_out_proj = nn.Linear(c.width, c.action_dim)
        if c.use_adarms:
            self.time_mlp_in = nn.Linear(c.width, c.width)
            self.time_mlp_out = nn.Linear(c.width, c.width)
        else:
            self.action_time_mlp_in = nn.Linear(2 * c.width, c.width)
            self.action_time_mlp_out = nn.Linear(c.width, c.width)

    def velocity(self, x_t: Tensor, t: Tensor, prefix: PrefixKV | None = None) -> Tensor:
        """The predicted velocity field.

        Args:
            x_t: [B, A, action_dim] noisy actions at time t.
            t: [B] flow time.
            prefix: per-layer prefix keys/values or None.

        Returns:
            [B, A, action_dim].
        """
        c = self.config
        if x_t.ndim != 3 or x_t.shape[-1] != c.action_dim:
            raise ValueError(f"x_t: expected [B, A, {c.action_dim}], got {tuple(x_t.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t: expected [{x_t.shape[0]}], got {tuple(t.shape)}")
        temb = sincos_time_embedding(t, c.width, c.min_period, c.max_period).to(x_t.dtype)
        tokens = self.action_in_proj(x_t)  # (B, A, C)
        if c.use_adarms:
            cond = self.time_condition(temb)  # (B, C)
        else:
            cond = None
            both = torch.cat([tokens, temb[:, None].expand_as(tokens)], dim=-1)  # (B, A, 2C)
            tokens = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(both)))
        return self.action_out_proj(self.expert(tokens, cond, prefix))

    def time_condition(self, temb: Tensor) -> Tensor:
        """AdaRMS condition ``swish(time_mlp_out(swish(time_mlp_in(temb))))``: [B, C] -> [B, C]."""
        return F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the policy's parameters: noise, times and x_t are created in it."""
        return self.action_in_proj.weight.dtype

    def sample_time(self, batch: int, device=None, generator: torch.Generator | None = None):
        """:func:`flow_time` with the config's Beta, [batch] in the policy's dtype."""
        return flow_time(batch, self.config.time_beta, device, generator).to(self.dtype)

    def loss(
        self,
        actions: Tensor,
        prefix: PrefixKV | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """Flow-matching loss ``mean((v(x_t, t) - (noise - actions))^2)``.

        Args:
            actions: [B, A, action_dim] expert action chunks.
            prefix: prefix keys/values or None.
            noise: [B, A, action_dim] or None (standard normal).
            t: [B] or None (sampled from the Beta schedule).

        Actions, noise and t are cast to the policy's dtype (a pure-bf16 policy works in bf16).

        Returns:
            scalar loss (in the policy's dtype).
        """
        B, dtype = actions.shape[0], self.dtype
        actions = actions.to(dtype)
        noise = torch.randn_like(actions) if noise is None else noise.to(dtype)
        t = self.sample_time(B, actions.device) if t is None else t.to(dtype)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions  # (B, A, Da)
        return F.mse_loss(self.velocity(x_t, t, prefix), noise - actions)

    @torch.no_grad()
    def sample(
        self,
        prefix: PrefixKV | None = None,
        noise: Tensor | None = None,
        num_steps: int | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Euler integration of the flow from t = 1 to t = 0.

        Args:
            prefix: prefix keys/values or None.
            noise: [B, A, action_dim] start, or None (standard normal; B from the prefix or
                ``batch_size``).
            num_steps: Euler steps (default ``config.num_sample_steps``, 10).

        Returns:
            [B, A, action_dim] sampled action chunk.
        """
        c = self.config
        steps = num_steps or c.num_sample_steps
        if noise is None:
            B = prefix.pad_mask.shape[0] if prefix is not None else batch_size
            if B is None:
                raise ValueError("batch_size: needed when neither prefix nor noise is given")
            device = self.action_in_proj.weight.device
            noise = torch.randn(B, c.action_horizon, c.action_dim, device=device)
        x, dt = noise.to(self.dtype), -1.0 / steps
        for i in range(steps):
            t = torch.full((x.shape[0],), 1.0 + i * dt, device=x.device, dtype=x.dtype)
            x = x + dt * self.velocity(x, t, prefix)
        return x
