"""Data-parallel training of a (patched) Moshi LM: FSDP2 ``fully_shard`` by layer, or DDP.

`TTTStreamingTransformerLayer` subclasses Moshi's `StreamingTransformerLayer`, so sharding "every
Moshi layer" shards the TTT layers too, each TTT block in the same unit as the attention it follows.
Moshi's layers cannot go through ``fully_shard`` as they are: see `FSDPStreamingModule` for why
and how ttt-moshi makes the class swap work, by registering one class per Moshi layer class in
torch's own class table (`register_fsdp_classes`).

The trainer wraps the model in a small module whose forward computes the loss sums
(`LossModule`): the root FSDP unit (embeddings, heads) and DDP's hooks need the forward to enter
through a module call, while Moshi's text-only path calls ``lm.forward_text``.

The FSDP1 auto-wrap policies of ttt-moshi 0.1 are kept for users of the legacy API::

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = FSDP(lm, auto_wrap_policy=fsdp_wrap_policy())
"""

from __future__ import annotations

import abc
import functools

import torch.distributed as dist
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingTransformerLayer
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

from .layer import TTTStreamingTransformerLayer
from .losses import LossWeights, token_losses

__all__ = [
    "FSDPStreamingModule",
    "LossModule",
    "all_sum",
    "barrier",
    "fsdp_wrap_policy",
    "full_value",
    "register_fsdp_classes",
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


class FSDPStreamingModule(abc.ABC, FSDPModule):
    """The FSDP2 mix-in for moshi `StreamingModule`s, laid out so that the class swap works.

    ``fully_shard(module)`` turns ``module`` into an FSDP unit by assigning ``module.__class__ =
    type("FSDP" + name, (FSDPModule, cls), ...)``. CPython allows a ``__class__`` assignment only
    between classes with the same instance layout: walking each class down its C base
    (``tp_base``) while it adds no instance slots, both walks must end at classes that add the
    same slots (``__dict__``, ``__weakref__``) onto the same C base. The C base of a class is the
    first of its bases whose layout is the most derived, and moshi's
    ``StreamingModule(abc.ABC, nn.Module, Generic)`` lists ``abc.ABC`` (no ``__dict__``) first:

    - a moshi layer's walk ends at ``StreamingModule``, which adds ``__dict__`` and
      ``__weakref__`` onto ``abc.ABC``;
    - torch's ``(FSDPModule, cls)`` has ``FSDPModule`` as C base, whose walk ends at
      ``FSDPModule``: ``__dict__`` and ``__weakref__`` onto ``object``.

    ``object`` is not ``abc.ABC``, so CPython raises "__class__ assignment: 'FSDP...' object
    layout differs". (A plain ``nn.Module`` subclass passes: its walk ends at ``nn.Module``, which
    adds the same two slots onto ``object``.) This mix-in lists ``abc.ABC`` first as well, so its
    C base is ``abc.ABC`` and ``(FSDPStreamingModule, cls)`` has exactly a moshi layer's layout.
    Its MRO is ``[FSDP<cls>, FSDPStreamingModule, cls, ..., StreamingModule, ABC, FSDPModule,
    nn.Module, ...]``: the original class at index 2, where ``FSDPModule.__new__`` looks for it,
    and ``FSDPModule`` before ``nn.Module`` (its ``_apply`` overrides ``nn.Module._apply``; moshi
    overrides none of ``FSDPModule``'s methods, which a test checks).
    """

    def __deepcopy__(self, memo: dict) -> None:  # as torch's FSDP classes
        raise AssertionError(
            "FSDP does not support deepcopy. Please use state dict for serialization."
        )


def register_fsdp_classes(module: nn.Module) -> None:
    """Register in torch's class table (``get_cls_to_fsdp_cls``, the one ``fully_shard`` reads
    and fills) an FSDP class built on `FSDPStreamingModule` for every `StreamingModule` class in
    ``module``, so that ``fully_shard`` can make any of them a unit. An entry torch made itself
    for such a class (it enters ``(FSDPModule, cls)`` before the swap that then fails) is
    replaced; plain ``nn.Module`` classes need none."""
    table = get_cls_to_fsdp_cls()
    for m in module.modules():
        cls = type(m)
        if not isinstance(m, StreamingModule) or isinstance(m, FSDPModule):
            continue
        if not issubclass(table.get(cls, object), FSDPStreamingModule):
            table[cls] = type(
                f"FSDP{cls.__name__}", (FSDPStreamingModule, cls), {"__module__": __name__}
            )


def shard_by_layer(module: LossModule) -> LossModule:
    """FSDP2: one ``fully_shard`` unit per Moshi layer of ``module.lm`` (every
    `StreamingTransformerLayer` of the main transformer and the depformer, TTT layers included),
    then the root (embeddings, heads); over all processes of the default group. State dict keys
    are unchanged (the modules stay where they are; only their classes change)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(module.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    register_fsdp_classes(module.lm)
    for layer in module.lm.modules():
        if isinstance(layer, StreamingTransformerLayer):
            fully_shard(layer, mesh=mesh)
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
