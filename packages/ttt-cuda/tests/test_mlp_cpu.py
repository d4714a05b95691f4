"""The C++ CPU path of the fused TTT-MLP op against the plain fp64 primal reference (outputs and
every gradient; both options of the semantics in every combination), finite differences
(gradcheck), the CUDA block schedule (bit-equality), and its torch.library registration (opcheck,
torch.compile)."""

from __future__ import annotations

import pytest
import torch
from ttt_cuda_reference import (
    OPTIONS,
    assert_outputs_and_grads_close,
    make_mlp_inputs,
    mlp_model,
    options_id,
    options_kw,
    reference_ttt,
    scale_vector,
)

from ttt_cuda import fused_ttt_mlp
from ttt_cuda.ops.mlp import mlp_bwd, mlp_fwd

CASES = [
    # B, H, L, D, F, b, causal, token_scale
    (2, 2, 8, 4, 16, 4, True, "mean"),
    (1, 2, 11, 6, 24, 4, True, "sum"),  # last mini-batch shorter
    (2, 1, 10, 4, 16, 4, True, "vector"),  # learnable per-position scale
    (1, 2, 9, 5, 12, 4, False, "mean"),  # non-causal, F != 4D
    (1, 1, 6, 4, 16, None, False, "mean"),  # whole sequence one mini-batch (denoiser)
    (1, 1, 21, 5, 12, 9, True, "mean"),  # b = 9: the CPU's 8-row LayerNorm groups + 1 row, then 3
]


