"""Experiment configuration: dataclasses, YAML files with a `base:` chain, key=value overrides.

The YAML files shipped in ``ttt_titans/configs`` (package data) are ``base.yaml`` and the three
``exp_<mode>.yaml``; ``--config configs/exp_meta_ttt.yaml`` resolves to the packaged file when the
path does not exist on disk, so the CLI works after a non-editable install.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

MODES = ("baseline", "simple_ttt", "meta_ttt")
BACKBONES = ("lstm", "transformer", "titans")


@dataclass
class DataConfig:
    path: str | None = None  # ETT-format CSV; None -> embedded Beijing PM2.5 set (hourly, 2010-14)
    target: str = "PM2.5"  # target column (ETT: "OT")
    features: str = "M"  # "S": target only; "M": all numeric columns in, target out
    lookback: int = 48  # L, input steps
    horizon: int = 12  # predicted steps
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test by time
    max_rows: int | None = 17520  # keep the last N rows (None: all); default set: 2013-2014
    train_stride: int = 4  # stride of pretraining windows
    online_stride: int = 12  # stride of online test windows


@dataclass
class ModelConfig:
    backbone: str = "titans"  # lstm | transformer | titans
    d_model: int = 32  # C
    n_layers: int = 1
    n_heads: int = 4  # attention heads (transformer / titans)
    window: int = 16  # titans: sliding attention window
    n_persistent: int = 4  # titans: persistent-memory tokens
    dropout: float = 0.0


@dataclass
class MemoryConfig:
    inner: str = "linear"  # fast model: linear | mlp
    num_heads: int = 2  # memory heads, head_dim = d_model // num_heads
    chunk: int = 16  # chunk-parallel mini-batch size; 1 = exact per-step rule
    mlp_ratio: int = 2  # mlp fast model hidden = mlp_ratio * head_dim
    init_std: float = 0.02  # std of the initial fast weights (buffer)
    theta: float = 0.005  # simple_ttt fixed inner lr
    eta: float = 0.9  # simple_ttt fixed momentum
    alpha: float = 0.001  # simple_ttt fixed forgetting
    carry: bool = False  # online: carry the memory state along the stream (False: per window)


@dataclass
class MetaConfig:
    hidden: int = 32  # MLP width
    theta_range: tuple[float, float] = (1e-5, 1e-2)  # inner lr range
    eta_range: tuple[float, float] = (0.8, 0.99)  # momentum range
    alpha_range: tuple[float, float] = (0.0, 1.0)  # forgetting range
    alpha_init: float = 0.001  # initial forgetting value (sets the output bias)


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    patience: int = 2  # early stopping on val loss
    grad_clip: float = 1.0
    online_lr: float = 5e-4
    online_steps: int = 1  # outer steps per revealed window
    max_batches_per_epoch: int | None = None


@dataclass
class ExperimentConfig:
    name: str = "base"
    mode: str = "meta_ttt"  # baseline | simple_ttt | meta_ttt
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads (0: torch's default); 1 is fastest on shared CPUs
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.model.backbone not in BACKBONES:
            raise ValueError(
                f"model.backbone must be one of {BACKBONES}, got {self.model.backbone!r}"
            )
        if self.memory.inner not in ("linear", "mlp"):
            raise ValueError(f"memory.inner must be 'linear' or 'mlp', got {self.memory.inner!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.memory.chunk < 1:
            raise ValueError(f"memory.chunk must be >= 1, got {self.memory.chunk}")
        if self.model.d_model % self.memory.num_heads:
            raise ValueError(
                f"model.d_model ({self.model.d_model}) must be divisible by memory.num_heads "
                f"({self.memory.num_heads})"
            )
        if self.data.features not in ("S", "M"):
            raise ValueError(f"data.features must be 'S' or 'M', got {self.data.features!r}")
        for name in ("lookback", "horizon", "train_stride", "online_stride"):
            if getattr(self.data, name) < 1:
                raise ValueError(f"data.{name} must be >= 1, got {getattr(self.data, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "memory": MemoryConfig,
    "meta": MetaConfig,
    "train": TrainConfig,
}


def packaged_config(name: str) -> Path:
    """Path of a YAML config shipped in ``ttt_titans/configs`` (e.g. ``"exp_meta_ttt.yaml"``)."""
    path = Path(str(resources.files("ttt_titans") / "configs" / name))
    if not path.is_file():
        raise ValueError(
            f"no packaged config {name!r}; available: {sorted(list_packaged_configs())}"
        )
    return path


def list_packaged_configs() -> list[str]:
    root = resources.files("ttt_titans") / "configs"
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".yaml"))


def _resolve(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    return packaged_config(p.name)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml_chain(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, following its ``base:`` key (relative to the file) recursively."""
    p = _resolve(path).resolve()
    if p in _seen:
        raise ValueError(f"config base cycle: {' -> '.join(map(str, (*_seen, p)))}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {p} must be a YAML mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = p.parent / base if (p.parent / base).is_file() else base
    return _merge(load_yaml_chain(base_path, (*_seen, p)), raw)


def apply_overrides(cfg: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``train.epochs=3``)."""
    cfg = _merge({}, cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.epochs=3)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = cfg
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    return cfg


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build an ExperimentConfig, rejecting unknown keys with their dotted name."""
    raw = dict(raw)
    kwargs: dict[str, Any] = {}
    top = {f.name for f in dataclasses.fields(ExperimentConfig)}
    for key, value in raw.items():
        if key not in top:
            raise ValueError(f"unknown config key {key!r}; known: {sorted(top)}")
        if key in _SECTIONS:
            cls = _SECTIONS[key]
            known = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(value, dict):
                raise ValueError(f"config section {key!r} must be a mapping")
            bad = set(value) - known
            if bad:
                raise ValueError(f"unknown config key(s) {sorted(f'{key}.{b}' for b in bad)}")
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            kwargs[key] = cls(**value)
        else:
            kwargs[key] = value
    return ExperimentConfig(**kwargs)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (+ base chain) + overrides -> ExperimentConfig."""
    return from_dict(apply_overrides(load_yaml_chain(path), overrides or []))
