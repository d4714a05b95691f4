"""Input checks for the functional API and the step entries: shapes and metadata only, never values
(no GPU sync, traceable by torch.compile). Every call is checked once, in :func:`validate`."""

from __future__ import annotations

import math

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


def validate(
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
) -> tuple[int, int, int, int]:
    """Check every argument of ``ttt_linear``/``ttt_mlp`` (``step``: of ``ttt_*_step``, one token)
    or of an ``InnerLearner`` with its own fast weights (names other than W1, b1, W2, b2: only the
    leading head dim is checked). Returns (B, H, L, D)."""
    q = _tensor("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D [B, H, L, D], got {q.ndim}-D with shape {_shape(q)}")
    B, H, L, D = q.shape
    if L < 1:
        raise ValueError(f"q must hold at least one token (L >= 1), got shape {_shape(q)}")
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
    if initial_state is not None:
        check_state(initial_state, weights, q, mini_batch_size, titans,
                    name="state" if step else "initial_state")  # fmt: skip
    return B, H, L, D


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
    if set(state.params) != set(weights):
        raise ValueError(
            f"{name} holds fast weights {sorted(state.params)} but this op uses {sorted(weights)}"
        )
    B, dtype = q.shape[0], compute_dtype(q.dtype)
    for field in ("params", "grad_sum", "momentum", "current"):
        d = getattr(state, field)
        if d is None:
            continue
        if not isinstance(d, dict) or set(d) != set(weights):
            raise ValueError(f"{name}.{field} must hold the fast weights {sorted(weights)}")
        for n, t in d.items():
            where = f"{name}.{field}[{n!r}]"
            _tensor(where, t)
            want = (B, *weights[n].shape)
            if tuple(t.shape) != want:
                raise ValueError(f"{where} must have shape {list(want)}, got {_shape(t)}")
            if t.dtype != dtype:
                raise TypeError(
                    f"{where} has dtype {t.dtype}; the state of a {q.dtype} call is {dtype} "
                    f"(fp32 for fp32/bf16/fp16 inputs, fp64 for fp64): convert it with .to({dtype})"
                )
            if t.device != q.device:
                raise ValueError(f"{where} is on {t.device} but q is on {q.device}: use .to()")
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
