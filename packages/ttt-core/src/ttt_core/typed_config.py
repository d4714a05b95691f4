"""Typed, range-checked dataclass configs from a plain dict (YAML is parsed by the caller).

One implementation for every package: the type of a key comes from the dataclass annotation, its
accepted range from the field's metadata, and every error is a :class:`ConfigError` (a ``ValueError``)
that names the dotted key (``train.lr``) and the values it accepts.

Types: ``int`` (not bool, not 4.5), ``float`` (ints and numeric strings such as the ``"1e-3"`` PyYAML
reads, finite unless ``allow_nonfinite``), ``bool`` (only true/false, never the string ``"false"``),
``str``, ``Literal[...]``, ``X | None``, nested dataclasses (a mapping), ``list[X]``, ``tuple[X, ...]``,
``tuple[X, Y]``, ``dict[str, X]``.

Field metadata (all optional; numbers, and each element of a list/tuple of numbers):
``min``, ``max``, ``min_exclusive`` / ``max_exclusive`` (bools: the bound itself is refused),
``choices`` (a tuple of accepted values), ``allow_nonfinite`` (floats: accept inf/nan).

Examples:
    >>> @dataclass
    ... class Optim:
    ...     lr: float = field(default=1e-3, metadata={"min": 0, "min_exclusive": True})
    ...     kind: str = field(default="adamw", metadata={"choices": ("adamw", "sgd")})
    >>> @dataclass
    ... class Cfg:
    ...     optim: Optim = field(default_factory=Optim)
    ...     steps: int = field(default=10, metadata={"min": 1})
    >>> config_from_dict(Cfg, {"optim": {"lr": "1e-3"}}).optim.lr
    0.001
    >>> config_from_dict(Cfg, {"optim": {"lr": -1}})
    ConfigError: config key 'optim.lr': got -1; accepts a float > 0
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "ConfigError",
    "apply_renames",
    "config_from_dict",
    "config_to_dict",
    "ranged",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; ``key`` is its dotted name (``"optim.lr"``)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key {key!r}: {message}")


def ranged(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    choices: tuple[Any, ...] | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """``dataclasses.field`` with range metadata: ``lr: float = ranged(1e-3, min=0, min_exclusive=True)``."""
    meta: dict[str, Any] = {"min_exclusive": min_exclusive, "max_exclusive": max_exclusive}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


# ----------------------------------------------------------------------------- type coercion
def _describe(tp: Any) -> str:
    """A reader's name for a type: ``float``, ``int or null``, ``list of float``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if origin is dict:
        return f"a mapping of {_describe(args[1]) if len(args) == 2 else 'values'}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {sorted(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _range_text(meta: Mapping[str, Any]) -> str:
    parts = []
    if "min" in meta:
        parts.append(f"{'>' if meta.get('min_exclusive') else '>='} {meta['min']}")
    if "max" in meta:
        parts.append(f"{'<' if meta.get('max_exclusive') else '<='} {meta['max']}")
    return " and ".join(parts)


