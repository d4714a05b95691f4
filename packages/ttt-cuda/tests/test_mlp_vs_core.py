"""ttt-core's ``ttt_mlp(backend="cuda")`` (the C++ CPU path here) against ttt-core's torch backend:
outputs and every gradient (W1, b1, W2, b2, LN, eta, token scale) at fp32, rtol 1e-4; both options
of the semantics in every combination; streaming states at mini-batch boundaries, cut inside one
(also with the options), and one token at a time."""

from __future__ import annotations

import pytest
import torch
from ttt_cuda_reference import (
    OPTION_CASES,
    assert_cpp_matches_torch_one_call,
    assert_grads_close,
    make_mlp_inputs,
    option_case_id,
    options_kw,
)

from ttt_core import ttt_mlp

CASES = [
    # B, H, L, D, b, causal, token_scale (F = 4D, ttt-core's default width)
    (2, 2, 32, 16, 16, True, "mean"),
    (1, 2, 37, 16, 8, True, "sum"),  # L not a multiple of b
    (2, 1, 21, 8, 8, True, "vector"),
    (1, 2, 24, 16, 8, False, "mean"),
    (1, 2, 20, 8, None, False, "mean"),  # the whole sequence one mini-batch
    (1, 1, 19, 12, 4, True, "mean"),  # odd head dim
]


