"""Experiment configuration: dataclasses, YAML files with a `base:` chain, key=value overrides.

Every key is typed and range-checked by ``ttt_core.typed_config`` (the annotation gives its type,
the field metadata its range or choices): ``train.lr: 1e-3`` (a string to PyYAML) is read as a
float, ``memory.carry: "false"``, ``train.grad_clip: -1``, ``train.batch_size: 0`` or
``data.lookback: 4.5`` are rejected with their dotted key and the accepted values.

The YAML files shipped in ``ttt_titans/configs`` (package data) are ``base.yaml`` and the three
``exp_<mode>.yaml``. ``--config`` takes a path that exists, or a packaged config by its bare name
(``exp_meta_ttt.yaml``) or as ``configs/<name>``; any other path that does not exist is an error
(a typo never falls back to a packaged file).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ttt_core.runfiles import reading
from ttt_core.typed_config import ConfigError, config_from_dict, config_to_dict, ranged

MODES = ("baseline", "simple_ttt", "meta_ttt")
BACKBONES = ("lstm", "transformer", "titans")
# ttt-core backends of the memory's ttt_linear / ttt_mlp call: "auto" (ttt-core picks), "torch",
# "generic" (torch.func reference), and ttt-cuda's fused "cpp" (CPU) / "cuda" where it is installed
MEMORY_BACKENDS = ("auto", "torch", "generic", "cpp", "cuda")
POSITIVE = {"min": 0, "min_exclusive": True}  # metadata: > 0
UNIT = {"min": 0, "max": 1}  # metadata: in [0, 1]


@dataclass
class DataConfig:
    path: str | None = None  # ETT-format CSV; None -> embedded Beijing PM2.5 set (hourly, 2010-14)
    target: str = "PM2.5"  # target column (ETT: "OT")
    features: str = ranged("M", choices=("S", "M"))  # "S": target only; "M": all columns in
    lookback: int = ranged(48, min=1)  # L, input steps
    horizon: int = ranged(12, min=1)  # predicted steps
    split: tuple[float, float, float] = field(default=(0.7, 0.1, 0.2), metadata=POSITIVE)
    max_rows: int | None = ranged(17520, min=1)  # keep the last N rows (None: all)
    train_stride: int = ranged(4, min=1)  # stride of pretraining windows
    online_stride: int = ranged(12, min=1)  # stride of online test windows

    def __post_init__(self) -> None:
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ConfigError(
                "data.split", f"got {list(self.split)}; accepts 3 fractions summing to 1"
            )


@dataclass
class ModelConfig:
    backbone: str = ranged("titans", choices=BACKBONES)  # lstm | transformer | titans
    d_model: int = ranged(32, min=1)  # C
    n_layers: int = ranged(1, min=1)
    n_heads: int = ranged(4, min=1)  # attention heads (transformer / titans)
    window: int = ranged(16, min=1)  # titans: sliding attention window
    n_persistent: int = ranged(4, min=0)  # titans: persistent-memory tokens
    dropout: float = ranged(0.0, min=0, max=1, max_exclusive=True)


@dataclass
class MemoryConfig:
    inner: str = ranged("linear", choices=("linear", "mlp"))  # fast model: linear | mlp
    num_heads: int = ranged(2, min=1)  # memory heads, head_dim = d_model // num_heads
    chunk: int = ranged(16, min=1)  # chunk-parallel mini-batch size; 1 = exact per-step rule
    mlp_ratio: int = ranged(2, min=1)  # mlp fast model hidden = mlp_ratio * head_dim
    init_std: float = ranged(0.02, min=0)  # std of the initial fast weights (buffer)
    theta: float = ranged(0.005, min=0)  # simple_ttt fixed inner lr
    eta: float = field(default=0.9, metadata=UNIT)  # simple_ttt fixed momentum
    alpha: float = field(default=0.001, metadata=UNIT)  # simple_ttt fixed forgetting
    carry: bool = False  # online: carry the memory state along the stream (False: per window)
    backend: str = ranged("auto", choices=MEMORY_BACKENDS)  # ttt-core backend of the memory


@dataclass
class MetaConfig:
    hidden: int = ranged(32, min=1)  # MLP width
    theta_range: tuple[float, float] = ranged((1e-5, 1e-2), min=0)  # inner lr range
    eta_range: tuple[float, float] = field(default=(0.8, 0.99), metadata=UNIT)  # momentum range
    alpha_range: tuple[float, float] = field(default=(0.0, 1.0), metadata=UNIT)  # forgetting range
    alpha_init: float = field(default=0.001, metadata=UNIT)  # initial forgetting (output bias)


@dataclass
class TrainConfig:
    epochs: int = ranged(3, min=0)
    batch_size: int = ranged(64, min=1)
    lr: float = field(default=2e-3, metadata=POSITIVE)
    weight_decay: float = ranged(0.01, min=0)
    patience: int = ranged(2, min=1)  # early stopping on val loss
    grad_clip: float = field(default=1.0, metadata=POSITIVE)  # max gradient norm
    online_lr: float = ranged(5e-4, min=0)
    online_steps: int = ranged(1, min=0)  # outer steps per revealed window
    max_batches_per_epoch: int | None = ranged(None, min=1)


@dataclass
class ExperimentConfig:
    name: str = "base"  # run folder name below runs/ (a relative path, no '..')
    mode: str = ranged("meta_ttt", choices=MODES)  # baseline | simple_ttt | meta_ttt
    seed: int = 0
    device: str = "cpu"
    threads: int = ranged(1, min=0)  # torch intra-op threads (0: torch's default)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """Checks that relate several keys (each key alone is checked by typed_config)."""
        if self.model.d_model % self.memory.num_heads:
            raise ConfigError(
                "memory.num_heads",
                f"model.d_model ({self.model.d_model}) must be divisible by memory.num_heads "
                f"({self.memory.num_heads})",
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON data (tuples as lists); ``from_dict(cfg.to_dict()) == cfg``."""
        return config_to_dict(self)


