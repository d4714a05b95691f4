"""Data-parallel training of a (patched) Moshi LM: FSDP2 ``fully_shard`` by layer, or DDP.

`TTTStreamingTransformerLayer` subclasses Moshi's `StreamingTransformerLayer`, so sharding "every
Moshi layer" shards the TTT layers too, each TTT block in the same unit as the attention it follows.
The trainer wraps the model in a small module whose forward computes the loss sums
(`LossModule`): the root FSDP unit (embeddings, heads) and DDP's hooks need the forward to enter
through a module call, while Moshi's text-only path calls ``lm.forward_text``.

The FSDP1 auto-wrap policies of ttt-moshi 0.1 are kept for users of the legacy API::

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = FSDP(lm, auto_wrap_policy=fsdp_wrap_policy())
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from torch import Tensor, nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

from .layer import TTTStreamingTransformerLayer
from .losses import LossWeights, token_losses

__all__ = [
    "LossModule",
    "all_sum",
    "barrier",
    "fsdp_wrap_policy",
    "full_value",
    "layer_units",
    "shard_by_layer",
    "ttt_layer_policy",
    "world",
]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class LossModule(nn.Module):
    """``codes [B, K, T] -> [4]`` loss sums of ``lm`` (`TokenLosses.weighted_sums`)."""

    def __init__(self, lm: nn.Module, weights: LossWeights) -> None:
        super().__init__()
        self.lm = lm
        self.weights = weights

    def forward(self, codes: Tensor) -> Tensor:
        return token_losses(self.lm, codes).weighted_sums(self.weights)


def layer_units(module: nn.Module) -> list[nn.Module]:
    """The largest sub-modules of ``module`` that hold parameters, are called (not a ModuleList)
    and are not moshi `StreamingModule`s.

    ``fully_shard`` swaps a module's class for a subclass of (FSDPModule, class); moshi's
    `StreamingModule` derives from ``abc.ABC`` before ``nn.Module``, and Python refuses that swap
    ("object layout differs"). A Moshi layer is therefore sharded as one group of these modules:
    its attention's in/out projections, norms, feed-forward, and TTT block.
    """
    units = []
    for child in module.children():
        if isinstance(child, (StreamingModule, nn.ModuleList, nn.ModuleDict)):
            units += layer_units(child)
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def shard_by_layer(module: LossModule) -> LossModule:
    """FSDP2: one ``fully_shard`` unit per Moshi layer of ``module.lm`` (main transformer and
    depformer, TTT layers included; see `layer_units`), then the root (embeddings, heads); over
    all processes of the default group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in module.lm.modules():
        if isinstance(layer, StreamingTransformerLayer):
            fully_shard(layer_units(layer), mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def fsdp_wrap_policy() -> ModuleWrapPolicy:
    """FSDP1: wrap every Moshi transformer layer (plain or TTT) as one unit."""
    return ModuleWrapPolicy({StreamingTransformerLayer})


def _is_ttt_layer(module: nn.Module) -> bool:
    return isinstance(module, TTTStreamingTransformerLayer)


def ttt_layer_policy():
    """FSDP1: a lambda auto-wrap policy that wraps only the TTT layers."""
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_ttt_layer)


def all_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over the processes (``x`` itself in one process); no gradient."""
    x = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


def full_value(x: Tensor) -> Tensor:
    """A plain tensor from a DTensor (FSDP2 gradient norms) or a tensor."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
