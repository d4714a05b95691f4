"""Running one call as several sub-calls that carry the state: gradient-checkpointed groups of
mini-batches, and variable-length (packed or right-padded) sequences.

Both rest on the streaming guarantee (DESIGN.md): a causal sequence cut anywhere, the state carried,
gives the same outputs as one call. Cuts here fall on mini-batch boundaries (checkpointing) or
between independent sequences (varlen), so they hold for the non-causal update too.

- ``checkpoint_group_size = G``: the sequence runs in groups of G mini-batches; each group is one
  recompute region (:class:`_Recompute`, the reentrant checkpoint written out over explicit tensor
  inputs: torch.func's gradients, which the generic path takes, refuse the saved-tensor hooks of
  ``torch.utils.checkpoint``'s non-reentrant form, and its reentrant form refuses
  ``torch.autograd.grad``). The forward runs the group without a graph and keeps its inputs (the
  group's tokens and start state); the backward runs it again with a graph and differentiates it.
  First order only (no ``create_graph``).
- ``cu_seqlens`` [N + 1] (flash-linear-attention's convention: q is [1, H, T, D] holding N sequences
  back to back, sequence i is ``cu_seqlens[i]:cu_seqlens[i + 1]``) and ``lengths`` [B] (right
  padding: sample i's real tokens are ``:lengths[i]``): every sequence runs alone from its own
  initial state; sequences never exchange information.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import Tensor

from .state import TTTState

# a backend call on per-token inputs {"q", "k", "v", "eta", "momentum", "decay"} from a state,
# with the shared tensors {"ln_weight", "ln_bias", "token_scale"} (varlen passes none: {})
Run = Callable[[dict, TTTState, dict], tuple[Tensor, TTTState]]
STATE_FIELDS = ("params", "grad_sum", "momentum", "current")


def _split(seq: dict, sizes: list[int], dim: int) -> list[dict]:
    """Every per-token input split into consecutive pieces of ``sizes`` along ``dim`` (None stays).

    One ``split`` per tensor, not a slice per piece: the backward of N slices would allocate and
    fill N zero tensors of the whole input's size (quadratic in the number of pieces)."""
    parts = {
        n: [None] * len(sizes) if t is None else t.split(sizes, dim=dim) for n, t in seq.items()
    }
    return [{n: parts[n][i] for n in seq} for i in range(len(sizes))]


def group_bounds(L: int, state: TTTState, group_size: int) -> list[tuple[int, int]]:
    """Token ranges of the checkpoint groups: G mini-batches each, the first one finishing the
    mini-batch the state was cut in; one group for a whole-sequence mini-batch (b None)."""
    b = state.mini_batch_size
    if b is None:
        return [(0, L)]
    first, span = group_size * b - state.offset, group_size * b
    bounds = [(0, min(first, L))]
    bounds += [(s, min(s + span, L)) for s in range(first, L, span)]
    return bounds


class _Recompute(torch.autograd.Function):
    """outputs = fn(*inputs) without a graph in the forward, recomputed with one in the backward."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return fn(*inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = ctx.fn(*inputs)
        used = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        wanted = [t for t in inputs if t.requires_grad]
        got = iter(
            torch.autograd.grad(
                [o for o, _ in used], wanted, [g for _, g in used], allow_unused=True
            )
            if used and wanted
            else [None] * len(wanted)
        )
        return (None, *(next(got) if t.requires_grad else None for t in inputs))


def _flat_state(state: TTTState) -> tuple[list[tuple[str, str]], list[Tensor]]:
    keys = [
        (f, n) for f in STATE_FIELDS if getattr(state, f) is not None for n in getattr(state, f)
    ]
    return keys, [getattr(state, f)[n] for f, n in keys]


def _unflat_state(like: TTTState, keys: list[tuple[str, str]], tensors) -> TTTState:
    fields: dict = {f: None for f in STATE_FIELDS}
    for (f, n), t in zip(keys, tensors):
        fields[f] = {**(fields[f] or {}), n: t}
    return dataclasses.replace(like, **fields)


def run_checkpointed(run: Run, seq: dict, state: TTTState, shared: dict, group_size: int):
    """``run`` over the sequence in recomputed groups of ``group_size`` mini-batches; returns
    (o [B, H, L, D], the state after the last token). ``shared``: the other tensors ``run`` reads
    (LayerNorm weights, a learnable token scale), passed so that their gradients flow."""
    outs = []
    bounds = group_bounds(seq["q"].shape[2], state, group_size)
    for part in _split(seq, [end - start for start, end in bounds], dim=2):
        names = [n for n, t in {**part, **shared}.items() if t is not None]
        keys, state_tensors = _flat_state(state)
        end_state: list[TTTState] = []  # the group's end state's structure, from the forward

        def group(*tensors, state=state, names=names, keys=keys, end_state=end_state):
            given = dict(zip(names, tensors))
            start_state = _unflat_state(state, keys, tensors[len(names) :])
            o, new = run({n: given.get(n) for n in seq}, start_state,
                         {n: given.get(n, t) for n, t in shared.items()})  # fmt: skip
            end_state[:] = [new]
            return (o, *_flat_state(new)[1])

        o, *new_tensors = _Recompute.apply(group, *[{**part, **shared}[n] for n in names],
                                           *state_tensors)  # fmt: skip
        state = _unflat_state(end_state[0], _flat_state(end_state[0])[0], new_tensors)
        outs.append(o)
    return torch.cat(outs, dim=2), state


def sequence_bounds(
    cu_seqlens: Tensor | Sequence[int] | None, lengths: Tensor | Sequence[int] | None
) -> list[tuple[int, int, int]]:
    """(sample, start, end) of every sequence. Reads the (small) index tensors on the host: a
    GPU tensor costs one sync; pass Python lists to avoid it."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist() if isinstance(cu_seqlens, Tensor) else list(cu_seqlens)
        return [(0, s, e) for s, e in pairwise(cu)]
    lens = lengths.tolist() if isinstance(lengths, Tensor) else list(lengths)
    return [(i, 0, n) for i, n in enumerate(lens)]


def run_varlen(run: Run, seq: dict, states: list[TTTState], bounds: list[tuple[int, int, int]]):
    """``run`` on every sequence alone from its own state; returns (o shaped like q, zeros at
    padding, and the list of final states, one per sequence)."""
    q = seq["q"]
    pieces: list[list[Tensor]] = [[] for _ in range(q.shape[0])]
    finals = []
    samples = _split(seq, [1] * q.shape[0], dim=0)
    per_sample = {i: [(s, e) for j, s, e in bounds if j == i] for i in range(q.shape[0])}
    sequences = {}
    for i, sample in enumerate(samples):
        ranges = per_sample[i]
        sizes = [e - s for s, e in ranges]
        if ranges[-1][1] < q.shape[2]:  # right padding: the rest, unused
            sizes.append(q.shape[2] - ranges[-1][1])
        for r, piece in zip(ranges, _split(sample, sizes, dim=2)):
            sequences[(i, *r)] = piece
    for (sample, start, end), state in zip(bounds, states):
        o, final = run(sequences[sample, start, end], state, {})
        pieces[sample].append(o)
        finals.append(final)
    for parts in pieces:
        used = sum(p.shape[2] for p in parts)
        if used < q.shape[2]:  # right padding: zeros
            parts.append(q.new_zeros(1, q.shape[1], q.shape[2] - used, q.shape[3]))
    return torch.cat([torch.cat(p, dim=2) for p in pieces], dim=0), finals
