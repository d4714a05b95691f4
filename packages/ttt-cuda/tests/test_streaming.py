"""Streaming through the fused TTT-Linear op with states cut anywhere, even inside a mini-batch
(``initial_state.offset > 0``): the call first finishes the cut mini-batch from the state's params
and grad_sum. References: ttt-core's torch backend (fp32, rtol 1e-4), the plain fp64 reference of
ttt_cuda_reference.py (one call, 1e-10) and finite differences of the op (gradcheck)."""

from __future__ import annotations

import itertools

import pytest
import torch
from ttt_cuda_reference import (
    assert_cpp_matches_torch_one_call,
    assert_grads_close,
    make_inputs,
    make_mlp_inputs,
    make_titans,
    reference_ttt_linear,
    scale_vector,
)

from ttt_core import ttt_linear, ttt_mlp
from ttt_cuda.ops import linear_fwd

SEQ = ("q", "k", "v", "eta")


def _stream(x, cuts, backend, **kw):
    """Runs x in chunks [cuts[i], cuts[i+1]) carrying the state; returns (o, final state)."""
    outs, st = [], None
    for t0, t1 in itertools.pairwise(cuts):
        part = {**x, **{n: x[n][:, :, t0:t1] for n in SEQ}}
        o, st = ttt_linear(
            *part.values(), backend=backend, initial_state=st, output_final_state=True, **kw
        )
        outs.append(o)
    return torch.cat(outs, dim=2), st


