"""Input checks for the functional API and the step entries: shapes and metadata only, never values
(no GPU sync, traceable by torch.compile). Every call is checked once, in :func:`validate`.

The checks read metadata only, so their verdict is a function of :func:`metadata_key` (every
tensor's shape, dtype and device, every option's type and value, the state's fields and offset): a
call whose key passed before is not checked again (a streaming decoder repeats one key per token).
The remembered keys are tuples of metadata, never tensors, at most ``MAX_REMEMBERED`` of them.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor

from .ops.common import RECONSTRUCTION_TARGETS, compute_dtype
from .state import TTTState

TOKEN_SCALES = ("mean", "sum")
# expected shapes of the closed-form fast models' weights (TTT-Linear has F = D)
_WEIGHT_SHAPES = {
    "W1": ("H", "D", "F"),
    "b1": ("H", 1, "F"),
    "W2": ("H", "F", "D"),
    "b2": ("H", 1, "D"),
}


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _tensor(name: str, t, *, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def _expect(name: str, t: Tensor, shape: tuple, names: str) -> None:
    if tuple(t.shape) != tuple(shape):
        want = "[" + ", ".join(f"{n}={s}" for n, s in zip(names.split(","), shape)) + "]"
        raise ValueError(f"{name} must have shape {want}, got {_shape(t)}")


MAX_REMEMBERED = 256
_passed: dict[tuple, tuple[int, int, int, int]] = {}  # metadata key -> (B, H, L, D)


class _NoKey(Exception):
    """An argument whose metadata is not a key (not a tensor, state or plain value)."""


def _meta(x) -> object:
    """What the checks (and a backend's ``supports``) read of one argument: a tensor's shape, dtype,
    device and whether it requires grad; a plain value with its type (``True`` and ``1`` differ);
    a dict or state field by field."""
    if isinstance(x, Tensor):
        return (Tensor, x.shape, x.dtype, x.device, x.requires_grad)
    if x is None or isinstance(x, (bool, int, float, str)):
        return (type(x), x)
    if isinstance(x, dict):
        return (dict, tuple((n, _meta(t)) for n, t in x.items()))
    if type(x) is TTTState:
        return (TTTState, _meta(x.offset), _meta(x.mini_batch_size), _meta(x.params),
                _meta(x.grad_sum), _meta(x.momentum), _meta(x.current))  # fmt: skip
    raise _NoKey


def metadata_key(**args) -> tuple | None:
    """The metadata of a call's arguments as one hashable key, or None when it has none: an argument
    that is not a tensor, dict of tensors, ``TTTState`` or plain value, variable-length bounds (their
    values are the call's structure) or a call being traced (the checks are traced instead)."""
    if args.get("cu_seqlens") is not None or args.get("lengths") is not None:
        return None
    if torch.compiler.is_compiling():
        return None
    try:
        return tuple((n, _meta(x)) for n, x in args.items())
    except _NoKey:
        return None


def validate(**args) -> tuple[int, int, int, int]:
    """Check every argument of ``ttt_linear``/``ttt_mlp`` (``step``: of ``ttt_*_step``, one token)
    or of an ``InnerLearner`` with its own fast weights (names other than W1, b1, W2, b2: only the
    leading head dim is checked); the keywords of :func:`check_call`. Returns (B, H, L, D).

    A call with the metadata of one that passed returns at once (see the module docstring)."""
    return validate_with_key(metadata_key(**args), **args)


def validate_with_key(key: tuple | None, **args) -> tuple[int, int, int, int]:
    """:func:`validate` given ``key = metadata_key(**args)``: the dispatcher computes the call's key
    once, for these checks and for the backend choice (``backends.resolve_with_key``)."""
    if key is not None and key in _passed:
        return _passed[key]
    shape = check_call(**args)
    if key is not None:
        _remember(key, shape)
    return shape


def _remember(key: tuple, shape: tuple[int, int, int, int]) -> None:
    if len(_passed) >= MAX_REMEMBERED:
        del _passed[next(iter(_passed))]  # the oldest
    _passed[key] = shape


def check_call(
    *,
    q,
    k,
    v,
    eta,
    weights: dict[str, Tensor],
    ln_weight,
    ln_bias,
    mini_batch_size,
    causal,
    token_scale,
    momentum,
    decay,
    initial_state,
    output_final_state,
    eps,
    backend,
    reconstruction_target="residual",
    output_residual=True,
    step: bool = False,
    checkpoint_group_size=None,
    cu_seqlens=None,
    lengths=None,
) -> tuple[int, int, int, int]:
    """Every check of :func:`validate`, run each time. Returns (B, H, L, D)."""
    q = _tensor("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D [B, H, L, D], got {q.ndim}-D with shape {_shape(q)}")
    B, H, L, D = q.shape
    if L < 1:
        raise ValueError(f"q must hold at least one token (L >= 1), got shape {_shape(q)}")
    if D < 1:
        raise ValueError(f"q must have a head dim D >= 1, got shape {_shape(q)}")
    if not isinstance(output_final_state, bool):
        raise TypeError(
            f"output_final_state must be a bool, got {type(output_final_state).__name__}"
        )
    if step and (
        checkpoint_group_size is not None or cu_seqlens is not None or lengths is not None
    ):
        raise ValueError("a step takes no checkpoint_group_size, cu_seqlens or lengths")
    if step and L != 1:
        raise ValueError(
            f"a step takes one token: q must be [B, H, 1, D], got {_shape(q)} "
            "(use ttt_linear/ttt_mlp with initial_state for longer chunks)"
        )
    for name, t in (("k", k), ("v", v)):
        _tensor(name, t)
        _expect(name, t, (B, H, L, D), "B,H,L,D")
        if t.dtype != q.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k, v must share one dtype"
            )
    for name, t in (("eta", eta), ("momentum", momentum), ("decay", decay)):
        if t is None and name != "eta":
            continue
        _tensor(name, t)
        _expect(name, t, (B, H, L), "B,H,L")
    _check_weights(weights, H, D)
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        _tensor(name, t)
        _expect(name, t, (H, D), "H,D")
    everything = {"q": q, "k": k, "v": v, "eta": eta, "momentum": momentum, "decay": decay,
                  "ln_weight": ln_weight, "ln_bias": ln_bias, **weights}  # fmt: skip
    for name, t in everything.items():
        if t is not None and t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}: move all inputs to one device"
            )
    _check_options(q, mini_batch_size, causal, token_scale, eps, backend,
                   reconstruction_target, output_residual)  # fmt: skip
    titans = momentum is not None or decay is not None
    if not causal:
        if titans:
            raise ValueError("momentum/decay (the Titans form) need causal=True; got causal=False")
        if initial_state is not None or output_final_state:
            raise ValueError(
                "non-causal TTT cannot stream: initial_state and output_final_state need causal=True"
            )
    if checkpoint_group_size is not None:
        if isinstance(checkpoint_group_size, bool) or not isinstance(checkpoint_group_size, int):
            raise TypeError(
                f"checkpoint_group_size must be an int >= 1 or None, got {checkpoint_group_size!r}"
            )
        if checkpoint_group_size < 1:
            raise ValueError(
                f"checkpoint_group_size must be >= 1 (mini-batches per group) or None, got "
                f"{checkpoint_group_size}"
            )
    if cu_seqlens is not None or lengths is not None:
        _check_varlen(q, cu_seqlens, lengths, initial_state)
    elif initial_state is not None:
        check_state(initial_state, weights, q, mini_batch_size, titans,
                    name="state" if step else "initial_state")  # fmt: skip
    return B, H, L, D


