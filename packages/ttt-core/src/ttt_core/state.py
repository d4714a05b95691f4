"""`TTTState`: the fast-weight state a causal TTT call hands to the next one (streaming).

A causal sequence may be cut anywhere, even inside a mini-batch. Every token of a mini-batch takes its
gradient at the weights the mini-batch started from, so a cut inside one must carry those start
weights plus what the tokens already read contributed:

- plain form (token_scale): ``grad_sum = sum_{j read} eta_j grad l_j(params)``; query i of the
  mini-batch sees ``params - s_i * (grad_sum + ...)``.
- Titans form: ``momentum`` S_j and ``current`` W_j after the last token read (the recurrence state),
  while gradients are still taken at ``params``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

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
            "b1": [B, H, 1, F]}`` (fp32). Gradients of the current mini-batch are taken here.
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

    def map(self, fn: Callable[[Tensor], Tensor]) -> TTTState:
        """A new state with ``fn`` applied to every tensor (e.g. ``lambda t: t[idx]``)."""
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = _map_dict(value, fn) if isinstance(value, dict) else value
        return TTTState(**kwargs)

    def detach(self) -> TTTState:
        """Cut the autograd history (truncated backprop through time)."""
        return self.map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> TTTState:
        """``Tensor.to`` on every tensor (keep fast weights in fp32: move devices, not dtypes)."""
        return self.map(lambda t: t.to(*args, **kwargs))

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
        if isinstance(token_scale, Tensor):
            s = token_scale[self.offset - 1]
        elif token_scale == "mean":
            s = 1.0 / self.offset
        elif token_scale == "sum":
            s = 1.0
        else:
            raise ValueError(f"token_scale must be 'mean', 'sum' or a tensor, got {token_scale!r}")
        return {n: p - s * self.grad_sum[n] for n, p in self.params.items()}

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


def zeros_like_dict(d: TensorDict) -> TensorDict:
    """Zeros shaped like every tensor of d (the Titans momentum S before the first token)."""
    return {n: torch.zeros_like(t) for n, t in d.items()}
