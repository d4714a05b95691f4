"""Input checks for the functional API: shapes and metadata only, never values (no GPU sync)."""

from __future__ import annotations

from torch import Tensor

from .state import TTTState

TOKEN_SCALES = ("mean", "sum")


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
) -> tuple[int, int, int, int, int]:
    """Check every argument of ``ttt_linear``/``ttt_mlp``; returns (B, H, L, D, F)."""
    q = _tensor("q", q)
    if q.ndim != 4:
        raise ValueError(f"q must be 4-D [B, H, L, D], got {q.ndim}-D with shape {_shape(q)}")
    B, H, L, D = q.shape
    if L < 1:
        raise ValueError(f"q must hold at least one token (L >= 1), got shape {_shape(q)}")
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
    # TTT-Linear maps D -> D; TTT-MLP's hidden width F is read off W1
    F = weights["W1"].shape[-1] if ("W2" in weights and isinstance(weights["W1"], Tensor)) else D
    expected = {"W1": ((H, D, F), "H,D,F"), "b1": ((H, 1, F), "H,1,F"),
                "W2": ((H, F, D), "H,F,D"), "b2": ((H, 1, D), "H,1,D")}  # fmt: skip
    for name, t in weights.items():
        _tensor(name, t)
        if t.ndim != 3:
            raise ValueError(
                f"{name} must be 3-D {expected[name][1].replace(',', ', ')}, got {_shape(t)}"
            )
        _expect(name, t, *expected[name])
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
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")

    titans = momentum is not None or decay is not None
    if not causal:
        if titans:
            raise ValueError("momentum/decay (the Titans form) need causal=True; got causal=False")
        if initial_state is not None or output_final_state:
            raise ValueError(
                "non-causal TTT cannot stream: initial_state and output_final_state need causal=True"
            )
    if initial_state is not None:
        check_state(initial_state, weights, B, mini_batch_size, titans)
    return B, H, L, D, F


def check_state(state, weights, B, mini_batch_size, titans) -> None:
    """Check a carried ``TTTState`` against the call: fast weights [B, ...weights], same b inside a
    mini-batch, same form (plain / Titans)."""
    if not isinstance(state, TTTState):
        raise TypeError(f"initial_state must be a TTTState, got {type(state).__name__}")
    if set(state.params) != set(weights):
        raise ValueError(
            f"initial_state holds fast weights {sorted(state.params)} but this op uses {sorted(weights)}"
        )
    for name, t in state.params.items():
        want = (B, *weights[name].shape)
        if tuple(t.shape) != want:
            raise ValueError(
                f"initial_state.params[{name!r}] must have shape {list(want)}, got {_shape(t)}"
            )
    if state.offset > 0 and state.mini_batch_size != mini_batch_size:
        raise ValueError(
            f"initial_state was cut inside a mini-batch of size {state.mini_batch_size}; resume it with "
            f"mini_batch_size={state.mini_batch_size}, got {mini_batch_size}"
        )
    if state.offset > 0 and titans != state.is_titans:
        form = "Titans (momentum/decay)" if state.is_titans else "plain"
        raise ValueError(
            f"initial_state was cut inside a mini-batch of the {form} form; resume it in that form"
        )
