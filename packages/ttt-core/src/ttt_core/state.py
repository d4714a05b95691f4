"""`TTTState`: the fast-weight state a causal TTT call hands to the next one, and the one place that
keeps the streaming bookkeeping every backend needs (start, end offset, token scales, end state).

A causal sequence may be cut anywhere, even inside a mini-batch. Every token of a mini-batch takes its
gradient at the weights the mini-batch started from, so a cut inside one must carry those start
weights plus what the tokens already read contributed:

- plain form (token_scale): ``grad_sum = sum_{j read} eta_j grad l_j(params)``; query i of the
  mini-batch sees ``params - s_i * (grad_sum + ...)``.
- Titans form: ``momentum`` S_j and ``current`` W_j after the last token read (the recurrence state),
  while gradients are still taken at ``params``.

A backend (the torch, generic and single-step paths here, ttt-cuda's fused ops) reads a call's
bookkeeping from the state it starts from::

    b = state.block_size(L)                        # tokens per mini-batch for this call
    s = TTTState.token_scales(token_scale, 0, b, device=..., dtype=...)   # s_i, [b]
    s = TTTState.token_scale_at(token_scale, state.offset)   # one token's s_i (a single step)
    new = state.advance(L, params=..., grad_sum=..., momentum=..., current=...)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

__all__ = ["TTTState"]

TensorDict = dict[str, Tensor]


def _map_dict(d: TensorDict | None, fn: Callable[[Tensor], Tensor]) -> TensorDict | None:
    return None if d is None else {name: fn(t) for name, t in d.items()}


@dataclass
class TTTState:
    """Per-sample fast-weight state of a causal TTT layer, picklable.

    Attributes:
        params: fast weights the current mini-batch started from, e.g. ``{"W1": [B, H, D, F],
            "b1": [B, H, 1, F]}`` (fp32; fp64 for fp64 inputs). Gradients of the current
            mini-batch are taken here.
        offset: tokens of the current mini-batch already read, ``0 <= offset < mini_batch_size``.
        mini_batch_size: the b the state was produced with (a resume must use the same b when
            ``offset > 0``); ``None`` for a whole-sequence mini-batch.
        grad_sum: plain form, ``offset > 0``: ``sum_j eta_j grad l_j(params)`` over the tokens read.
        momentum: Titans form: the momentum S after the last token read (zeros at the start).
        current: Titans form, ``offset > 0``: the weights W after the last token read (at
            ``offset == 0`` they equal ``params``).

    Examples:
        >>> o1, st = ttt_linear(q[:, :, :5], ..., output_final_state=True)
        >>> o2, st = ttt_linear(q[:, :, 5:], ..., initial_state=st, output_final_state=True)
    """

    params: TensorDict
    offset: int = 0
    mini_batch_size: int | None = None
    grad_sum: TensorDict | None = None
    momentum: TensorDict | None = None
    current: TensorDict | None = None

    @property
    def batch_size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    @property
    def is_titans(self) -> bool:
        return self.momentum is not None

    # ------------------------------------------------------------------------------------------
    # streaming bookkeeping: start, advance, token scales, end state
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def from_params(
        params: TensorDict, batch: int, mini_batch_size: int | None, dtype=torch.float32
    ) -> TTTState:
        """Start state: per-head weights ``[H, ...]`` broadcast to every sample (fp32, or fp64)."""
        return TTTState(
            params={
                n: p.to(dtype).unsqueeze(0).expand(batch, *p.shape).contiguous()
                for n, p in params.items()
            },
            mini_batch_size=mini_batch_size,
        )

    @staticmethod
    def start(
        state: TTTState | None,
        params: TensorDict,
        batch: int,
        mini_batch_size: int | None,
        dtype=torch.float32,
    ) -> TTTState:
        """The state a call starts from: ``state`` (validated) continued with the call's
        ``mini_batch_size`` (a state at a mini-batch boundary may change b), or, when None, the
        weights ``params`` per sample (:meth:`from_params`)."""
        if state is None:
            return TTTState.from_params(params, batch, mini_batch_size, dtype)
        if state.mini_batch_size != mini_batch_size:
            return replace(state, mini_batch_size=mini_batch_size)
        return state

    def ends_inside(self, length: int) -> bool:
        """Whether a call of ``length`` tokens from this state ends inside the mini-batch it starts
        in, without completing it (b None, or offset + length < b): the call is then one segment
        of offset + length positions that does not complete."""
        return self.mini_batch_size is None or self.offset + length < self.mini_batch_size

    def block_size(self, length: int) -> int:
        """In-mini-batch positions a call of ``length`` tokens from this state reaches: b, or the
        offset plus the call's length when it ends inside its first mini-batch (:meth:`ends_inside`;
        a b far beyond the call's tokens then costs no scratch)."""
        if self.ends_inside(length):
            return self.offset + length
        return self.mini_batch_size

    def end_offset(self, length: int) -> int:
        """The in-mini-batch offset after reading ``length`` more tokens."""
        if self.mini_batch_size is None:
            return self.offset + length
        return (self.offset + length) % self.mini_batch_size

    @staticmethod
    def token_scales(
        token_scale: str | Tensor,
        start: int,
        n: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        causal: bool = True,
    ) -> Tensor:
        """s_i for the in-mini-batch positions ``start .. start + n - 1``: [n] in ``dtype``.

        "mean": 1/(i+1) (the TTT paper), "sum": 1, a [b] tensor: ``token_scale[start:start+n]``
        (differentiable); non-causal calls use 1 (every query sees the mini-batch's end weights).
        """
        if not causal or (isinstance(token_scale, str) and token_scale == "sum"):
            return torch.ones(n, device=device, dtype=dtype)
        if isinstance(token_scale, Tensor):
            return token_scale[start : start + n].to(dtype)
        if token_scale == "mean":
            return 1.0 / torch.arange(start + 1, start + n + 1, device=device, dtype=dtype)
        raise ValueError(f"token_scale must be 'mean', 'sum' or a tensor, got {token_scale!r}")

    @staticmethod
    def token_scale_at(token_scale: str | Tensor, i: int) -> float | Tensor:
        """s_i of the one in-mini-batch position ``i`` (a single streaming token): a number for
        "mean" (1/(i+1)) and "sum" (1), ``token_scale[i]`` (0-d, differentiable) for a tensor;
        :meth:`token_scales` for a run of positions."""
        if isinstance(token_scale, Tensor):
            return token_scale[i]
        if token_scale == "mean":
            return 1.0 / (i + 1)
        if token_scale == "sum":
            return 1.0
        raise ValueError(f"token_scale must be 'mean', 'sum' or a tensor, got {token_scale!r}")

    def advance(
        self,
        length: int,
        *,
        params: TensorDict,
        grad_sum: TensorDict | None = None,
        momentum: TensorDict | None = None,
        current: TensorDict | None = None,
    ) -> TTTState:
        """The end state after reading ``length`` more tokens from this one.

        Args:
            params: the start weights of the mini-batch the last token belongs to (the end weights
                when the call ends on a mini-batch boundary).
            grad_sum: plain form, what that mini-batch's tokens read so far (dropped at a boundary).
            momentum: Titans form, S after the last token (kept at a boundary).
            current: Titans form, W after the last token (dropped at a boundary, where it is
                ``params``).
        """
        end = self.end_offset(length)
        return TTTState(
            params=params,
            offset=end,
            mini_batch_size=self.mini_batch_size,
            grad_sum=grad_sum if end > 0 else None,
            momentum=momentum,
            current=current if end > 0 else None,
        )

    # ------------------------------------------------------------------------------------------
    def map(self, fn: Callable[[Tensor], Tensor]) -> TTTState:
        """A new state with ``fn`` applied to every tensor (e.g. ``lambda t: t[idx]``)."""
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = _map_dict(value, fn) if isinstance(value, dict) else value
        return TTTState(**kwargs)

    def tensors(self) -> list[Tensor]:
        """Every tensor the state holds (params, then grad_sum, momentum, current)."""
        return [t for f in fields(self) if isinstance(d := getattr(self, f.name), dict)
                for t in d.values()]  # fmt: skip

    def detach(self) -> TTTState:
        """Cut the autograd history (truncated backprop through time)."""
        return self.map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> TTTState:
        """``Tensor.to`` on every tensor (keep fast weights in fp32: move devices, not dtypes)."""
        return self.map(lambda t: t.to(*args, **kwargs))

    def is_finite(self) -> Tensor:
        """Per sample, whether every tensor of the state is finite: [B] bool.

        Opt-in check for streaming users (it reads values, so on a GPU ``bool(...)`` of it syncs);
        ``TTTConfig(check_finite_state=True)`` makes a layer raise when its carried state is not.
        """
        ok = None
        for t in self.tensors():
            finite = torch.isfinite(t).flatten(1).all(dim=1)  # (B,)
            ok = finite if ok is None else ok & finite
        assert ok is not None
        return ok

    def fast_weights(self, token_scale: str | Tensor = "mean") -> TensorDict:
        """The weights the last token read would see (its query's W_i), e.g. to inspect memory.

        Plain form: ``params - s_{offset-1} * grad_sum`` (``params`` itself at a boundary);
        Titans form: ``current``.
        """
        if self.offset == 0:
            return dict(self.params)
        if self.current is not None:
            return dict(self.current)
        assert self.grad_sum is not None
        ref = next(iter(self.params.values()))
        s = TTTState.token_scales(
            token_scale, self.offset - 1, 1, device=ref.device, dtype=ref.dtype
        )
        return {n: p - s * self.grad_sum[n] for n, p in self.params.items()}


def zeros_like_dict(d: TensorDict) -> TensorDict:
    """Zeros shaped like every tensor of d (the Titans momentum S before the first token)."""
    return {n: torch.zeros_like(t) for n, t in d.items()}
