"""Fine-tuning config, read from YAML in the style of moshi-finetune.

Example (``example_finetune.yaml`` in the package)::

    run_dir: runs/ttt-moshi
    data:
      train_data: [shards/train-000.npz]
      eval_data: [shards/eval-000.npz]
    duration_sec: 20.0        # window length; steps = duration_sec * frame_rate
    batch_size: 4
    max_steps: 2000
    max_norm: 1.0             # gradient clipping (total L2 norm)
    optim: {lr: 3.0e-4, weight_decay: 0.1, pct_start: 0.10}
    model:
      moshi_weights: null     # plain Moshi LMModel checkpoint (.safetensors); null: random init
      lm_kwargs: {...}        # moshi.models.lm.LMModel arguments
    ttt: {layers: [3, 7, 11], inner: linear, mini_batch_size: 16, gate_init: 0.1}
    attention_context: 100    # every layer
    ttt_attention_context: 50 # TTT layers
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DataConfig", "FinetuneConfig", "ModelConfig", "OptimConfig", "TTTSection"]


@dataclass
class DataConfig:
    train_data: list[str] = field(default_factory=list)  # shard files (.npz / .safetensors)
    eval_data: list[str] = field(default_factory=list)  # optional held-out shards
    allow_zero_token: bool = True  # accept Moshi's -1 ("no input") token ids


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate of the one-cycle schedule
    weight_decay: float = 0.1  # AdamW
    pct_start: float = 0.10  # fraction of steps spent warming up
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self) -> None:
        _floats(self, "optim", ("lr", "weight_decay", "pct_start"))


@dataclass
class ModelConfig:
    lm_kwargs: dict[str, Any] = field(default_factory=dict)  # moshi LMModel(**lm_kwargs)
    moshi_weights: str | None = None  # plain Moshi checkpoint (.safetensors) loaded before patching


@dataclass
class TTTSection:
    layers: list[int] = field(default_factory=list)  # main-transformer layers that get TTT
    inner: str = "linear"  # "linear" | "mlp"
    num_heads: int | None = None  # TTT heads of the attention head dim; None: model heads // 4
    mini_batch_size: int = 16
    base_lr: float = 1.0  # eta = base_lr * sigmoid(x W_lr + b_lr) / head_dim
    gate_init: float = 0.1  # tanh(alpha) gate; 0.0 = exact start from the checkpoint
    extra: dict[str, Any] = field(default_factory=dict)  # any other TTTConfig field

    def __post_init__(self) -> None:
        _floats(self, "ttt", ("base_lr", "gate_init"))


@dataclass
class FinetuneConfig:
    run_dir: str = "runs/ttt-moshi"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ttt: TTTSection = field(default_factory=TTTSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    duration_sec: float = 20.0  # training window length in seconds
    frame_rate: float = 12.5  # Moshi steps per second
    batch_size: int = 4
    max_steps: int = 1000
    max_norm: float = 1.0  # gradient clipping
    text_loss_weight: float = 1.0
    train_only_ttt: bool = False  # freeze the Moshi weights, train the TTT blocks only
    attention_context: int | dict[int, int] | None = 100  # every layer, or {layer: window}
    ttt_attention_context: int | None = 50
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    log_freq: int = 10  # monitoring every log_freq steps (inner losses, grad norms)
    ckpt_freq: int = 0  # 0: only the final checkpoint
    eval_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        _floats(self, "config", ("duration_sec", "frame_rate", "max_norm", "text_loss_weight"))

    @property
    def seq_len(self) -> int:
        """Window length in steps."""
        return round(self.duration_sec * self.frame_rate)

    def validate(self) -> FinetuneConfig:
        checks = [
            ("duration_sec", self.seq_len >= 2, "must give at least 2 steps"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("max_norm", self.max_norm > 0, "must be > 0"),
            ("max_bad_steps", self.max_bad_steps >= 1, "must be >= 1"),
            ("log_freq", self.log_freq >= 1, "must be >= 1"),
            ("optim.lr", self.optim.lr > 0, "must be > 0"),
            ("optim.pct_start", 0 < self.optim.pct_start < 1, "must be in (0, 1)"),
            (
                "optim.pct_start",
                self.optim.pct_start * self.max_steps > 1
                and (1 - self.optim.pct_start) * self.max_steps > 1,
                "* max_steps must leave more than one step to warm up and to anneal",
            ),
            ("ttt.mini_batch_size", self.ttt.mini_batch_size >= 1, "must be >= 1"),
            ("ttt.inner", self.ttt.inner in ("linear", "mlp"), "must be 'linear' or 'mlp'"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ValueError(f"config {name} {msg} (got {_get(self, name)!r})")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        return _build(cls, d, "config").validate()

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> FinetuneConfig:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{path}: the YAML top level must be a mapping")
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        d = self.to_dict()
        d["optim"]["betas"] = list(d["optim"]["betas"])
        path.write_text(yaml.safe_dump(d, sort_keys=False))
        return path


def _floats(obj: Any, where: str, names: tuple[str, ...]) -> None:
    """YAML 1.1 reads ``3e-4`` as a string: coerce numeric fields, naming the bad one."""
    for name in names:
        value = getattr(obj, name)
        try:
            setattr(obj, name, float(value))
        except (TypeError, ValueError):
            raise ValueError(f"{where}.{name} must be a number, got {value!r}") from None


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    sub = {"data": DataConfig, "model": ModelConfig, "ttt": TTTSection, "optim": OptimConfig}
    for k, v in d.items():
        if k in sub and cls is FinetuneConfig:
            kwargs[k] = _build(sub[k], v, f"{where}.{k}")
        elif k == "betas":
            kwargs[k] = tuple(float(b) for b in v)
        else:
            kwargs[k] = v
    return cls(**kwargs)
