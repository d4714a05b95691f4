"""ttt_core.typed_config: every bad value is rejected with its dotted key and the accepted values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from ttt_core.typed_config import (
    ConfigError,
    apply_renames,
    config_from_dict,
    config_to_dict,
    ranged,
)


@dataclass
class Optim:
    lr: float = field(default=2e-3, metadata={"min": 0, "min_exclusive": True})
    grad_clip: float = ranged(1.0, min=0)
    kind: str = ranged("adamw", choices=("adamw", "sgd"))
    betas: tuple[float, float] = ranged((0.9, 0.999), min=0, max=1, max_exclusive=True)


@dataclass
class Data:
    path: str | None = None
    lookback: int = ranged(48, min=1)
    split: tuple[float, ...] = ranged((0.7, 0.1, 0.2), min=0, min_exclusive=True)
    weights: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


@dataclass
class Cfg:
    name: str
    carry: bool = False
    mode: Literal["baseline", "meta"] = "meta"
    max_batches: int | None = ranged(None, min=1)
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)


def test_defaults_and_yaml_spellings():
    cfg = config_from_dict(
        Cfg,
        {
            "name": "a",
            "optim": {"lr": "1e-3", "grad_clip": 2},
            "data": {"split": [0.5, 0.25, 0.25]},
        },
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.data.split == (0.5, 0.25, 0.25) and cfg.data.lookback == 48
    assert cfg.max_batches is None and cfg.carry is False and cfg.optim.kind == "adamw"


def test_round_trip_through_plain_data():
    cfg = config_from_dict(
        Cfg,
        {
            "name": "r",
            "carry": True,
            "max_batches": 3,
            "data": {"weights": {"a": 2}, "files": ["x"]},
        },
    )
    plain = config_to_dict(cfg)
    assert plain["data"]["split"] == [0.7, 0.1, 0.2] and plain["optim"]["betas"] == [0.9, 0.999]
    assert config_from_dict(Cfg, plain) == cfg


BAD = [
    ("lr-negative", {"optim": {"lr": -1}}, "optim.lr", "float > 0"),
    ("lr-zero", {"optim": {"lr": 0}}, "optim.lr", "float > 0"),
    ("lr-word", {"optim": {"lr": "fast"}}, "optim.lr", "accepts float"),
    ("lr-nan", {"optim": {"lr": "nan"}}, "optim.lr", "finite float"),
    ("lr-inf", {"optim": {"lr": 1e309}}, "optim.lr", "finite float"),
    ("clip-negative", {"optim": {"grad_clip": -1}}, "optim.grad_clip", ">= 0"),
    ("kind-choice", {"optim": {"kind": "adam"}}, "optim.kind", "'adamw', 'sgd'"),
    ("beta-range", {"optim": {"betas": [0.9, 1.0]}}, "optim.betas[1]", "< 1"),
    ("betas-length", {"optim": {"betas": [0.9]}}, "optim.betas", "got 1 items"),
    ("carry-string", {"carry": "false"}, "carry", "true or false without quotes"),
    ("carry-int", {"carry": 0}, "carry", "true or false"),
    ("lookback-float", {"data": {"lookback": 4.5}}, "data.lookback", "whole number"),
    ("lookback-bool", {"data": {"lookback": True}}, "data.lookback", "accepts int"),
    ("lookback-zero", {"data": {"lookback": 0}}, "data.lookback", "int >= 1"),
    ("split-element", {"data": {"split": [0.5, 0, 0.5]}}, "data.split[1]", "float > 0"),
    ("path-number", {"data": {"path": 3}}, "data.path", "str or null"),
    ("weights-value", {"data": {"weights": {"a": "x"}}}, "data.weights.a", "accepts int"),
    ("files-not-list", {"data": {"files": "x.npz"}}, "data.files", "a list of str"),
    ("mode-literal", {"mode": "meta_ttt"}, "mode", "'baseline', 'meta'"),
    ("optional-range", {"max_batches": 0}, "max_batches", "int >= 1"),
    ("section-not-mapping", {"optim": 3}, "optim", "a mapping with keys"),
    ("unknown-nested", {"optim": {"lrr": 1}}, "optim.lrr", "did you mean 'optim.lr'"),
    ("unknown-top", {"sead": 1}, "sead", "known keys"),
]


@pytest.mark.parametrize(
    ("update", "key", "accepted"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_values_name_their_key_and_the_accepted_values(update, key, accepted):
    with pytest.raises(ConfigError) as info:
        config_from_dict(Cfg, {"name": "a", **update})
    assert info.value.key == key
    assert str(info.value).startswith(f"config key {key!r}")
    assert accepted in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_required_key_and_non_mapping_root():
    with pytest.raises(ConfigError, match="config key 'name': missing; it needs str"):
        config_from_dict(Cfg, {})
    with pytest.raises(ConfigError, match="accepts a mapping"):
        config_from_dict(Cfg, ["name"])
    with pytest.raises(TypeError, match="dataclass"):
        config_from_dict(dict, {})


def test_renames_give_the_new_spelling_or_migrate():
    raw = {"name": "a", "train": {"learning_rate": 0.01}}
    renames = {"train.learning_rate": "optim.lr"}
    with pytest.raises(
        ConfigError, match=r"'train.learning_rate': renamed to 'optim.lr': write optim.lr: 0.01"
    ):
        apply_renames(raw, renames)
    moved = apply_renames(raw, renames, migrate=True)
    assert moved == {"name": "a", "train": {}, "optim": {"lr": 0.01}}
    assert raw == {"name": "a", "train": {"learning_rate": 0.01}}  # input untouched
    both = {**raw, "optim": {"lr": 0.02}}
    with pytest.raises(ConfigError, match="both are set"):
        apply_renames(both, renames, migrate=True)
    assert apply_renames({"name": "a"}, renames) == {"name": "a"}
