"""The config of ``ttt-gemma train``: typed, range-checked sections read from one YAML file.

Example (every key is optional but ``data.root``; see ``configs/reacher.yaml``)::

    data:  {root: datasets/reacher, normalization: zscore}       # or quantile, none
    model:
      expert: {width: 64, depth: 4, mlp_dim: 256, num_heads: 4, head_dim: 16,
               action_dim: 2, action_horizon: 16, use_ttt: true,
               ttt: {input: residual, gating: adarms, layer: {inner: linear}}}
      prefix: {width: 64, mlp_dim: 128}
    train: {steps: 400, batch_size: 32, lr: 2.0e-3, precision: fp32, trainable: all}
    run:   {root: runs, name: reacher-ttt}

That trains a state policy (the stand-in prefix over state tokens). With ``data.image_keys``
(pi0.5 image slot -> dataset camera), ``data.tokenizer`` (a local tokenizer folder) and
``model.vlm`` (the PaliGemma sizes) it trains the whole pi0.5 policy
(:class:`~ttt_gemma.paligemma.Pi05Policy`) from images + prompt + discretised state::

    data:  {root: datasets/aloha, normalization: quantile, tokenizer: tokenizers/paligemma,
            image_keys: {base_0_rgb: observation.images.top}}
    model: {vlm: {}, expert: {...}}         # vlm: {} is pi0.5's PaliGemma 2B
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ttt_core.runfiles import reading
from ttt_core.typed_config import (
    ConfigError,
    apply_renames,
    config_from_dict,
    config_to_dict,
    ranged,
)

from .config import MOVED_TO_LAYER, ActionExpertConfig
from .lerobot import NORMALIZATIONS
from .paligemma import PaliGemmaPrefixConfig

PRECISIONS = ("fp32", "bf16", "autocast_bf16")  # pure bf16 weights | fp32 weights, bf16 autocast
TRAINABLE = ("all", "freeze_vlm", "expert", "ttt")
PARALLEL = ("ddp", "fsdp")


@dataclass
class DataConfig:
    root: str  # a LeRobot v2 dataset folder
    state_key: str = "observation.state"
    action_key: str = "action"
    normalization: str = ranged("zscore", choices=NORMALIZATIONS)  # of states and actions
    # the whole pi0.5 policy: pi0.5 image slot -> camera feature (base_0_rgb, left_wrist_0_rgb,
    # right_wrist_0_rgb; slots not given are masked), a local tokenizer folder, prompt length
    image_keys: dict[str, str] | None = None
    tokenizer: str | None = None
    max_token_len: int = ranged(48, min=1)


@dataclass
class PrefixConfig:
    """The stand-in prefix encoder over state tokens ("the VLM" of a state-only policy)."""

    width: int = ranged(64, min=1)
    mlp_dim: int = ranged(128, min=1)


@dataclass
class ModelConfig:
    expert: ActionExpertConfig = field(default_factory=ActionExpertConfig.tiny)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)  # the state policy's stand-in
    vlm: PaliGemmaPrefixConfig | None = None  # the whole pi0.5 policy's PaliGemma (with images)
    init_pi05: str | None = (
        None  # a pi0.5 model.safetensors (openpi or lerobot naming) to start from
    )


@dataclass
class TrainConfig:
    steps: int = ranged(1000, min=1)
    batch_size: int = ranged(32, min=1)  # global: split evenly over the processes
    lr: float = ranged(1e-4, min=0, min_exclusive=True)
    weight_decay: float = ranged(1e-4, min=0)
    warmup_steps: int = ranged(0, min=0)  # linear warm-up, then cosine decay to 10 % of lr
    grad_clip: float = ranged(1.0, min=0, min_exclusive=True)  # max global gradient norm
    seed: int = ranged(0, min=0)
    precision: str = ranged("fp32", choices=PRECISIONS)
    # what trains: everything | all but the prefix encoder | the expert's layers | TTT branches
    trainable: str = ranged("all", choices=TRAINABLE)
    grad_checkpointing: bool = False  # recompute each expert layer in the backward
    parallel: str = ranged("ddp", choices=PARALLEL)  # under torchrun (WORLD_SIZE > 1)
    log_every: int = ranged(1, min=1)  # steps between per-TTT-layer diagnostics
    ckpt_every: int = ranged(100, min=1)
    threads: int | None = ranged(None, min=1)  # torch CPU threads (None: torch's default)


@dataclass
class RunConfig:
    root: str = "runs"
    name: str = "gemma"  # a relative folder below root


@dataclass
class TrainRunConfig:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.train.warmup_steps >= self.train.steps:
            raise ConfigError(
                "train.warmup_steps",
                f"got {self.train.warmup_steps}; must be < train.steps ({self.train.steps})",
            )
        data, vlm = self.data, self.model.vlm
        if (vlm is None) != (data.image_keys is None):
            key = "model.vlm" if vlm is None else "data.image_keys"
            raise ConfigError(
                key, "the whole pi0.5 policy needs both data.image_keys and model.vlm"
            )
        if vlm is None:
            return
        if not data.image_keys:
            raise ConfigError("data.image_keys", "map at least one pi0.5 image slot to a camera")
        if data.tokenizer is None:
            raise ConfigError("data.tokenizer", "a local tokenizer folder is needed with images")
        for name in ("depth", "num_kv_heads", "head_dim"):
            if getattr(vlm, name) != getattr(self.model.expert, name):
                raise ConfigError(
                    f"model.vlm.{name}",
                    f"got {getattr(vlm, name)}; must equal model.expert.{name} "
                    f"({getattr(self.model.expert, name)}): the expert reads each VLM layer's K/V",
                )


# 0.1 spellings of the expert's TTT options: the error gives the new key
RENAMES = {
    f"model.expert.ttt.{old}": f"model.expert.ttt.{new}" for old, new in MOVED_TO_LAYER.items()
}


def config_from_yaml_text(text: str, source: str = "<config>") -> TrainRunConfig:
    """Parse and check a YAML config; errors name the dotted key (ConfigError, a ValueError)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping with data/model/train/run sections")
    try:
        return config_from_dict(TrainRunConfig, apply_renames(raw, RENAMES))
    except ValueError as err:  # ConfigError included: it names the dotted key
        raise ValueError(f"{source}: {err}") from err


def load_config(path: str | Path) -> TrainRunConfig:
    """Read ``path`` (YAML) into a checked :class:`TrainRunConfig`."""
    with reading(path, "config") as p:
        text = p.read_text(encoding="utf-8")
    return config_from_yaml_text(text, str(path))


def config_to_yaml(cfg: TrainRunConfig) -> str:
    """The config as YAML that :func:`config_from_yaml_text` reads back to an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