def _index_list(name: str, x) -> list[int]:
    """A 1-D integer tensor or sequence of ints as a list (host read of a small index tensor)."""
    if isinstance(x, Tensor):
        if x.ndim != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a list of ints, got {x.dtype} "
                            f"{_shape(x)}")  # fmt: skip
        return x.tolist()
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        raise TypeError(f"{name} must be a 1-D integer tensor or a list of ints")
    return list(x)


def _check_varlen(q: Tensor, cu_seqlens, lengths, initial_state) -> None:
    """Packed (``cu_seqlens``) or right-padded (``lengths``) sequences: their bounds. Reads the
    index values (they are the call's structure, like a shape)."""
    B, _, L, _ = q.shape
    if cu_seqlens is not None and lengths is not None:
        raise ValueError("pass cu_seqlens (packed sequences) or lengths (right padding), not both")
    if cu_seqlens is not None:
        cu = _index_list("cu_seqlens", cu_seqlens)
        if B != 1:
            raise ValueError(
                f"cu_seqlens packs sequences along L: q must be [1, H, T, D], got B={B}"
            )
        if len(cu) < 2 or cu[0] != 0 or cu[-1] != L or any(a >= b for a, b in pairwise(cu)):
            raise ValueError(
                f"cu_seqlens must increase strictly from 0 to the packed length T={L} "
                f"(every sequence holds >= 1 token), got {cu}"
            )
    else:
        lens = _index_list("lengths", lengths)
        if len(lens) != B or any(n < 1 or n > L for n in lens):
            raise ValueError(f"lengths must hold B={B} ints in [1, L={L}], got {lens}")
    if initial_state is not None and not isinstance(initial_state, (list, tuple)):
        raise TypeError(
            "with cu_seqlens/lengths, initial_state is a list of TTTStates (one per sequence, "
            f"batch 1), got {type(initial_state).__name__}"
        )