@pytest.mark.parametrize("token_scale", ["mean", "sum", "vector"])
def test_one_token_at_a_time_matches_torch_backend_one_call(token_scale):
    """L = 13 tokens, b = 4, fed one by one: outputs, the final state (offset 1, params, grad_sum)
    and every gradient (through the chain of carried states) equal one torch-backend call."""
    B, H, L, D, b = 1, 2, 13, 8, 4
    x = make_inputs(B, H, L, D, dtype=torch.float32, seed=31)
    ts = token_scale
    if token_scale == "vector":
        ts = (0.3 + torch.rand(b, generator=torch.Generator().manual_seed(2))).requires_grad_()
    kw = dict(mini_batch_size=b, token_scale=ts)
    o, st = _stream(x, list(range(L + 1)), "cuda", **kw)
    ref, st_ref = ttt_linear(*x.values(), backend="torch", output_final_state=True, **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == L % b
    for field in ("params", "grad_sum"):
        for name in ("W1", "b1"):
            got, want = getattr(st, field)[name], getattr(st_ref, field)[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    inputs = list(x.values()) + ([ts] if token_scale == "vector" else [])
    go = torch.randn_like(ref)

    def loss(o, st):
        return (o * go).sum() + st.grad_sum["W1"].square().sum() + st.params["b1"].sum()

    got = torch.autograd.grad(loss(o, st), inputs)
    want = torch.autograd.grad(loss(ref, st_ref), inputs)
    assert_grads_close(got, want, [*x, "token_scale"])


CUTS = [
    # L, b, cut points (chunks that start and end inside mini-batches, span several, or both)
    (29, 8, [0, 3, 5, 13, 14, 27, 29]),
    (20, 4, [0, 1, 2, 7, 20]),
    (17, 16, [0, 15, 16, 17]),  # a chunk that only finishes its mini-batch, then a boundary
]


@pytest.mark.parametrize("case", CUTS, ids=[f"L{c[0]}-b{c[1]}-{len(c[2]) - 1}chunks" for c in CUTS])
def test_chunked_with_cuts_inside_mini_batches_matches_torch_backend(case):
    L, b, cuts = case
    x = make_inputs(2, 2, L, 16, dtype=torch.float32, seed=32)
    o, st = _stream(x, cuts, "cuda", mini_batch_size=b)
    o_t, st_t = _stream(x, cuts, "torch", mini_batch_size=b)
    ref, _ = ttt_linear(*x.values(), backend="torch", mini_batch_size=b)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o, o_t, rtol=1e-4, atol=1e-4)
    assert st.offset == st_t.offset == L % b
    go = torch.randn_like(ref)
    got = torch.autograd.grad((o * go).sum() + st.params["W1"].sum(), list(x.values()))
    want = torch.autograd.grad((o_t * go).sum() + st_t.params["W1"].sum(), list(x.values()))
    assert_grads_close(got, want, list(x))


def test_whole_sequence_mini_batch_streams_like_the_torch_backend():
    """mini_batch_size=None (one unbounded mini-batch): chunks carry offset and grad_sum."""
    x = make_inputs(1, 2, 12, 8, dtype=torch.float32, seed=33)
    o, st = _stream(x, [0, 5, 6, 12], "cuda", mini_batch_size=None)
    ref, st_ref = ttt_linear(*x.values(), backend="torch", mini_batch_size=None,
                             output_final_state=True)  # fmt: skip
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == 12 and st.mini_batch_size is None
    torch.testing.assert_close(st.grad_sum["W1"], st_ref.grad_sum["W1"], rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(o.square().sum(), list(x.values()))
    want = torch.autograd.grad(ref.square().sum(), list(x.values()))
    assert_grads_close(got, want, list(x))


@pytest.mark.parametrize("form", ["linear", "mlp", "titans", "titans_mlp"])
def test_mini_batch_beyond_the_call_is_one_segment(form):
    """mini_batch_size 2**20 on 9 tokens in two chunks (a cut at 4): the calls end inside their
    first mini-batch, one segment each that does not complete. The C++ scratch is sized by the
    positions a call reaches (offset + L), not by b (b^2 floats per chain would be 4 TiB and
    raise MemoryError): o, the final state and every gradient equal one torch-backend call."""
    b = 2**20
    mlp = form in ("mlp", "titans_mlp")
    make = make_mlp_inputs if mlp else make_inputs
    x = make(1, 2, 9, 8, dtype=torch.float32, seed=35)
    extra = None
    if form.startswith("titans"):
        mom, dec = make_titans(1, 2, 9, dtype=torch.float32, seed=35)
        extra = {"momentum": mom, "decay": dec}
    op = ttt_mlp if mlp else ttt_linear
    assert_cpp_matches_torch_one_call(op, x, [0, 4, 9], extra=extra, mini_batch_size=b)


def test_fp64_chunks_match_the_plain_reference_in_one_call():
    """fp64, cuts inside mini-batches, against the independent primal reference (1e-10)."""
    B, H, L, D, b = 1, 2, 11, 5, 4
    x = make_inputs(B, H, L, D, seed=34)
    o, _ = _stream(x, [0, 2, 3, 9, 11], "cuda", mini_batch_size=b)
    W0 = x["W1"].unsqueeze(0).expand(B, H, D, D)
    b0 = x["b1"].reshape(1, H, D).expand(B, H, D)
    ref, _, _ = reference_ttt_linear(
        x["q"], x["k"], x["v"], x["eta"], W0, b0, x["ln_weight"], x["ln_bias"],
        mini_batch_size=b, causal=True, scale=scale_vector("mean", b),
    )  # fmt: skip
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(ref)
    got = torch.autograd.grad((o * go).sum(), list(x.values()))
    want = torch.autograd.grad((ref * go).sum(), list(x.values()))
    for name, g, w in zip(x, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("offset,L,end_unscaled", [(1, 6, False), (2, 1, True), (3, 4, True)],
                         ids=["finishes-then-more", "one-token-stays-inside", "crosses-then-cut"])  # fmt: skip
def test_gradcheck_start_inside_a_mini_batch(offset, L, end_unscaled):
    """Finite differences of the op started at ``offset`` with a grad_sum: the hand-written
    backward of the state's params and grad_sum terms (and of the token scale through them)."""
    B, H, D, b = 1, 2, 3, 4
    x = make_inputs(B, H, L, D, seed=35)
    g = torch.Generator().manual_seed(36)

    def rnd(*shape, s):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).requires_grad_()

    W0, b0 = rnd(B, H, D, D, s=0.3), rnd(B, H, D, s=0.1)
    G0, gb0 = rnd(B, H, D, D, s=0.2), rnd(B, H, D, s=0.2)
    scale = (0.5 + torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_()

    def f(q, k, v, eta, W0, b0, lnw, lnb, scale, G0, gb0):
        return linear_fwd(q, k, v, eta, W0, b0, lnw, lnb, scale, b, True, 1e-6, end_unscaled,
                          offset, False, G0, gb0)  # fmt: skip

    args = (*(x[n] for n in SEQ), W0, b0, x["ln_weight"], x["ln_bias"], scale, G0, gb0)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_block_schedule_with_offset_equals_serial(monkeypatch):
    """The CUDA phase structure (threads + barriers, see test_linear_cpu) on a start inside a
    mini-batch: bit-equal to the serial run, forward and backward."""
    import ttt_cuda.ops.launch as ops
    from ttt_cuda import fused_ttt_linear

    x = make_inputs(1, 2, 14, 8, dtype=torch.float32, seed=37)
    _, st = ttt_linear(*x.values(), mini_batch_size=8, backend="torch", output_final_state=True)
    st = st.map(lambda t: t.detach().requires_grad_())
    assert st.offset == 6

    def run():
        o, st2 = fused_ttt_linear(**x, mini_batch_size=8, initial_state=st, output_final_state=True)
        loss = o.square().sum() + st2.grad_sum["W1"].sum()
        ins = [*(x[n] for n in (*SEQ, "ln_weight")), st.params["W1"], *st.grad_sum.values()]
        return (o, *torch.autograd.grad(loss, ins))

    serial = run()
    monkeypatch.setattr(ops, "CPU_BLOCK_THREADS", 16)
    for got, want in zip(run(), serial):
        assert torch.equal(got, want)
