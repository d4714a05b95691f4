"""Backend registry: ``torch`` and ``generic`` built in, others through the entry-point group
``ttt_core.backends`` (e.g. ttt-cuda registers ``cuda``) or :func:`register_backend`.

A backend is any object with

- ``name: str`` and ``device_types: tuple[str, ...]`` (devices it serves under ``backend="auto"``),
- ``supports(op, q, **kwargs) -> str | None``: ``None`` when it can run the call, else the reason,
  decided from metadata (shapes, dtypes, devices, requires_grad, grad mode, option values, the
  state's offset): ttt-core remembers the answer per call metadata (``validation.metadata_key``
  and ``torch.is_grad_enabled()``) until a backend is registered or unregistered;
  op: "ttt_linear", "ttt_mlp", "ttt_linear_step" or "ttt_mlp_step"; kwargs: the other per-token
  inputs k, v, eta and ln_weight, ln_bias (e.g. to see which require grad), mini_batch_size, causal,
  token_scale, momentum, decay, eps, reconstruction_target, output_residual, initial_state (always
  a ``TTTState``, fresh or given) and output_final_state. A backend that does not implement an
  option's value (e.g. ``reconstruction_target="value"``) returns the reason; the op itself gets
  reconstruction_target and output_residual only when they are not at their defaults,
- ``ttt_linear(q, k, v, eta, W1, b1, ln_weight, ln_bias, **kwargs)`` and
  ``ttt_mlp(q, k, v, eta, W1, b1, W2, b2, ln_weight, ln_bias, **kwargs)`` with ttt-core's signature
  (inputs already validated; ``initial_state`` is always a ``TTTState``),
- optionally ``warn_on_fallback: bool`` (default True): whether ``auto`` warns when this backend
  serves the device but refuses a call. A backend that accelerates calls the torch backend serves
  just as completely (ttt-cuda's C++ CPU path) sets it False: the calls it does not fuse then run
  on the torch backend silently (asked for by name, it still raises with its reason),
- optionally ``ttt_linear_step(q, k, v, eta, W1, b1, ln_weight, ln_bias, *, state, **kwargs)`` and
  ``ttt_mlp_step(...)``: one streaming token, the arguments of ``ttt_core.ttt_linear_step`` (inputs
  validated, ``state`` always a ``TTTState``), returning ``(o, next TTTState)``. Under ``auto`` a
  backend without the method is skipped (the torch backend serves the step),
- optionally ``ttt_layer_step(layer, x, *, state, pre_norm, residual, mini_batch_size,
  token_scale, backend, reconstruction_target, output_residual)``: a whole ``TTTLayer``'s single
  streaming token (the block's pre-norm, the projections, the step, post-norm, gate, output
  projection and the block's residual in one call: ``TTTLayer.forward``'s ``pre_norm`` and
  ``residual``) for x [B, 1, C] from a validated ``TTTState``, returning ``(y [B, 1, C], next
  TTTState)``; ``supports("ttt_layer_step", x, layer=layer, pre_norm=..., residual=...)`` decides
  from the layer's config, the pre-norm, the tensors' metadata and the grad mode. A layer whose
  backend has no such method or refuses takes its ordinary road (see
  :func:`layer_step_backend`).

An entry point may name the backend object itself or a zero-argument callable returning it.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

import torch

from .validation import metadata_key

__all__ = ["Backend", "available_backends", "get_backend", "register_backend"]

ENTRY_POINT_GROUP = "ttt_core.backends"
BUILTIN = ("torch", "generic")


@runtime_checkable
class Backend(Protocol):
    name: str
    device_types: tuple[str, ...]

    def supports(self, op: str, q: Any, **kwargs: Any) -> str | None: ...

    def ttt_linear(self, *args: Any, **kwargs: Any) -> Any: ...

    def ttt_mlp(self, *args: Any, **kwargs: Any) -> Any: ...


_registry: dict[str, Backend] = {}
_entry_points_loaded = False
_warned: set[tuple[str, str]] = set()
# (name, op, metadata key of q and the supports() kwargs) -> the resolved backend; cleared whenever
# the registry changes
_resolved: dict[tuple, Backend | str] = {}
MAX_RESOLVED = 256


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Make ``backend`` selectable by name and under ``backend="auto"`` on its device types."""
    if not isinstance(backend, Backend):
        raise TypeError(
            "backend must define name, device_types, supports(), ttt_linear() and ttt_mlp(); "
            f"got {type(backend).__name__}"
        )
    if backend.name in BUILTIN:
        raise ValueError(f"backend name {backend.name!r} is reserved for a built-in backend")
    if backend.name in _registry and not replace:
        raise ValueError(
            f"a backend named {backend.name!r} is already registered (pass replace=True)"
        )
    _registry[backend.name] = backend
    _resolved.clear()


