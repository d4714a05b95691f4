"""TTT-Linear in the Titans form (momentum/decay) through the fused op's C++ CPU path: against
the plain fp64 per-token reference (1e-10), ttt-core's torch backend (fp32, rtol 1e-4; outputs,
states and every gradient incl. momentum and decay), finite differences of the op (gradcheck,
started inside a mini-batch), streaming one token at a time, and the CUDA block schedule; both
options of the semantics (target v - k or v, output with or without q) in every combination."""

from __future__ import annotations

import pytest
import torch
from ttt_cuda_reference import (
    OPTION_CASES,
    OPTIONS,
    assert_block_schedule_equals_serial,
    assert_cpp_matches_torch_one_call,
    assert_grads_close,
    assert_outputs_and_grads_close,
    make_inputs,
    make_titans,
    option_case_id,
    options_id,
    options_kw,
    reference_ttt_titans,
)

from ttt_core import ttt_linear
from ttt_cuda import fused_ttt_linear
from ttt_cuda.ops.titans import titans_bwd, titans_fwd

SEQ = ("q", "k", "v", "eta")


def test_matches_fp64_reference():
    """Outputs, end weights and momentum and every gradient against the per-token reference."""
    B, H, L, D, b = 1, 2, 10, 4, 4
    x = make_inputs(B, H, L, D, seed=61)
    mom, dec = make_titans(B, H, L, seed=61)
    o, st = fused_ttt_linear(**x, mini_batch_size=b, momentum=mom, decay=dec,
                             output_final_state=True)  # fmt: skip
    W0 = x["W1"].unsqueeze(0).expand(B, H, D, D)
    b0 = x["b1"].reshape(1, H, D).expand(B, H, D)
    ref, W_end, b_end, S_end, _ = reference_ttt_titans(
        *(x[n] for n in SEQ), mom, dec, W0, b0, x["ln_weight"], x["ln_bias"], mini_batch_size=b
    )
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    assert st.offset == L % b
    torch.testing.assert_close(st.current["W1"], W_end, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.current["b1"].squeeze(-2), b_end, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st.momentum["W1"], S_end, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(o)
    inputs = [*x.values(), mom, dec]
    got = torch.autograd.grad((o * go).sum() + st.momentum["W1"].sum(), inputs)
    want = torch.autograd.grad((ref * go).sum() + S_end.sum(), inputs)
    for name, g, w in zip([*x, "momentum", "decay"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_options_match_fp64_reference(options):
    """reconstruction_target ("residual": v - k, "value": v) and output_residual (o = q + LN(f(q))
    or LN(f(q))) in every combination: o, the end weights and momentum and every gradient (momentum
    and decay included) against the per-token reference (L = 7, b = 3)."""
    B, H, L, D, b = 1, 2, 7, 5, 3
    x = make_inputs(B, H, L, D, seed=75)
    mom, dec = make_titans(B, H, L, seed=75)
    W0 = x["W1"].unsqueeze(0).expand(B, H, D, D)
    b0 = x["b1"].reshape(1, H, D).expand(B, H, D)
    S0, sb0 = torch.zeros_like(W0), torch.zeros_like(b0)
    seq = [*(x[n] for n in SEQ), mom, dec]
    ln = (x["ln_weight"], x["ln_bias"])
    outs = titans_fwd(*seq, W0, b0, W0, b0, S0, sb0, *ln, b, 1e-6, **options_kw(options))[:5]
    ref = reference_ttt_titans(*seq, W0, b0, *ln, mini_batch_size=b, **options_kw(options))
    assert_outputs_and_grads_close(outs, ref, [*x.values(), mom, dec],
                                   [*x, "momentum", "decay"], 1e-10)  # fmt: skip


@pytest.mark.parametrize("case", OPTION_CASES, ids=option_case_id)
def test_options_match_torch_backend(case):
    """reconstruction_target and output_residual (every combination; streamed with cuts inside
    mini-batches): o, the final state (params, momentum, current) and every gradient, momentum and
    decay included, equal one torch-backend call."""
    options, cuts = case
    x = make_inputs(1, 2, 19, 12, dtype=torch.float32, seed=76)
    mom, dec = make_titans(1, 2, 19, dtype=torch.float32, seed=76)
    assert_cpp_matches_torch_one_call(ttt_linear, x, cuts, extra={"momentum": mom, "decay": dec},
                                      mini_batch_size=8, **options_kw(options))  # fmt: skip


CASES = [
    # B, H, L, D, b, which of momentum / decay
    (2, 2, 32, 16, 16, "both"),
    (1, 2, 37, 16, 8, "both"),  # L not a multiple of b: the state is cut inside a mini-batch
    (2, 1, 20, 8, 4, "momentum"),
    (1, 2, 21, 8, 8, "decay"),
    (1, 2, 13, 12, None, "both"),  # the whole sequence one mini-batch
]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"B{c[0]}-H{c[1]}-L{c[2]}-D{c[3]}-b{c[4]}-{c[5]}" for c in CASES]
)
def test_matches_torch_backend(case):
    B, H, L, D, b, which = case
    x = make_inputs(B, H, L, D, dtype=torch.float32, seed=62)
    mom, dec = make_titans(B, H, L, dtype=torch.float32, seed=62)
    tit = {
        "momentum": mom if which != "decay" else None,
        "decay": dec if which != "momentum" else None,
    }
    kw = dict(mini_batch_size=b, output_final_state=True, **tit)
    o, st = ttt_linear(*x.values(), backend="cuda", **kw)
    ref, st_ref = ttt_linear(*x.values(), backend="torch", **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset
    for field in ("params", "momentum", "current"):
        want = getattr(st_ref, field)
        assert (getattr(st, field) is None) == (want is None), field
        for name in want or {}:
            torch.testing.assert_close(getattr(st, field)[name], want[name], rtol=1e-4, atol=1e-4)

    def loss(o, s):
        extra = s.momentum["W1"].square().sum() + s.params["b1"].sum()
        return (o * go).sum() + extra + (s.current["W1"].sum() if s.current is not None else 0)

    go = torch.randn_like(ref)
    inputs = [*x.values(), *(t for t in tit.values() if t is not None)]
    names = [*x, *(n for n, t in tit.items() if t is not None)]
    assert_grads_close(torch.autograd.grad(loss(o, st), inputs),
                  torch.autograd.grad(loss(ref, st_ref), inputs), names)  # fmt: skip


def test_one_token_at_a_time_matches_torch_backend_one_call():
    """Titans states cut inside mini-batches (params, current, momentum) resume in the fused op:
    13 tokens fed one by one (b = 4) equal one torch-backend call, outputs and gradients."""
    B, H, L, D, b = 1, 2, 13, 8, 4
    x = make_inputs(B, H, L, D, dtype=torch.float32, seed=63)
    mom, dec = make_titans(B, H, L, dtype=torch.float32, seed=63)
    outs, st = [], None
    for t in range(L):
        part = {**x, **{n: x[n][:, :, t : t + 1] for n in SEQ}}
        o, st = ttt_linear(*part.values(), mini_batch_size=b, momentum=mom[:, :, t : t + 1],
                           decay=dec[:, :, t : t + 1], backend="cuda", initial_state=st,
                           output_final_state=True)  # fmt: skip
        outs.append(o)
    o = torch.cat(outs, dim=2)
    ref, st_ref = ttt_linear(*x.values(), mini_batch_size=b, momentum=mom, decay=dec,
                             backend="torch", output_final_state=True)  # fmt: skip
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == 1
    torch.testing.assert_close(st.current["W1"], st_ref.current["W1"], rtol=1e-4, atol=1e-4)
    inputs = [*x.values(), mom, dec]
    got = torch.autograd.grad(o.square().sum() + st.momentum["b1"].sum(), inputs)
    want = torch.autograd.grad(ref.square().sum() + st_ref.momentum["b1"].sum(), inputs)
    assert_grads_close(got, want, [*x, "momentum", "decay"])


def _op_args(B=1, H=2, L=5, D=3, offset=1, seed=64):
    """titans_fwd's tensor arguments: a start inside a mini-batch (P != current, S != 0)."""
    x = make_inputs(B, H, L, D, seed=seed)
    mom, dec = make_titans(B, H, L, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape, s):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).requires_grad_()

    W0, b0, C0, cb0 = rnd(B, H, D, D, s=0.3), rnd(B, H, D, s=0.1), rnd(B, H, D, D, s=0.3), rnd(B, H, D, s=0.1)  # fmt: skip
    S0, sb0 = rnd(B, H, D, D, s=0.2), rnd(B, H, D, s=0.2)
    return (*(x[n] for n in SEQ), mom, dec, W0, b0, C0, cb0, S0, sb0, x["ln_weight"], x["ln_bias"])


@pytest.mark.parametrize(
    "offset,b,options",
    [(0, 2, OPTIONS[0]), (1, 3, OPTIONS[0]), (2, 3, OPTIONS[0]), (1, 3, ("value", False))],
    ids=["boundary", "offset1", "offset2", "offset1-target-value-no-residual"],
)
def test_gradcheck_finite_differences(offset, b, options):
    """The hand-written backward against finite differences (fp64) through o, the end weights and
    momentum and the stored per-segment start weights; momentum and decay included; also with both
    options off their defaults (target v, no output residual)."""
    args = _op_args(offset=offset)

    def f(*t):  # S_starts/sb_starts are not differentiable
        return titans_fwd(*t, b, 1e-6, offset, **options_kw(options))[:7]

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", [OPTIONS[0], ("value", False)], ids=options_id)
def test_block_schedule_equals_serial(monkeypatch, options):
    """The Titans chain run as a CUDA block runs it (16 threads + barriers) equals the serial run
    bit for bit, forward and backward, from a state cut inside a mini-batch (with the options at
    their defaults and both off them)."""
    x = make_inputs(1, 2, 19, 8, dtype=torch.float32, seed=65)
    mom, dec = make_titans(1, 2, 19, dtype=torch.float32, seed=65)
    args = [t.detach().float().requires_grad_() for t in _op_args(L=19, D=8, offset=3)[6:12]]

    def run():
        outs = titans_fwd(*(x[n] for n in SEQ), mom, dec, *args, x["ln_weight"], x["ln_bias"], 8,
                          1e-6, 3, **options_kw(options))  # fmt: skip
        loss = outs[0].square().sum() + outs[1].sum() + outs[3].sum() + outs[5].sum()
        ins = [*(x[n] for n in (*SEQ, "ln_weight", "ln_bias")), mom, dec, *args]
        return (*outs[:7], *torch.autograd.grad(loss, ins))

    assert_block_schedule_equals_serial(monkeypatch, run)


def test_opcheck():
    args = _op_args(B=2, L=7, offset=1)
    torch.library.opcheck(titans_fwd, (*args, 3, 1e-6, 1))
    with torch.no_grad():
        outs = titans_fwd(*args, 3, 1e-6, 1)
    d_end = [torch.randn_like(t) for t in outs[1:5]]
    saved = [t.detach() for t in (*args[:6], args[8], args[9])]
    rest = (*outs[5:], *(t.detach() for t in args[12:]), 3, 1e-6, 1)
    for d_starts in ((None, None), (torch.randn_like(outs[5]), torch.randn_like(outs[6]))):
        torch.library.opcheck(titans_bwd, (torch.randn_like(outs[0]), *d_end, *d_starts, *saved,
                                           *rest), test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_torch_compile_traces_the_custom_op_fullgraph():
    """aot_eager: dynamo + AOT autograd over ttt::titans_fwd's fake impl and autograd."""
    x = make_inputs(1, 2, 12, 8, dtype=torch.float32, seed=66)
    mom, dec = make_titans(1, 2, 12, dtype=torch.float32, seed=66)

    def f(*a):
        o, st = fused_ttt_linear(*a, mini_batch_size=4, momentum=mom, decay=dec,
                                 output_final_state=True)  # fmt: skip
        return o, st.momentum["W1"]

    o, S = torch.compile(f, backend="aot_eager", fullgraph=True)(*x.values())
    ref, S_ref = f(*x.values())
    torch.testing.assert_close((o, S), (ref, S_ref), rtol=0, atol=0)
    g = torch.autograd.grad(o.sum() + S.sum(), [x["q"], mom])
    g_ref = torch.autograd.grad(ref.sum() + S_ref.sum(), [x["q"], mom])
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
