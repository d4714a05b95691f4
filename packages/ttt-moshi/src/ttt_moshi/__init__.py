"""ttt-moshi: Test-Time Training layers inside Kyutai Moshi's streaming transformer.

- `TTTStreamingTransformerLayer`: Moshi's layer with attention -> TTT (gated) -> feed-forward; the
  fast weights and the partial TTT mini-batch live in Moshi's streaming state.
- `patch_lm` / `unpatch_lm` / `export_plain_state_dict`: convert chosen layers of an `LMModel` in
  place, with per-layer local attention windows, and export a plain-Moshi checkpoint.
- `get_ttt_gates` / `set_ttt_gates`: the TTT blocks' tanh(alpha) gates.
- Fine-tuning (`FinetuneConfig`, `Trainer`: exact resume, TTT-only / LoRA / full, bf16, gradient
  checkpointing, FSDP2 / DDP), shards (`TokenShards`, ``ttt-moshi encode``), long-context evaluation
  (`per_position_loss`, `streaming_per_position_loss`, `loss_slope`).

moshi 0.2.13 pins torch<2.10: install it with ``pip install --no-deps moshi==0.2.13`` (see README).
"""

from .checkpoint import build_lm, load_checkpoint, save_checkpoint, ttt_config_for
from .config import FinetuneConfig, ttt_block_config
from .data import TokenShards, load_shard, save_shard
from .evaluate import (
    loss_slope,
    per_position_loss,
    plot_loss_curves,
    streaming_per_position_loss,
)
from .fsdp import fsdp_wrap_policy, register_fsdp_classes, shard_by_layer, ttt_layer_policy
from .layer import TTTRMSNorm, TTTStreamingTransformerLayer, convert_layer, revert_layer
from .lora import add_lora, merge_lora
from .losses import LossWeights, token_losses
from .patch import (
    export_plain_state_dict,
    get_ttt_gates,
    patch_info,
    patch_lm,
    set_attention_contexts,
    set_ttt_gates,
    ttt_layer_indices,
    unpatch_lm,
)
from .train import Trainer, TrainingDiverged, latest_checkpoint

__all__ = [
    "FinetuneConfig",
    "LossWeights",
    "TTTRMSNorm",
    "TTTStreamingTransformerLayer",
    "TokenShards",
    "Trainer",
    "TrainingDiverged",
    "add_lora",
    "build_lm",
    "convert_layer",
    "export_plain_state_dict",
    "fsdp_wrap_policy",
    "get_ttt_gates",
    "latest_checkpoint",
    "load_checkpoint",
    "load_shard",
    "loss_slope",
    "merge_lora",
    "patch_info",
    "patch_lm",
    "per_position_loss",
    "plot_loss_curves",
    "register_fsdp_classes",
    "revert_layer",
    "save_checkpoint",
    "save_shard",
    "set_attention_contexts",
    "set_ttt_gates",
    "shard_by_layer",
    "streaming_per_position_loss",
    "token_losses",
    "ttt_block_config",
    "ttt_config_for",
    "ttt_layer_indices",
    "ttt_layer_policy",
    "unpatch_lm",
]
__version__ = "0.1.0"