def unregister_backend(name: str) -> None:
    _registry.pop(name, None)
    _resolved.clear()


def _load_entry_points() -> None:
    """Load the entry-point backends once. Reading package metadata cannot be traced: the first
    call must happen outside ``torch.compile`` (``TTTLayer`` and ``InnerLearner`` settle the
    registry when built; for bare functional calls, call :func:`available_backends` first).
    Inside a trace an unsettled registry is left as it is (built-ins and registered ones)."""
    global _entry_points_loaded
    if _entry_points_loaded or torch.compiler.is_compiling():
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            backend = obj() if callable(obj) and not isinstance(obj, Backend) else obj
            register_backend(backend, replace=True)
        except Exception as err:  # a broken optional backend must not break ttt-core
            warnings.warn(
                f"ttt_core: could not load backend {ep.name!r} ({ep.value}): {err}", stacklevel=2
            )


def available_backends() -> list[str]:
    """Names usable as ``backend=``: the built-ins, then registered ones (e.g. ``"cuda"``)."""
    _load_entry_points()
    return [*BUILTIN, *_registry]


def get_backend(name: str) -> Backend:
    _load_entry_points()
    if name not in _registry:
        raise ValueError(f"unknown backend {name!r}; available: {available_backends()} (or 'auto')")
    return _registry[name]


def resolve(name: str, op: str, q, **kwargs) -> Backend | str:
    """Pick the implementation for one call: a built-in name ("torch"/"generic") or a Backend.

    ``auto`` uses the first registered backend serving q's device type that supports the call; when
    one serves the device but not the call, it warns once with its reason (unless the backend's
    ``warn_on_fallback`` is False) and uses ``torch``. A
    backend asked for by name that cannot run the call raises ValueError with its reason. The answer
    is remembered per call metadata and grad mode (a streaming decoder asks once, not once per
    token).
    """
    return resolve_with_key(None if name in BUILTIN else metadata_key(q=q, **kwargs), name, op, q,
                            **kwargs)  # fmt: skip


def resolve_with_key(call_key: tuple | None, name: str, op: str, q, **kwargs) -> Backend | str:
    """:func:`resolve` given the call's metadata key: ``metadata_key`` of the call's arguments (the
    dispatcher passes the one it validated the call with: the state it hands the backend and the
    op are functions of those arguments), or None to ask the backends every time."""
    if name in BUILTIN:
        return name
    _load_entry_points()
    if name == "auto" and not any(q.device.type in b.device_types for b in _registry.values()):
        return "torch"  # no registered backend serves this device: nothing to ask
    key = call_key
    if key is None:
        return _resolve(name, op, q, **kwargs)
    key = (name, op, torch.is_grad_enabled(), key)  # an inference-only backend may refuse grad
    if key not in _resolved:
        if len(_resolved) >= MAX_RESOLVED:
            del _resolved[next(iter(_resolved))]  # the oldest
        _resolved[key] = _resolve(name, op, q, **kwargs)
    return _resolved[key]


def layer_step_backend(name: str, x, **kwargs) -> Backend | None:
    """The backend whose ``ttt_layer_step`` runs this whole-layer single-token call, or None: the
    layer then takes its ordinary road (projections, the step through the dispatch, output), where
    ``name`` is resolved as for any op. ``auto``: the first registered backend serving x's device
    that has the method and supports the call; a name: that backend when it does. Asked every call
    (the answer depends on the layer's options and the grad mode; a few attribute reads)."""
    if name in BUILTIN:
        return None
    _load_entry_points()
    auto = name == "auto"
    device = x.device.type
    for backend in _registry.values() if auto else (get_backend(name),):
        if (
            (not auto or device in backend.device_types)
            and hasattr(backend, "ttt_layer_step")
            and backend.supports("ttt_layer_step", x, **kwargs) is None
        ):
            return backend
    return None


def _resolve(name: str, op: str, q, **kwargs) -> Backend | str:
    """:func:`resolve` without the memory: ask the backends."""
    if name != "auto":
        backend = get_backend(name)
        reason = (
            backend.supports(op, q, **kwargs)
            if hasattr(backend, op)
            else f"it does not implement {op}"
        )
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run this {op} call: {reason}")
        return backend
    for backend in _registry.values():
        if q.device.type not in backend.device_types or not hasattr(backend, op):
            continue
        reason = backend.supports(op, q, **kwargs)
        if reason is None:
            return backend
        if getattr(backend, "warn_on_fallback", True) and (backend.name, reason) not in _warned:
            _warned.add((backend.name, reason))
            warnings.warn(
                f"ttt_core: backend {backend.name!r} cannot run this {op} call ({reason}); "
                "falling back to the torch backend",
                stacklevel=5,
            )
    return "torch"
