"""The C++ CPU path of the fused op against the plain fp64 reference (outputs and every gradient;
both options of the semantics in every combination) and against finite differences (gradcheck)."""

from __future__ import annotations

import pytest
import torch
from ttt_cuda_reference import (
    OPTIONS,
    assert_outputs_and_grads_close,
    make_inputs,
    options_id,
    options_kw,
    reference_ttt_linear,
    scale_vector,
)

from ttt_cuda import fused_ttt_linear
from ttt_cuda.ops import linear_fwd

CASES = [
    # B, H, L, D, b, causal, token_scale
    (2, 2, 8, 4, 4, True, "mean"),  # L a multiple of b
    (2, 2, 11, 6, 4, True, "mean"),  # last mini-batch shorter
    (1, 2, 7, 5, 3, True, "sum"),
    (2, 1, 10, 4, 4, True, "vector"),  # learnable per-position scale, gets a gradient
    (2, 2, 9, 6, 4, False, "mean"),  # non-causal (token_scale does not apply)
    (1, 2, 6, 4, None, False, "mean"),  # whole sequence one mini-batch (denoiser)
    (1, 1, 5, 4, 1, True, "mean"),  # b = 1: the exact per-token rule
    (1, 2, 23, 5, 11, True, "mean"),  # b = 11: the CPU's 8-row LayerNorm groups + 3 rows, then 1
]


def _id(case):
    B, H, L, D, b, causal, ts = case
    return f"B{B}-H{H}-L{L}-D{D}-b{b}-{'causal' if causal else 'noncausal'}-{ts}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_fp64_reference(case):
    B, H, L, D, b, causal, ts = case
    x = make_inputs(B, H, L, D, seed=hash(_id(case)) % 1000)
    mbs = L if b is None else b
    if ts == "vector":
        token_scale = (0.3 + torch.rand(mbs, dtype=torch.float64)).requires_grad_()
    else:
        token_scale = ts
    o, _ = fused_ttt_linear(**x, mini_batch_size=b, causal=causal, token_scale=token_scale)
    W0 = x["W1"].unsqueeze(0).expand(B, H, D, D)
    b0 = x["b1"].reshape(1, H, D).expand(B, H, D)
    ref, _, _ = reference_ttt_linear(
        x["q"], x["k"], x["v"], x["eta"], W0, b0, x["ln_weight"], x["ln_bias"],
        mini_batch_size=mbs, causal=causal, scale=scale_vector(token_scale, mbs),
    )  # fmt: skip
    assert o.dtype == torch.float64 and o.shape == (B, H, L, D)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    # the inner update must matter: the output differs from the one with eta = 0
    with torch.no_grad():
        still = {**x, "eta": torch.zeros_like(x["eta"])}
        frozen, _ = fused_ttt_linear(
            **still, mini_batch_size=b, causal=causal, token_scale=token_scale
        )
    assert (o.detach() - frozen).abs().max() > 1e-3

    go = torch.randn_like(o)
    inputs = list(x.values()) + ([token_scale] if ts == "vector" else [])
    got = torch.autograd.grad((o * go).sum(), inputs)
    want = torch.autograd.grad((ref * go).sum(), inputs)
    names = list(x) + (["token_scale"] if ts == "vector" else [])
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