def _id(c):
    B, H, L, D, b, causal, ts = c
    return f"B{B}-H{H}-L{L}-D{D}-b{b}-{'causal' if causal else 'noncausal'}-{ts}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_outputs_and_gradients_match_torch_backend(case):
    B, H, L, D, b, causal, ts = case
    x = make_mlp_inputs(B, H, L, D, dtype=torch.float32, seed=41)
    token_scale = ts
    if ts == "vector":
        gen = torch.Generator().manual_seed(1)
        token_scale = (0.2 + torch.rand(b, generator=gen)).requires_grad_()
    kw = dict(mini_batch_size=b, causal=causal, token_scale=token_scale)
    o, _ = ttt_mlp(*x.values(), backend="cuda", **kw)
    ref, _ = ttt_mlp(*x.values(), backend="torch", **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(ref)
    inputs = list(x.values()) + ([token_scale] if ts == "vector" else [])
    got = torch.autograd.grad((o * go).sum(), inputs)
    want = torch.autograd.grad((ref * go).sum(), inputs)
    assert_grads_close(got, want, [*x, "token_scale"])


@pytest.mark.parametrize("case", OPTION_CASES, ids=option_case_id)
def test_options_match_torch_backend(case):
    """reconstruction_target and output_residual (every combination; streamed with cuts inside
    mini-batches): o, the final state and every gradient equal one torch-backend call."""
    options, cuts = case
    x = make_mlp_inputs(1, 2, 19, 6, dtype=torch.float32, seed=74)
    assert_cpp_matches_torch_one_call(ttt_mlp, x, cuts, mini_batch_size=8, **options_kw(options))


def test_streaming_at_mini_batch_boundaries_matches_one_call():
    x = make_mlp_inputs(2, 2, 24, 8, dtype=torch.float32, seed=42)
    o_full, _ = ttt_mlp(*x.values(), mini_batch_size=8, backend="cuda",
                              output_final_state=True)  # fmt: skip
    outs, st = [], None
    for t0, t1 in ((0, 8), (8, 24)):
        part = {**x, **{n: x[n][:, :, t0:t1] for n in ("q", "k", "v", "eta")}}
        o, st = ttt_mlp(*part.values(), mini_batch_size=8, backend="cuda", initial_state=st,
                        output_final_state=True)  # fmt: skip
        outs.append(o)
    o = torch.cat(outs, dim=2)
    torch.testing.assert_close(o, o_full, rtol=1e-5, atol=1e-5)
    _, st_torch = ttt_mlp(*x.values(), mini_batch_size=8, backend="torch", output_final_state=True)
    for name in ("W1", "b1", "W2", "b2"):
        assert st.params[name].shape == st_torch.params[name].shape
        torch.testing.assert_close(st.params[name], st_torch.params[name], rtol=1e-4, atol=1e-4)
    # gradients through the carried state (params of chunk 1 feed chunk 2)
    got = torch.autograd.grad(o.square().sum(), list(x.values()))
    ref, _ = ttt_mlp(*x.values(), mini_batch_size=8, backend="torch")
    want = torch.autograd.grad(ref.square().sum(), list(x.values()))
    assert_grads_close(got, want, list(x))


def test_final_state_cut_inside_a_mini_batch_matches_torch_backend():
    """L % b != 0: offset, start params and grad_sum as ttt-core's, gradients through them, and
    resuming from the state with the torch backend continues the sequence exactly."""
    x = make_mlp_inputs(1, 2, 30, 8, dtype=torch.float32, seed=43)
    first = {**x, **{n: x[n][:, :, :11] for n in ("q", "k", "v", "eta")}}  # 11 = 8 + 3
    second = {**x, **{n: x[n][:, :, 11:] for n in ("q", "k", "v", "eta")}}
    kw = dict(mini_batch_size=8, output_final_state=True)
    o_c, st_c = ttt_mlp(*first.values(), backend="cuda", **kw)
    o_t, st_t = ttt_mlp(*first.values(), backend="torch", **kw)
    assert st_c.offset == st_t.offset == 3
    torch.testing.assert_close(o_c, o_t, rtol=1e-4, atol=1e-4)
    for field in ("params", "grad_sum"):
        for name in ("W1", "b1", "W2", "b2"):
            got, want = getattr(st_c, field)[name], getattr(st_t, field)[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    full, _ = ttt_mlp(*x.values(), mini_batch_size=8, backend="torch")
    rest, _ = ttt_mlp(*second.values(), mini_batch_size=8, backend="torch", initial_state=st_c)
    torch.testing.assert_close(torch.cat([o_c, rest], 2), full, rtol=1e-4, atol=1e-4)

    def loss(o, st):
        return o.square().sum() + st.grad_sum["W2"].square().sum() + st.params["b1"].sum()

    got = torch.autograd.grad(loss(o_c, st_c), list(x.values()))
    want = torch.autograd.grad(loss(o_t, st_t), list(x.values()))
    assert_grads_close(got, want, list(x))


@pytest.mark.parametrize("token_scale", ["mean", "vector"])
def test_one_token_at_a_time_matches_torch_backend_one_call(token_scale):
    """States cut inside mini-batches (offset > 0, grad_sum of both layers) resume in the fused
    op: 11 tokens fed one by one (b = 4) equal one torch-backend call, outputs, the final state and
    every gradient through the chain of carried states."""
    B, H, L, D, b = 1, 2, 11, 8, 4
    x = make_mlp_inputs(B, H, L, D, dtype=torch.float32, seed=44)
    ts = token_scale
    if token_scale == "vector":
        ts = (0.3 + torch.rand(b, generator=torch.Generator().manual_seed(3))).requires_grad_()
    outs, st = [], None
    for t in range(L):
        part = {**x, **{n: x[n][:, :, t : t + 1] for n in ("q", "k", "v", "eta")}}
        o, st = ttt_mlp(*part.values(), mini_batch_size=b, token_scale=ts, backend="cuda",
                        initial_state=st, output_final_state=True)  # fmt: skip
        outs.append(o)
    o = torch.cat(outs, dim=2)
    ref, st_ref = ttt_mlp(*x.values(), mini_batch_size=b, token_scale=ts, backend="torch",
                          output_final_state=True)  # fmt: skip
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == L % b
    for name in ("W1", "b1", "W2", "b2"):
        torch.testing.assert_close(st.grad_sum[name], st_ref.grad_sum[name], rtol=1e-4, atol=1e-4)
    inputs = list(x.values()) + ([ts] if token_scale == "vector" else [])

    def loss(o, s):
        return o.square().sum() + s.grad_sum["W2"].sum() + s.params["W1"].sum()

    assert_grads_close(torch.autograd.grad(loss(o, st), inputs),
                  torch.autograd.grad(loss(ref, st_ref), inputs), [*x, "token_scale"])  # fmt: skip


def test_whole_sequence_mini_batch_streams_like_the_torch_backend():
    """mini_batch_size=None (one unbounded mini-batch): chunks carry offset and grad_sum."""
    x = make_mlp_inputs(1, 2, 10, 8, dtype=torch.float32, seed=45)
    outs, st = [], None
    for t0, t1 in ((0, 4), (4, 5), (5, 10)):
        part = {**x, **{n: x[n][:, :, t0:t1] for n in ("q", "k", "v", "eta")}}
        o, st = ttt_mlp(*part.values(), mini_batch_size=None, backend="cuda", initial_state=st,
                        output_final_state=True)  # fmt: skip
        outs.append(o)
    o = torch.cat(outs, dim=2)
    ref, st_ref = ttt_mlp(*x.values(), mini_batch_size=None, backend="torch",
                          output_final_state=True)  # fmt: skip
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == 10 and st.mini_batch_size is None
    torch.testing.assert_close(st.grad_sum["W2"], st_ref.grad_sum["W2"], rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(o.square().sum(), list(x.values()))
    want = torch.autograd.grad(ref.square().sum(), list(x.values()))
    assert_grads_close(got, want, list(x))