def _id(c):
    B, H, L, D, F, b, causal, ts = c
    return f"B{B}-H{H}-L{L}-D{D}-F{F}-b{b}-{'causal' if causal else 'noncausal'}-{ts}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_fp64_reference(case):
    B, H, L, D, F, b, causal, ts = case
    x = make_mlp_inputs(B, H, L, D, F=F, seed=hash(_id(case)) % 1000)
    mbs = L if b is None else b
    token_scale = ts
    if ts == "vector":
        token_scale = (0.3 + torch.rand(mbs, dtype=torch.float64)).requires_grad_()
    o, _ = fused_ttt_mlp(**x, mini_batch_size=b, causal=causal, token_scale=token_scale)
    params0 = {n: x[n].unsqueeze(0).expand(B, *x[n].shape) for n in ("W1", "W2")}
    params0.update({n: x[n].reshape(1, H, -1).expand(B, H, -1) for n in ("b1", "b2")})
    ref, _ = reference_ttt(
        mlp_model, x["q"], x["k"], x["v"], x["eta"], params0, x["ln_weight"], x["ln_bias"],
        mini_batch_size=mbs, causal=causal, scale=scale_vector(token_scale, mbs),
    )  # fmt: skip
    assert o.dtype == torch.float64 and o.shape == (B, H, L, D)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the inner update must matter
        frozen, _ = fused_ttt_mlp(**{**x, "eta": torch.zeros_like(x["eta"])}, mini_batch_size=b,
                                  causal=causal, token_scale=token_scale)  # fmt: skip
    assert (o.detach() - frozen).abs().max() > 1e-3
    go = torch.randn_like(o)
    inputs = list(x.values()) + ([token_scale] if ts == "vector" else [])
    got = torch.autograd.grad((o * go).sum(), inputs)
    want = torch.autograd.grad((ref * go).sum(), inputs)
    for name, g, w in zip([*x, "token_scale"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


def _op_args(B=1, H=2, L=5, D=3, F=4, b=2, causal=True, seed=5):
    """mlp_fwd's arguments with per-sample start weights, all requiring grad (fp64)."""
    x = make_mlp_inputs(B, H, L, D, F=F, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape, s):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).requires_grad_()

    W10, b10 = rnd(B, H, D, F, s=0.5), rnd(B, H, F, s=0.2)
    W20, b20 = rnd(B, H, F, D, s=0.5), rnd(B, H, D, s=0.2)
    scale = (0.5 + torch.rand(b, generator=g, dtype=torch.float64)).requires_grad_(causal)
    return (x["q"], x["k"], x["v"], x["eta"], W10, b10, W20, b20, x["ln_weight"], x["ln_bias"],
            scale, b, causal, 1e-6)  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_options_match_fp64_reference(options):
    """reconstruction_target ("residual": v - k, "value": v) and output_residual (o = q + LN(f(q))
    or LN(f(q))) in every combination: o, the end weights of both layers and every gradient
    against the fp64 primal reference (L = 7, b = 3, F = 12)."""
    B, H, L, D, F, b = 1, 2, 7, 5, 12, 3
    x = make_mlp_inputs(B, H, L, D, F=F, seed=73)
    W10, W20 = (x[n].unsqueeze(0).expand(B, *x[n].shape) for n in ("W1", "W2"))
    b10, b20 = (x[n].reshape(1, H, -1).expand(B, H, -1) for n in ("b1", "b2"))
    scale = scale_vector("mean", b)
    seq = (x["q"], x["k"], x["v"], x["eta"])
    o, *ends = mlp_fwd(*seq, W10, b10, W20, b20, x["ln_weight"], x["ln_bias"], scale, b, True,
                       1e-6, **options_kw(options))[:5]  # fmt: skip
    ref, ref_ends = reference_ttt(
        mlp_model, *seq, {"W1": W10, "b1": b10, "W2": W20, "b2": b20}, x["ln_weight"],
        x["ln_bias"], mini_batch_size=b, causal=True, scale=scale, **options_kw(options),
    )  # fmt: skip
    assert_outputs_and_grads_close((o, *ends), (ref, *ref_ends.values()), list(x.values()), list(x),
                                   1e-10)  # fmt: skip


GRADCHECK = [
    # causal, end_unscaled, offset (> 0: a start inside a mini-batch with a grad_sum), L, b,
    # (reconstruction_target, output_residual)
    (True, False, 0, 5, 2, OPTIONS[0]),
    (False, False, 0, 5, 2, OPTIONS[0]),
    (True, True, 0, 5, 2, OPTIONS[0]),  # the cut-state end
    (True, False, 1, 5, 3, OPTIONS[0]),  # finishes the cut mini-batch, then more
    (True, True, 1, 1, 3, OPTIONS[0]),  # one token that stays inside the mini-batch
    (True, False, 1, 5, 3, ("value", False)),  # both options off their defaults
]


@pytest.mark.parametrize(
    "causal,end_unscaled,offset,L,b,options", GRADCHECK,
    ids=["causal", "noncausal", "causal-cut-state", "offset-finishes", "offset-one-token",
         "offset-finishes-target-value-no-residual"],
)  # fmt: skip
def test_gradcheck_finite_differences(causal, end_unscaled, offset, L, b, options):
    """The hand-written backward against finite differences of the forward (fp64) through every
    output: o, the end weights and the stored start weights of every segment; from a start inside
    a mini-batch also into the grad_sum of both layers and the token scale through it; also with
    both options off their defaults (target v, no output residual)."""
    args = _op_args(L=L, b=b, causal=causal)
    tensors, rest = args[:11], args[11:]
    g = torch.Generator().manual_seed(9)
    grad_sum = []
    if offset > 0:  # G1w [B, H, D, F], g1b [B, H, F], G2w [B, H, F, D], g2b [B, H, D]
        grad_sum = [(torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
                    for t in tensors[4:8]]  # fmt: skip

    def f(*t):
        return mlp_fwd(*t[:11], *rest, end_unscaled, offset, False, *(t[11:] or [None] * 4),
                       **options_kw(options))  # fmt: skip

    assert torch.autograd.gradcheck(f, (*tensors, *grad_sum), eps=1e-6, atol=1e-6, rtol=1e-5)


BLOCK_CASES = [  # B, H, L, D, F, b, threads, (reconstruction_target, output_residual)
    (2, 2, 11, 8, 32, 4, 3, OPTIONS[0]),
    (1, 1, 20, 64, 256, 8, 256, OPTIONS[0]),
    (1, 2, 11, 8, 32, 4, 5, ("value", False)),  # both options off their defaults
    (1, 1, 13, 12, 20, 5, 3, OPTIONS[0]),  # D=12, F=20: fp32 panels of B^T in blocks plus edges
    (1, 1, 45, 16, 272, 20, 3, OPTIONS[0]),  # F=272, b=20: scaled products in two blocks of rows
]


@pytest.mark.parametrize(
    "case", BLOCK_CASES,
    ids=[f"B{c[0]}-H{c[1]}-L{c[2]}-D{c[3]}-F{c[4]}-b{c[5]}-T{c[6]}-{options_id(c[7])}"
         for c in BLOCK_CASES],
)  # fmt: skip
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_block_schedule_equals_serial(monkeypatch, case, causal):
    """The MLP chain run as a CUDA block runs it (threads + barriers) equals the serial run bit for
    bit, forward and backward (the kernels' launch: 256 threads, D = 64, F = 256); causal runs start
    from a state cut inside a mini-batch."""
    import ttt_cuda.ops.launch as ops

    B, H, L, D, F, b, threads, options = case
    x = make_mlp_inputs(B, H, L, D, F=F, dtype=torch.float32, seed=10)

    start = None
    if causal:  # start from a state cut inside a mini-batch (offset 3, grad_sum of both layers)
        _, start = fused_ttt_mlp(**{**x, **{n: x[n][:, :, :3] for n in ("q", "k", "v", "eta")}},
                                 mini_batch_size=b, output_final_state=True,
                                 **options_kw(options))  # fmt: skip
        start = start.map(lambda t: t.detach().requires_grad_())

    def run():
        o, st = fused_ttt_mlp(**x, mini_batch_size=b, causal=causal, output_final_state=causal,
                              initial_state=start, **options_kw(options))  # fmt: skip
        loss = o.square().sum()
        ins = [x[n] for n in ("q", "k", "v", "eta", "ln_weight", "ln_bias")]
        if causal:
            loss = loss + st.params["W2"].sum() + st.grad_sum["W1"].square().sum()
            ins += [*start.params.values(), *start.grad_sum.values()]
        else:
            ins += [x[n] for n in ("W1", "b1", "W2", "b2")]
        return (o, *torch.autograd.grad(loss, ins))

    serial = run()
    monkeypatch.setattr(ops, "CPU_BLOCK_THREADS", threads)
    for got, want in zip(run(), serial):
        assert torch.equal(got, want)


FAST = ("test_schema", "test_faketensor")  # the second variant: skip the slow AOT checks


def test_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of ttt::mlp_fwd / mlp_bwd."""
    args = _op_args(B=2, H=2, L=7, D=4, F=8, b=3)
    torch.library.opcheck(mlp_fwd, args)
    torch.library.opcheck(mlp_fwd, (*args, True))  # the cut-state variant (7 % 3 != 0)
    with torch.no_grad():
        outs = mlp_fwd(*args)
    d_end = [torch.randn_like(t) for t in outs[1:5]]
    saved = [t.detach() for t in args[:4]]
    ln_scale = [t.detach() for t in args[8:11]]
    for d_starts, utils in (((None,) * 4, "ALL"), ([torch.randn_like(t) for t in outs[5:]], FAST)):
        torch.library.opcheck(mlp_bwd, (torch.randn_like(outs[0]), *d_end, *d_starts, *saved,
                                        *outs[5:], *ln_scale, 3, True, 1e-6), test_utils=utils)  # fmt: skip


def test_torch_compile_traces_the_custom_op_fullgraph():
    x = make_mlp_inputs(1, 2, 12, 8, dtype=torch.float32, seed=1)

    def f(*a):
        return fused_ttt_mlp(*a, mini_batch_size=4)[0]

    o = torch.compile(f, backend="aot_eager", fullgraph=True)(*x.values())
    ref = f(*x.values())
    torch.testing.assert_close(o, ref, rtol=0, atol=0)
    g = torch.autograd.grad(o.sum(), x["W2"])[0]
    torch.testing.assert_close(g, torch.autograd.grad(ref.sum(), x["W2"])[0], rtol=0, atol=0)


def test_float32_matches_float64_and_is_deterministic():
    x = make_mlp_inputs(2, 2, 19, 8, seed=7, requires_grad=False)
    o64, _ = fused_ttt_mlp(**x, mini_batch_size=8)
    x32 = {n: t.float() for n, t in x.items()}
    o32, _ = fused_ttt_mlp(**x32, mini_batch_size=8)
    assert o32.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-4, atol=1e-4)
    assert torch.equal(o32, fused_ttt_mlp(**x32, mini_batch_size=8)[0])