def start_weights(B, H, D, g):
    """Per-sample fp64 start weights W0 [B, H, D, D], b0 [B, H, D] that require grad."""
    W0 = (torch.randn(B, H, D, D, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    b0 = (torch.randn(B, H, D, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    return W0, b0


def test_initial_and_final_state_gradients_match_reference():
    """Per-sample start weights in, end weights out: both carry gradients."""
    B, H, L, D, b = 2, 2, 8, 5, 4
    x = make_inputs(B, H, L, D, seed=3)
    g = torch.Generator().manual_seed(4)
    W0, b0 = start_weights(B, H, D, g)
    scale = scale_vector("mean", b)
    args = (x["q"], x["k"], x["v"], x["eta"], W0, b0, x["ln_weight"], x["ln_bias"])
    o, W_end, b_end, W_starts, _ = linear_fwd(*args, scale, b, True, 1e-6)
    ref_o, ref_W, ref_b = reference_ttt_linear(*args, mini_batch_size=b, causal=True, scale=scale)
    torch.testing.assert_close((o, W_end, b_end), (ref_o, ref_W, ref_b), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(W_starts[:, :, 0], W0.detach())  # stored start of mini-batch 0
    gs = [torch.randn_like(t) for t in (o, W_end, b_end)]
    loss = sum((t * gt).sum() for t, gt in zip((o, W_end, b_end), gs))
    ref_loss = sum((t * gt).sum() for t, gt in zip((ref_o, ref_W, ref_b), gs))
    got = torch.autograd.grad(loss, args)
    want = torch.autograd.grad(ref_loss, args)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_options_match_fp64_reference(options, causal):
    """reconstruction_target ("residual": v - k, "value": v) and output_residual (o = q + LN(f(q))
    or LN(f(q))) in every combination: o, the end weights and every gradient (dk changes with the
    target, dq with the residual) against the fp64 reference (L = 7, b = 3: a shorter last
    mini-batch)."""
    B, H, L, D, b = 1, 2, 7, 5, 3
    x = make_inputs(B, H, L, D, seed=71)
    W0 = x["W1"].unsqueeze(0).expand(B, H, D, D)
    b0 = x["b1"].reshape(1, H, D).expand(B, H, D)
    scale = scale_vector("mean", b)
    args = (x["q"], x["k"], x["v"], x["eta"], W0, b0, x["ln_weight"], x["ln_bias"])
    o, W_end, b_end, _, _ = linear_fwd(*args, scale, b, causal, 1e-6, **options_kw(options))
    ref = reference_ttt_linear(*args, mini_batch_size=b, causal=causal, scale=scale,
                               **options_kw(options))  # fmt: skip
    assert_outputs_and_grads_close((o, W_end, b_end), ref, list(x.values()), list(x), 1e-10)


GRADCHECK = [  # causal, end_unscaled, (reconstruction_target, output_residual)
    (True, False, OPTIONS[0]),
    (False, False, OPTIONS[0]),
    (True, True, OPTIONS[0]),
    (True, True, ("value", False)),
]


@pytest.mark.parametrize(
    "causal,end_unscaled,options", GRADCHECK,
    ids=["causal", "noncausal", "causal-cut-state", "causal-cut-state-target-value-no-residual"],
)  # fmt: skip
def test_gradcheck_finite_differences(causal, end_unscaled, options):
    """The hand-written backward against finite differences of the forward (fp64), through every
    output: o, the end weights and the stored per-mini-batch start weights (L=5, b=2: the last
    mini-batch is shorter, and with end_unscaled ends without token scale); also with both
    options off their defaults (target v, no output residual)."""
    B, H, L, D, b = 1, 2, 5, 3, 2
    x = make_inputs(B, H, L, D, seed=5)
    g = torch.Generator().manual_seed(6)
    W0, b0 = start_weights(B, H, D, g)
    scale = (0.5 + torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_(causal)

    def f(q, k, v, eta, W0, b0, lnw, lnb, scale):
        return linear_fwd(q, k, v, eta, W0, b0, lnw, lnb, scale, b, causal, 1e-6, end_unscaled,
                          **options_kw(options))  # fmt: skip

    args = (x["q"], x["k"], x["v"], x["eta"], W0, b0, x["ln_weight"], x["ln_bias"], scale)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "used", [(0,), (0, 3), (4,), (1, 2)], ids=["o", "o-W_starts", "b_starts", "end"]
)
def test_gradcheck_outputs_the_loss_leaves_out(used):
    """Outputs the loss does not use reach the backward as None (their zero gradient is not
    materialised: the start weights are large); the gradient through the used ones still matches
    finite differences, also when only one of W_starts / b_starts is used."""
    B, H, L, D, b = 1, 2, 5, 3, 2
    x = make_inputs(B, H, L, D, seed=8)
    W0, b0 = start_weights(B, H, D, torch.Generator().manual_seed(9))
    scale = scale_vector("mean", b)

    def f(q, k, v, eta, W0, b0):
        outs = linear_fwd(q, k, v, eta, W0, b0, x["ln_weight"], x["ln_bias"], scale, b, True, 1e-6)
        return tuple(outs[i] for i in used)

    args = (x["q"], x["k"], x["v"], x["eta"], W0, b0)
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_float32_matches_float64():
    """fp32 inputs (fp32 state) against the fp64 run of the same op."""
    x = make_inputs(2, 3, 37, 16, seed=7, requires_grad=False)
    o64, _ = fused_ttt_linear(**x, mini_batch_size=8)
    o32, _ = fused_ttt_linear(**{n: t.float() for n, t in x.items()}, mini_batch_size=8)
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-4, atol=1e-4)


def test_strided_inputs_are_read_in_place():
    """q/k/v as [B, L, H, D] buffers viewed as [B, H, L, D] (last dim contiguous)."""
    x = make_inputs(2, 3, 10, 8, seed=8, requires_grad=False)
    strided = {n: x[n].transpose(1, 2).contiguous().transpose(1, 2) for n in ("q", "k", "v")}
    assert not strided["q"].is_contiguous()
    o_ref, _ = fused_ttt_linear(**x, mini_batch_size=4)
    o, _ = fused_ttt_linear(**{**x, **strided}, mini_batch_size=4)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=0)


def test_deterministic():
    x = make_inputs(1, 2, 12, 8, seed=9, dtype=torch.float32)
    runs = []
    for _ in range(2):
        o, _ = fused_ttt_linear(**x, mini_batch_size=4)
        runs.append((o, *torch.autograd.grad(o.square().sum(), list(x.values()))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


BLOCK_CASES = [
    # B, H, L, D, b, threads, (reconstruction_target, output_residual)
    (2, 2, 21, 8, 8, 3, OPTIONS[0]),
    (2, 2, 21, 8, 8, 16, OPTIONS[0]),
    (1, 1, 40, 64, 16, 256, OPTIONS[0]),  # the kernels' launch: 256 threads, head dim 64
    (2, 1, 19, 8, 8, 5, ("value", False)),  # both options off their defaults
    (1, 2, 13, 12, 5, 4, OPTIONS[0]),  # D=12, b=5: fp32 panels of B^T in 8x8 blocks plus edges
]


@pytest.mark.parametrize(
    "case",
    BLOCK_CASES,
    ids=[
        f"B{c[0]}-H{c[1]}-L{c[2]}-D{c[3]}-b{c[4]}-T{c[5]}-{options_id(c[6])}" for c in BLOCK_CASES
    ],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_block_schedule_equals_serial(monkeypatch, case, causal):
    """The chain math run as a CUDA block runs it (threads + barriers) equals the serial run bit
    for bit, forward and backward: a CPU check that no phase of the kernels lacks a barrier
    (removing one makes this fail)."""
    import ttt_cuda.ops.launch as ops

    B, H, L, D, b, threads, options = case
    x = make_inputs(B, H, L, D, dtype=torch.float32, seed=10)
    go = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(0))

    def run():
        # causal: also the state cut inside the last mini-batch (L % b != 0), with gradients
        o, st = fused_ttt_linear(**x, mini_batch_size=b, causal=causal, output_final_state=causal,
                                 **options_kw(options))  # fmt: skip
        loss = (o * go).sum()
        if causal:
            loss = loss + st.params["W1"].sum() + st.grad_sum["W1"].square().sum()
        return (o, *torch.autograd.grad(loss, list(x.values())))

    serial = run()
    monkeypatch.setattr(ops, "CPU_BLOCK_THREADS", threads)
    for _ in range(3):  # different interleavings each time
        for got, want in zip(run(), serial):
            assert torch.equal(got, want)
