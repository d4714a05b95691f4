"""A policy over a robot's state vector: the stand-in prefix encoder reads the state as tokens.

This is what ``ttt-gemma train`` trains on LeRobot datasets without images (and what the
Reacher demo uses): each state dimension is one prefix token ``[value, one-hot(index)]``, the
stand-in encoder turns the tokens into per-layer keys/values, and the flow-matching policy
denoises the action chunk while attending to them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ActionExpertConfig, PrefixEncoderConfig
from .policy import FlowMatchingPolicy
from .prefix import StandInPrefixEncoder


def state_tokens(state: Tensor) -> Tensor:
    """[B, S] state -> [B, S, 1 + S] tokens: token i is ``[state_i, one-hot(i)]``."""
    B, S = state.shape
    onehot = torch.eye(S, dtype=state.dtype, device=state.device).expand(B, S, S)  # (B, S, S)
    return torch.cat([state[..., None], onehot], dim=-1)


class StatePolicy(nn.Module):
    """Stand-in prefix encoder over state tokens (``encoder``, "the VLM") + ``policy``.

    Args:
        config: the action expert and policy head.
        state_dim: S, the state vector's size.
        prefix_width, prefix_mlp_dim: the stand-in encoder's size (its depth, KV heads and head
            dim follow the expert's).
    """

    def __init__(
        self, config: ActionExpertConfig, state_dim: int, prefix_width: int, prefix_mlp_dim: int
    ):
        super().__init__()
        self.state_dim = state_dim
        self.encoder = StandInPrefixEncoder(
            PrefixEncoderConfig.for_expert(
                config, feature_dim=1 + state_dim, width=prefix_width, mlp_dim=prefix_mlp_dim
            )
        )
        self.policy = FlowMatchingPolicy(config)

    def prefix(self, state: Tensor):
        """[B, S] state -> the per-layer prefix keys/values (in the encoder's dtype)."""
        if state.ndim != 2 or state.shape[1] != self.state_dim:
            raise ValueError(f"state: expected [B, {self.state_dim}], got {tuple(state.shape)}")
        return self.encoder(state_tokens(state.to(self.encoder.in_proj.weight.dtype)))

    def forward(self, state: Tensor, actions: Tensor, noise=None, t=None) -> Tensor:
        """Flow-matching loss of action chunks [B, H, A] given states [B, S] (the training call:
        DDP and FSDP2 hook into ``forward``)."""
        return self.policy.loss(actions, self.prefix(state), noise=noise, t=t)

    loss = forward

    @torch.no_grad()
    def sample(self, state: Tensor, noise: Tensor | None = None) -> Tensor:
        """Sampled action chunks [B, H, A] for states [B, S]."""
        return self.policy.sample(self.prefix(state), noise=noise)
