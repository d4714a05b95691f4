"""FSDP auto-wrap policies that find the Moshi layers (TTT ones included) by class.

`TTTStreamingTransformerLayer` subclasses Moshi's `StreamingTransformerLayer`, so a policy written
for plain Moshi (wrap every `StreamingTransformerLayer`) wraps the TTT layers as units too, with
their TTT block inside the same FSDP unit as the attention it follows::

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    model = FSDP(lm, auto_wrap_policy=fsdp_wrap_policy())
"""

from __future__ import annotations

import functools

from moshi.modules.transformer import StreamingTransformerLayer
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

from .layer import TTTStreamingTransformerLayer

__all__ = ["fsdp_wrap_policy", "ttt_layer_policy"]


def fsdp_wrap_policy() -> ModuleWrapPolicy:
    """Wrap every Moshi transformer layer (plain or TTT) as one FSDP unit."""
    return ModuleWrapPolicy({StreamingTransformerLayer})


def _is_ttt_layer(module: nn.Module) -> bool:
    return isinstance(module, TTTStreamingTransformerLayer)


def ttt_layer_policy():
    """A lambda auto-wrap policy that wraps only the TTT layers (e.g. to shard just those)."""
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=_is_ttt_layer)
