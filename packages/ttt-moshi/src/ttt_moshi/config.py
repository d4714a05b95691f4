"""Fine-tuning config, read from YAML with moshi-finetune's key names where one exists.

Every key is typed and range-checked by ttt-core's `typed_config`: a bad value raises a
``ConfigError`` (a ``ValueError``) naming the dotted key and what it accepts (``optim.lr: -1``,
``full_finetuning: "false"``, ``ckpt_freq: -1`` are refused). Example (``example_finetune.yaml``)::

    run_dir: runs/ttt-moshi
    data: {train_data: [shards/train-000.npz], eval_data: [shards/eval-000.npz]}
    duration_sec: 160.0       # window length; steps = duration_sec * frame_rate (2000 at 12.5 Hz)
    batch_size: 4             # per process
    max_steps: 2000
    optim: {lr: 3.0e-4, weight_decay: 0.1, pct_start: 0.05}
    full_finetuning: false    # false: train the TTT blocks (+ lora, + train_modules) only
    lora: {enable: true, rank: 128, scaling: 2.0}
    first_codebook_weight_multiplier: 100.0
    text_padding_weight: 0.5
    model: {moshi_weights: null, lm_kwargs: {...}}
    ttt:
      layers: [3, 7, 11]
      config: {inner: linear, mini_batch_size: 16, gate_init: 0.0}   # ttt_core.TTTConfig fields

``ttt.config`` is a `ttt_core.TTTConfig` without the fields that come from the model
(``hidden_size``; ``num_heads`` and ``head_dim`` default to a quarter of the model's heads of the
attention head dim): see `TTTSection.ttt_config`. The spellings of ttt-moshi 0.1 (``ttt.inner``,
``ttt.mini_batch_size``, ``ttt.extra``, ``train_only_ttt``, ...) still load: `OLD_SPELLINGS` maps
them to the new keys.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ttt_core import TTTConfig
from ttt_core.typed_config import (
    ConfigError,
    apply_renames,
    config_from_dict,
    config_to_dict,
    ranged,
)

__all__ = [
    "OLD_SPELLINGS",
    "DataConfig",
    "FinetuneConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "TTTSection",
    "ttt_block_config",
]

log = logging.getLogger("ttt_moshi.config")

# ttt-moshi 0.1 spelling -> today's key (they keep loading; a log line names the new spelling);
# all under ttt.
OLD_SPELLINGS = {
    "ttt.inner": "ttt.config.inner",
    "ttt.num_heads": "ttt.config.num_heads",
    "ttt.mini_batch_size": "ttt.config.mini_batch_size",
    "ttt.base_lr": "ttt.config.base_lr",
    "ttt.gate_init": "ttt.config.gate_init",
}


@dataclass
class DataConfig:
    train_data: list[str] = field(default_factory=list)  # shard files (.npz / .safetensors)
    eval_data: list[str] = field(default_factory=list)  # optional held-out shards
    shuffle: bool = True  # reshuffle the training windows every epoch
    allow_zero_token: bool = True  # accept Moshi's -1 ("no input") token ids


@dataclass
class OptimConfig:
    lr: float = ranged(3e-4, min=0, min_exclusive=True)  # peak lr of the one-cycle schedule
    weight_decay: float = ranged(0.1, min=0)  # AdamW
    pct_start: float = ranged(0.05, min=0, max=1, min_exclusive=True, max_exclusive=True)
    betas: tuple[float, float] = ranged((0.9, 0.95), min=0, max=1, max_exclusive=True)


@dataclass
class LoraConfig:
    """LoRA on the attention and feed-forward linears (moshi's own `LoRALinear`)."""

    enable: bool = False
    rank: int = ranged(128, min=1)
    scaling: float = ranged(2.0, min=0, min_exclusive=True)  # y = W x + scaling * B A x
    ft_embed: bool = False  # also train the embeddings when full_finetuning is false


@dataclass
class ModelConfig:
    lm_kwargs: dict[str, Any] = field(default_factory=dict)  # moshi LMModel(**lm_kwargs)
    moshi_weights: str | None = None  # plain Moshi checkpoint (.safetensors) loaded before patching


@dataclass
class TTTSection:
    """Which layers get TTT, and the TTT block's `TTTConfig` (minus what the model fixes)."""

    layers: list[int] = ranged(default_factory=list, min=0)  # noqa: RUF009 - layers with TTT
    config: dict[str, Any] = field(default_factory=dict)  # TTTConfig fields (see ttt_config)

    def check_layers(self, num_layers: int) -> None:
        """ConfigError naming ``ttt.layers`` unless it holds distinct indices of a model with
        ``num_layers`` layers."""
        for i in self.layers:
            if i >= num_layers:
                raise ConfigError(
                    "ttt.layers",
                    f"holds {i}; the model has {num_layers} layers (indices 0..{num_layers - 1})",
                )
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError("ttt.layers", f"has duplicates: {self.layers}")

    def ttt_config(self, dim: int, num_heads: int) -> TTTConfig:
        """The blocks' `TTTConfig` for a model of width ``dim`` with ``num_heads`` attention heads
        (see `ttt_block_config`); errors name ``ttt.config.<field>``."""
        return ttt_block_config(dim, num_heads, self.config, prefix="ttt.config")


def ttt_block_config(
    dim: int, num_heads: int, fields: dict[str, Any], prefix: str = "ttt"
) -> TTTConfig:
    """The `TTTConfig` of a TTT block inside a Moshi layer of width ``dim`` with ``num_heads`` heads.

    ``hidden_size`` is ``dim``. Unless ``fields`` sets them (a None value keeps the default):
    ``num_heads`` a quarter of the model's heads (at least 1) and ``head_dim`` the attention head
    dim, so the inner width is ``dim / 4`` (Moshi 7B: 8 TTT heads of 128); ``causal`` true; the gate
    ``tanh_alpha`` (``gate_init`` 0 makes the block exactly zero at the start). Every value is
    type- and range-checked (`typed_config`); errors name ``<prefix>.<field>``.
    """
    if "hidden_size" in fields:
        raise ConfigError(f"{prefix}.hidden_size", "is the model width: remove it")
    raw = {
        "hidden_size": dim,
        "num_heads": max(1, num_heads // 4),
        "head_dim": dim // num_heads,
        "causal": True,
        "gate": "tanh_alpha",
        **{k: v for k, v in fields.items() if v is not None},
    }
    try:
        return config_from_dict(TTTConfig, raw, prefix=prefix)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # TTTConfig's own cross-field checks
        raise ConfigError(prefix, str(e)) from None


@dataclass
class FinetuneConfig:
    run_dir: str = (
        "runs/ttt-moshi"  # a fresh folder; --resume continues it, --overwrite replaces it
    )
    overwrite_run_dir: bool = False  # as --overwrite
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTSection = field(default_factory=TTTSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    duration_sec: float = ranged(160.0, min=0, min_exclusive=True)  # 2000 steps at 12.5 Hz
    frame_rate: float = ranged(12.5, min=0, min_exclusive=True)  # Moshi steps per second
    batch_size: int = ranged(4, min=1)  # windows per process and step
    max_steps: int = ranged(1000, min=1)
    max_norm: float = ranged(1.0, min=0, min_exclusive=True)  # gradient clipping (total L2 norm)
    full_finetuning: bool = True  # false: train the TTT blocks, LoRA and train_modules only
    train_modules: list[str] = field(default_factory=list)  # param-name globs trained when not full
    param_dtype: str = ranged("float32", choices=("float32", "bfloat16"))
    gradient_checkpointing: bool = False  # recompute each main-transformer layer in the backward
    parallelism: str = ranged("fsdp", choices=("fsdp", "ddp"))  # under torchrun (world size > 1)
    text_loss_weight: float = ranged(1.0, min=0)  # loss = w * text CE + audio CE
    first_codebook_weight_multiplier: float = ranged(1.0, min=0)  # weight of audio codebook 1
    text_padding_weight: float = ranged(1.0, min=0)  # weight of the text padding tokens
    attention_context: int | dict[int, int] | None = ranged(100, min=1)  # noqa: RUF009 - all/per layer
    ttt_attention_context: int | None = ranged(50, min=1)  # the TTT layers
    max_bad_steps: int = ranged(5, min=1)  # stop after this many non-finite steps in a row
    log_freq: int = ranged(10, min=1)  # monitoring every log_freq steps (inner losses, norms)
    eval_freq: int = ranged(0, min=0)  # held-out loss every eval_freq steps; 0: never
    eval_batches: int = ranged(4, min=1)
    ckpt_freq: int = ranged(0, min=0)  # step checkpoints every ckpt_freq steps; 0: final only
    num_ckpt_keep: int | None = ranged(3, min=1)  # newest step checkpoints kept; null: all
    seed: int = ranged(0, min=0)

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError("duration_sec", f"gives {self.seq_len} steps; needs >= 2")
        p = self.optim.pct_start
        if not (p * self.max_steps > 1 and (1 - p) * self.max_steps > 1):
            raise ConfigError(
                "optim.pct_start",
                f"{p} * max_steps={self.max_steps} must leave more than one step to warm up and "
                "to anneal",
            )
        if self.full_finetuning and self.lora.enable:
            raise ConfigError("lora.enable", "LoRA trains only with full_finetuning: false")
        if not self.full_finetuning and not (
            self.ttt.layers or self.lora.enable or self.train_modules
        ):
            raise ConfigError(
                "full_finetuning",
                "false leaves nothing to train: set ttt.layers, lora.enable or train_modules",
            )
        kw = self.model.lm_kwargs
        if "num_layers" in kw:
            self.ttt.check_layers(int(kw["num_layers"]))
        if "dim" in kw and "num_heads" in kw and self.ttt.layers:
            self.ttt.ttt_config(int(kw["dim"]), int(kw["num_heads"]))  # errors at load time

    @property
    def seq_len(self) -> int:
        """Window length in steps."""
        return round(self.duration_sec * self.frame_rate)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FinetuneConfig:
        return config_from_dict(cls, _migrate(d or {}))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> FinetuneConfig:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(
                f"config file {str(path)!r} is not valid YAML{where}: {problem}"
            ) from None
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"config file {str(path)!r}: the top level must be a mapping")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_yaml(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path

    def replace(self, **changes: Any) -> FinetuneConfig:
        """A copy with top-level keys changed, checked again."""
        return FinetuneConfig.from_dict({**self.to_dict(), **changes})


def _migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """The 0.1 spellings, moved to today's keys (``ttt.extra`` merges into ``ttt.config``)."""
    old_ttt = raw.get("ttt") if isinstance(raw.get("ttt"), dict) else {}
    renames = {k: v for k, v in OLD_SPELLINGS.items() if k.removeprefix("ttt.") in old_ttt}
    out = apply_renames(raw, renames, migrate=True)
    ttt = out.get("ttt")
    if isinstance(ttt, dict) and "extra" in ttt:
        renames["ttt.extra"] = "ttt.config"
        extra = ttt.pop("extra") or {}
        if not isinstance(extra, dict):
            raise ConfigError("ttt.extra", "must be a mapping (write its keys under ttt.config)")
        both = sorted(set(extra) & set(ttt.get("config") or {}))
        if both:
            raise ConfigError("ttt.extra", f"sets {both} that ttt.config sets too: keep one")
        ttt["config"] = {**(ttt.get("config") or {}), **extra}
    if "train_only_ttt" in out:
        renames["train_only_ttt"] = "full_finetuning (negated)"
        if "full_finetuning" in out:
            raise ConfigError("train_only_ttt", "renamed to full_finetuning: keep only that")
        value = out.pop("train_only_ttt")
        if not isinstance(value, bool):
            raise ConfigError("train_only_ttt", f"got {value!r}; accepts true or false")
        out["full_finetuning"] = not value
    for old, new in renames.items():
        log.warning("config key %r is an old spelling: write %r", old, new)
    return out