def _check_range(key: str, value: Any, tp_name: str, meta: Mapping[str, Any]) -> None:
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(key, f"got {value!r}; accepts one of {list(meta['choices'])}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    lo, hi = meta.get("min"), meta.get("max")
    too_low = lo is not None and (value <= lo if meta.get("min_exclusive") else value < lo)
    too_high = hi is not None and (value >= hi if meta.get("max_exclusive") else value > hi)
    if too_low or too_high:
        raise ConfigError(key, f"got {value!r}; accepts {tp_name} {_range_text(meta)}")


def _coerce(
    key: str, value: Any, tp: Any, meta: Mapping[str, Any], accepts: str | None = None
) -> Any:
    """``value`` as type ``tp`` (checked against ``meta``), or a ConfigError naming ``key``.

    ``accepts`` describes the whole annotation in messages (``int or null`` for ``int | None``).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad(hint: str = "") -> ConfigError:
        what = accepts or _describe(tp)
        return ConfigError(key, f"got {value!r} ({type(value).__name__}); accepts {what}{hint}")

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:
            try:
                return _coerce(key, value, a, meta, _describe(tp))
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:
            raise errors[0]
        raise bad()
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"got {value!r}; accepts one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise bad()
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise bad(f" (got {len(value)} items)")
            items = [
                _coerce(f"{key}[{i}]", v, a, meta) for i, (v, a) in enumerate(zip(value, args))
            ]
        else:
            elem = args[0] if args else Any
            items = [_coerce(f"{key}[{i}]", v, elem, meta) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(key, k, kt, {}): _coerce(f"{key}.{k}", v, vt, meta) for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise bad(" (write true or false without quotes)")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(" (a whole number)")
        _check_range(key, value, "an int", meta)
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, str):
            try:
                value = float(value)  # PyYAML reads 1e-3 (no dot) as the string "1e-3"
            except ValueError:
                raise bad() from None
        if not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
        if not math.isfinite(value) and not meta.get("allow_nonfinite"):
            raise ConfigError(key, f"got {value!r}; accepts a finite float")
        _check_range(key, value, "a float", meta)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        _check_range(key, value, "a str", meta)
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise bad()
        return value
    raise TypeError(f"config key {key!r}: unsupported annotation {tp!r}")


def _build(cls: type[T], raw: Mapping[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: str(k))
    unknown = [k for k in raw if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        hint = f" (did you mean {dotted(close[0])!r}?)" if close else ""
        raise ConfigError(dotted(k), f"unknown key{hint}; known keys: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(dotted(name), raw[name], hints[name], f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(dotted(name), f"missing; it needs {_describe(hints[name])}")
    return cls(**kwargs)


def config_from_dict(cls: type[T], raw: Mapping[str, Any] | None, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``raw`` (e.g. parsed YAML), checking every key and value.

    Missing keys take the field defaults; lists become tuples where the annotation says tuple;
    the dataclass's own ``__post_init__`` then checks what relates several keys.

    Args:
        cls: a dataclass type whose annotations give each key's type.
        raw: a mapping of keys to values (``None``: all defaults).
        prefix: dotted name of ``raw`` inside a larger config, for error messages.

    Raises:
        ConfigError: an unknown key (with the nearest known one), a missing required key, or a value
            of the wrong type or out of range; the message names the dotted key and what it accepts.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix or "<root>", f"got {type(raw).__name__}; accepts a mapping")
    return _build(cls, raw, prefix)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as plain YAML/JSON-able data (tuples become lists); inverse of
    :func:`config_from_dict`."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------------- renames
def _pop_dotted(raw: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    *sections, last = dotted.split(".")
    node: Any = raw
    for s in sections:
        node = node.get(s) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        return True, node.pop(last)
    return False, None


def _has_dotted(raw: Mapping[str, Any], dotted: str) -> bool:
    node: Any = raw
    for s in dotted.split("."):
        if not isinstance(node, Mapping) or s not in node:
            return False
        node = node[s]
    return True


def apply_renames(
    raw: Mapping[str, Any], renames: Mapping[str, str], *, migrate: bool = False
) -> dict[str, Any]:
    """Handle old key spellings: ``{"train.learning_rate": "optim.lr"}`` (dotted old -> new).

    By default an old key is an error whose message gives the new spelling (and the value to
    write there). With ``migrate=True`` the value moves to the new key instead, silently; both
    spellings at once are always an error. Returns a new dict; ``raw`` is not changed.
    """
    out = _deep_copy(raw)
    for old, new in renames.items():
        found, value = _pop_dotted(out, old)
        if not found:
            continue
        if _has_dotted(out, new):
            raise ConfigError(old, f"renamed to {new!r}, and both are set: keep only {new!r}")
        if not migrate:
            raise ConfigError(old, f"renamed to {new!r}: write {new}: {value!r}")
        *sections, last = new.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise ConfigError(new, f"{s!r} is not a section")
        node[last] = value
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