def _check_weights(weights: dict[str, Tensor], H: int, D: int) -> None:
    # TTT-Linear maps D -> D; TTT-MLP's hidden width F is read off W1
    W1 = weights.get("W1")
    F = W1.shape[-1] if ("W2" in weights and isinstance(W1, Tensor)) else D
    dims = {"H": H, "D": D, "F": F}
    for name, t in weights.items():
        _tensor(name, t)
        if name not in _WEIGHT_SHAPES:  # a user fast model's weight: [H, ...]
            if t.ndim < 1 or t.shape[0] != H:
                raise ValueError(
                    f"fast weight {name!r} must have a leading head dim of {H}, got {_shape(t)}"
                )
            continue
        names = _WEIGHT_SHAPES[name]
        if t.ndim != 3:
            raise ValueError(f"{name} must be 3-D [{', '.join(map(str, names))}], got {_shape(t)}")
        shape = tuple(dims[n] if isinstance(n, str) else n for n in names)
        _expect(name, t, shape, ",".join(map(str, names)))


def _check_options(q, mini_batch_size, causal, token_scale, eps, backend, reconstruction_target,
                   output_residual) -> None:  # fmt: skip
    if mini_batch_size is not None:
        if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int):
            raise TypeError(
                f"mini_batch_size must be an int or None, got {type(mini_batch_size).__name__}"
            )
        if mini_batch_size < 1:
            raise ValueError(
                f"mini_batch_size must be >= 1 (or None for the whole sequence), got {mini_batch_size}"
            )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if isinstance(token_scale, Tensor):
        _tensor("token_scale", token_scale)
        if mini_batch_size is None:
            raise ValueError("a per-position token_scale tensor needs a finite mini_batch_size")
        _expect("token_scale", token_scale, (mini_batch_size,), "mini_batch_size")
        if token_scale.device != q.device:
            raise ValueError(f"token_scale is on {token_scale.device} but q is on {q.device}")
    elif token_scale not in TOKEN_SCALES:
        raise ValueError(
            f"token_scale must be 'mean', 'sum' or a [mini_batch_size] tensor, got {token_scale!r}"
        )
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not (math.isfinite(eps) and eps > 0)
    ):
        raise ValueError(f"eps must be a positive number (finite, > 0), got {eps!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if reconstruction_target not in RECONSTRUCTION_TARGETS:
        raise ValueError(
            f"reconstruction_target must be 'residual' (target v - k) or 'value' (target v), "
            f"got {reconstruction_target!r}"
        )
    if not isinstance(output_residual, bool):
        raise TypeError(f"output_residual must be a bool, got {type(output_residual).__name__}")


def check_state(state, weights: dict[str, Tensor], q: Tensor, mini_batch_size, titans: bool,
                name: str = "initial_state") -> None:  # fmt: skip
    """Check a carried ``TTTState`` against the call, by metadata only: every field's shape
    ([B, ...weights]), dtype (fp32 for fp32/bf16/fp16 inputs, fp64 for fp64) and device, the offset
    (an int in [0, b)), the same b inside a mini-batch and the same form (plain / Titans)."""
    if not isinstance(state, TTTState):
        raise TypeError(f"{name} must be a TTTState, got {type(state).__name__}")
    if not isinstance(state.params, dict) or state.params.keys() != weights.keys():
        raise ValueError(
            f"{name} holds fast weights {sorted(state.params)} but this op uses {sorted(weights)}"
        )
    B, dtype, device = q.shape[0], compute_dtype(q.dtype), q.device
    fields = (state.params, state.grad_sum, state.momentum, state.current)
    for field, d in zip(("params", "grad_sum", "momentum", "current"), fields):
        if d is None:
            continue
        if not isinstance(d, dict) or d.keys() != weights.keys():
            raise ValueError(f"{name}.{field} must hold the fast weights {sorted(weights)}")
        for n, t in d.items():  # the messages are formatted only for a tensor that fails
            want = (B, *weights[n].shape)
            if (
                not isinstance(t, Tensor)
                or t.shape != want
                or t.dtype != dtype
                or t.device != device
            ):
                _state_tensor_error(f"{name}.{field}[{n!r}]", t, want, q, dtype)
    b, off = state.mini_batch_size, state.offset
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise ValueError(f"{name}.mini_batch_size must be an int >= 1 or None, got {b!r}")
    if isinstance(off, bool) or not isinstance(off, int) or off < 0 or (b is not None and off >= b):
        rng = "an int >= 0" if b is None else f"an int in [0, {b})"
        raise ValueError(f"{name}.offset must be {rng} (its mini_batch_size {b}), got {off!r}")
    if off > 0 and b != mini_batch_size:
        raise ValueError(
            f"{name} was cut inside a mini-batch of size {b}; resume it with "
            f"mini_batch_size={b}, got {mini_batch_size}"
        )
    _check_form(state, titans, name)


def _state_tensor_error(where: str, t, want: tuple, q: Tensor, dtype: torch.dtype) -> None:
    """Raise the error of a state tensor ``where`` whose type, shape, dtype or device is wrong."""
    _tensor(where, t)
    if tuple(t.shape) != want:
        raise ValueError(f"{where} must have shape {list(want)}, got {_shape(t)}")
    if t.dtype != dtype:
        raise TypeError(
            f"{where} has dtype {t.dtype}; the state of a {q.dtype} call is {dtype} "
            f"(fp32 for fp32/bf16/fp16 inputs, fp64 for fp64): convert it with .to({dtype})"
        )
    raise ValueError(f"{where} is on {t.device} but q is on {q.device}: use .to()")


def _check_form(state: TTTState, titans: bool, name: str) -> None:
    """The fields a state of each form carries (a Titans state's momentum is never dropped)."""
    if not titans and (state.momentum is not None or state.current is not None):
        raise ValueError(
            f"{name} comes from a Titans (momentum/decay) call: pass momentum/decay to resume it "
            "(a plain call would drop its momentum)"
        )
    if titans and state.grad_sum is not None:
        raise ValueError(
            f"{name} was cut inside a mini-batch of the plain form: resume it without momentum/decay"
        )
    if state.offset == 0 and (state.grad_sum is not None or state.current is not None):
        raise ValueError(f"{name} at offset 0 carries grad_sum/current, which only a cut has")
    if state.offset > 0 and not titans and state.grad_sum is None:
        raise ValueError(f"{name} is cut inside a mini-batch (offset > 0) but has no grad_sum")
    if state.offset > 0 and titans and (state.momentum is None or state.current is None):
        raise ValueError(
            f"{name} is cut inside a Titans mini-batch (offset > 0) but lacks momentum/current"
        )
