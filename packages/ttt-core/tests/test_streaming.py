"""Cutting a causal sequence anywhere and carrying the state equals one call."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
from conftest import call, make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

L = 19


def _run_in_pieces(kind, x, w, ln, extra, cuts, **kw):
    bounds = [0, *sorted(set(cuts)), L]
    outs, state = [], None
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        xs = {n: t[:, :, a:b] for n, t in x.items()}
        es = {n: t[:, :, a:b] for n, t in extra.items()}
        o, state = call(kind, xs, w, ln, es, initial_state=state, output_final_state=True, **kw)
        outs.append(o)
    return torch.cat(outs, dim=2), state


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["linear", "mlp"]),
    b=st.sampled_from([1, 3, 4, 8, 32, None]),
    form=st.sampled_from(["plain-mean", "plain-sum", "titans"]),
    backend=st.sampled_from(["torch", "generic"]),
    cuts=st.lists(st.integers(min_value=1, max_value=L - 1), max_size=6),
)
def test_random_cuts_equal_one_call(kind, b, form, backend, cuts):
    x, w, ln, extra = make_inputs(kind, B=2, H=2, L=L, D=6, titans=form == "titans")
    kw = dict(mini_batch_size=b, backend=backend)
    if form == "plain-sum":
        kw["token_scale"] = "sum"
    full, full_state = call(kind, x, w, ln, extra, output_final_state=True, **kw)
    pieces, state = _run_in_pieces(kind, x, w, ln, extra, cuts, **kw)
    torch.testing.assert_close(pieces, full, rtol=1e-10, atol=1e-10)
    assert state.offset == full_state.offset
    for n in full_state.params:
        torch.testing.assert_close(state.params[n], full_state.params[n], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("titans", [False, True], ids=["plain", "titans"])
def test_one_token_at_a_time(kind, titans):
    """Decoding token by token (the primal single-token path) equals the dual form over the sequence."""
    x, w, ln, extra = make_inputs(kind, B=1, H=2, L=L, D=6, titans=titans, dtype=torch.float32)
    full, _ = call(kind, x, w, ln, extra, mini_batch_size=4)
    pieces, _ = _run_in_pieces(kind, x, w, ln, extra, list(range(1, L)), mini_batch_size=4)
    torch.testing.assert_close(pieces, full, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_the_carried_state():
    """Outer gradients of a two-piece run equal those of one call (the state is differentiable)."""
    x, w, ln, _ = make_inputs("linear", B=1, H=2, L=L, D=6, requires_grad=True)
    full, _ = call("linear", x, w, ln, mini_batch_size=4)
    g_full = torch.autograd.grad(full.square().sum(), [*x.values(), *w.values()])
    pieces, _ = _run_in_pieces("linear", x, w, ln, {}, [6], mini_batch_size=4)
    g_pieces = torch.autograd.grad(pieces.square().sum(), [*x.values(), *w.values()])
    for a, b in zip(g_pieces, g_full):
        torch.testing.assert_close(a, b)


def test_state_pickles_bit_identically():
    x, w, ln, extra = make_inputs("mlp", B=2, H=2, L=L, D=6, titans=True)
    _, state = call("mlp", x, w, ln, extra, mini_batch_size=4, output_final_state=True)
    back = pickle.loads(pickle.dumps(state))
    assert back.offset == state.offset == L % 4
    for field in ("params", "momentum", "current"):
        for n, t in getattr(state, field).items():
            assert torch.equal(getattr(back, field)[n], t)


def test_resume_with_other_mini_batch_size_inside_a_mini_batch_raises():
    x, w, ln, _ = make_inputs("linear", L=L)
    _, state = call("linear", x, w, ln, mini_batch_size=4, output_final_state=True)  # 19 % 4 = 3
    with pytest.raises(ValueError, match="mini_batch_size=4"):
        call("linear", x, w, ln, mini_batch_size=8, initial_state=state)