# keys a resume may change: the name and the machine (always) and, while pretraining, its length;
# memory.backend computes the same memory (to float rounding) on whichever backend is installed
RESUMABLE_ALWAYS = ("name", "threads", "device", "memory.backend")
RESUMABLE_PRETRAIN = ("train.epochs", "train.patience", "train.max_batches_per_epoch")


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
    """An existing file, or a packaged config named bare (``base.yaml``) or ``configs/<name>``."""
    p = Path(path)
    if p.is_file():
        return p
    if len(p.parts) == 1 or (len(p.parts) == 2 and p.parts[0] == "configs"):
        return packaged_config(p.name)
    raise ValueError(
        f"config file {str(p)!r} does not exist; packaged configs (by bare name): "
        f"{list_packaged_configs()}"
    )


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base with over's keys merged in, section by section: a new dict sharing no section with
    either input (an edit of the result, e.g. an override, never reaches a saved config)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_chain(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, following its ``base:`` key (relative to the file) recursively."""
    p = _resolve(path).resolve()
    if p in _seen:
        raise ValueError(f"config base cycle: {' -> '.join(map(str, (*_seen, p)))}")
    with reading(p, "config") as f:
        try:
            raw = yaml.safe_load(f.read_text(encoding="utf-8-sig")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {str(p)!r} is not valid YAML: {e}") from None
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
    """Build an ExperimentConfig; every key type- and range-checked (``ConfigError`` names it)."""
    return config_from_dict(ExperimentConfig, raw)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return out


def resume_config(
    saved: dict[str, Any], requested: dict[str, Any], *, pretraining: bool
) -> tuple[ExperimentConfig, dict[str, tuple[Any, Any]]]:
    """The config a resumed run continues with: the saved one, plus the allowed changes.

    ``requested`` is what the user asked for (``--config`` + overrides, or the saved config +
    overrides). Keys in ``RESUMABLE_ALWAYS`` (and ``RESUMABLE_PRETRAIN`` while ``pretraining``) are
    applied; any other difference is refused, so a resume never silently ignores a request.

    Returns:
        (config, changes): ``changes`` maps each applied dotted key to (saved, requested).

    Raises:
        ValueError: listing every key that differs and cannot change on resume.
    """
    old, new = from_dict(saved), from_dict(requested)
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    allowed = RESUMABLE_ALWAYS + (RESUMABLE_PRETRAIN if pretraining else ())
    changes = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    refused = {k: v for k, v in changes.items() if k not in allowed}
    if refused:
        diff = "; ".join(f"{k}: run has {x!r}, requested {y!r}" for k, (x, y) in refused.items())
        raise ValueError(
            f"--resume cannot change {diff}. A resume may change only {list(allowed)}"
            f"{'' if pretraining else ' (pretraining has ended)'}; start a new run "
            "(another name or --overwrite) to change the others"
        )
    merged = old.to_dict()
    for k in changes:
        section, _, key = k.rpartition(".")
        (merged[section] if section else merged)[key] = b[k]
    return from_dict(merged), changes


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (+ base chain) + overrides -> ExperimentConfig."""
    return from_dict(apply_overrides(load_yaml_chain(path), overrides or []))
