"""TTT-MLP in the Titans form (momentum/decay) through the fused op's C++ CPU path: against the
plain fp64 per-token reference (1e-10), ttt-core's torch backend in fp64 (1e-10) and fp32 (rtol
1e-4): outputs, the final state (params, momentum, current) and every gradient, momentum and decay
included; odd sizes (D not a multiple of 16, F = 4D and another F, L not a multiple of the
mini-batch, mini-batches longer than the chain's blocks, the whole sequence one mini-batch);
streaming cuts inside mini-batches; finite differences of the op (gradcheck, started inside a
mini-batch); the CUDA block schedule; and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from ttt_cuda_reference import (
    OPTION_CASES,
    OPTIONS,
    assert_block_schedule_equals_serial,
    assert_cpp_matches_torch_one_call,
    assert_grads_close,
    assert_outputs_and_grads_close,
    make_mlp_inputs,
    make_titans,
    mlp_model,
    option_case_id,
    options_id,
    options_kw,
    reference_titans,
)

from ttt_core import ttt_mlp
from ttt_cuda import fused_ttt_mlp, mlp_unsupported_reason
from ttt_cuda.ops.titans_mlp import titans_mlp_fwd

SEQ = ("q", "k", "v", "eta")
WEIGHTS = ("W1", "b1", "W2", "b2")


def _start(x, B):
    """The start weights per chain (B, H, ...), biases as the op takes them (B, H, n)."""
    return [x[n].unsqueeze(0).expand(B, *x[n].shape).flatten(2) if n.startswith("b")
            else x[n].unsqueeze(0).expand(B, *x[n].shape) for n in WEIGHTS]  # fmt: skip


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_matches_fp64_reference(options):
    """o, the end weights and momentum (the op's outputs) and every gradient, momentum and decay
    included, against the per-token reference; both options in every combination (B1-H2-L10-D5-F7,
    b = 4: the last mini-batch is cut)."""
    B, H, L, D, F, b = 1, 2, 10, 5, 7, 4
    x = make_mlp_inputs(B, H, L, D, F=F, seed=81)
    mom, dec = make_titans(B, H, L, seed=81)
    P = _start(x, B)
    S = [torch.zeros_like(t) for t in P]
    seq, ln = [*(x[n] for n in SEQ), mom, dec], (x["ln_weight"], x["ln_bias"])
    outs = titans_mlp_fwd(*seq, *P, *P, *S, *ln, b, 1e-6, **options_kw(options))[:9]
    params0 = {n: x[n].unsqueeze(0).expand(B, *x[n].shape) for n in WEIGHTS}
    o, W_end, S_end = reference_titans(mlp_model, *seq, params0, *ln, mini_batch_size=b,
                                       **options_kw(options))  # fmt: skip
    flat = lambda d: [d[n].flatten(2) if n.startswith("b") else d[n] for n in WEIGHTS]
    assert_outputs_and_grads_close(outs, (o, *flat(W_end), *flat(S_end)), [*x.values(), mom, dec],
                                   [*x, "momentum", "decay"], 1e-10)  # fmt: skip


CASES = [
    # B, H, L, D, F, b, which of momentum / decay
    (2, 2, 37, 12, 48, 16, "both"),  # D not a multiple of 16, F = 4D, L % b != 0
    (1, 2, 45, 10, 23, 8, "both"),  # another F
    (1, 2, 70, 8, 32, 64, "both"),  # a mini-batch longer than the chain's blocks (32)
    (1, 1, 45, 6, 24, None, "both"),  # the whole sequence one mini-batch (two blocks)
    (2, 1, 20, 8, 32, 4, "momentum"),
    (1, 2, 21, 8, 32, 8, "decay"),
]


def _id(c):
    return "B{}-H{}-L{}-D{}-F{}-b{}-{}".format(*c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_torch_backend(case, dtype):
    """o, the final state (params, momentum, current) and every gradient against ttt-core's torch
    backend in the same dtype: fp64 at 1e-10, fp32 at rtol 1e-4."""
    B, H, L, D, F, b, which = case
    x = make_mlp_inputs(B, H, L, D, F=F, dtype=dtype, seed=82)
    mom, dec = make_titans(B, H, L, dtype=dtype, seed=82)
    tit = {"momentum": mom if which != "decay" else None,
           "decay": dec if which != "momentum" else None}  # fmt: skip
    kw = dict(mini_batch_size=b, output_final_state=True, **tit)
    o, st = ttt_mlp(*x.values(), backend="cpp", **kw)
    ref, st_ref = ttt_mlp(*x.values(), backend="torch", **kw)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(o, ref, rtol=tol, atol=tol)
    assert st.offset == st_ref.offset
    for field in ("params", "momentum", "current"):
        got, want = getattr(st, field), getattr(st_ref, field)
        assert (got is None) == (want is None), field
        for name in want or {}:
            torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol)
    go = torch.randn_like(ref)
    inputs = [*x.values(), *(t for t in tit.values() if t is not None)]
    names = [*x, *(n for n, t in tit.items() if t is not None)]

    def loss(o, s):
        return (o * go).sum() + sum(t.square().sum() for t in s.tensors())

    got = torch.autograd.grad(loss(o, st), inputs)
    want = torch.autograd.grad(loss(ref, st_ref), inputs)
    if dtype == torch.float32:
        assert_grads_close(got, want, names)
    else:
        for name, g, w in zip(names, got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9,
                                       msg=lambda m, n=name: f"d{n}: {m}")  # fmt: skip


@pytest.mark.parametrize("case", OPTION_CASES, ids=option_case_id)
def test_streaming_and_options_match_torch_backend(case):
    """Both options in every combination, and a stream cut at tokens inside mini-batches (5, 13;
    b = 8): o, the final state and every gradient, momentum and decay included, equal one
    torch-backend call (fp32)."""
    options, cuts = case
    x = make_mlp_inputs(1, 2, 19, 12, F=20, dtype=torch.float32, seed=83)
    mom, dec = make_titans(1, 2, 19, dtype=torch.float32, seed=83)
    assert_cpp_matches_torch_one_call(ttt_mlp, x, cuts, extra={"momentum": mom, "decay": dec},
                                      mini_batch_size=8, **options_kw(options))  # fmt: skip


def test_cut_inside_a_mini_batch_equals_the_whole_run():
    """The fused path itself: 45 tokens cut at 3, 21 and 40 (b = 16; the middle call's mini-batch
    spans two blocks of its own) give o and the final state of one fused call (fp64, 1e-12)."""
    B, H, L, D, b = 1, 2, 45, 8, 16
    x = make_mlp_inputs(B, H, L, D, seed=84, requires_grad=False)
    mom, dec = make_titans(B, H, L, seed=84, requires_grad=False)
    whole, st_whole = ttt_mlp(*x.values(), mini_batch_size=b, momentum=mom, decay=dec,
                              backend="cpp", output_final_state=True)  # fmt: skip
    outs, st = [], None
    for t0, t1 in ((0, 3), (3, 21), (21, 40), (40, L)):
        part = {**x, **{n: x[n][:, :, t0:t1] for n in SEQ}}
        o, st = ttt_mlp(*part.values(), mini_batch_size=b, momentum=mom[:, :, t0:t1],
                        decay=dec[:, :, t0:t1], backend="cpp", initial_state=st,
                        output_final_state=True)  # fmt: skip
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=1e-12, atol=1e-12)
    for got, want in zip(st.tensors(), st_whole.tensors()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _op_args(B=1, H=2, L=5, D=3, F=4, offset=1, seed=85):
    """titans_mlp_fwd's tensor arguments: a start inside a mini-batch (P != current, S != 0)."""
    x = make_mlp_inputs(B, H, L, D, F=F, seed=seed)
    mom, dec = make_titans(B, H, L, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(t, s):
        return (t.detach() + s * torch.randn(t.shape, generator=g, dtype=t.dtype)).requires_grad_()

    P = [rnd(t, 0.0) for t in _start(x, B)]
    C = [rnd(t, 0.2) for t in P]
    S = [rnd(torch.zeros_like(t), 0.2) for t in P]
    return (*(x[n] for n in SEQ), mom, dec, *P, *C, *S, x["ln_weight"], x["ln_bias"])


@pytest.mark.parametrize(
    "offset,b,options",
    [(0, 2, OPTIONS[0]), (1, 3, OPTIONS[0]), (2, 4, ("value", False))],
    ids=["boundary", "offset1", "offset2-target-value-no-residual"],
)
def test_gradcheck_finite_differences(offset, b, options):
    """The hand-written backward against finite differences (fp64) through o, the end weights and
    momentum and the stored per-block P; every input, the start state's P, W and S included."""
    args = _op_args(offset=offset)

    def f(*t):  # the starts of S and W are not differentiable
        return titans_mlp_fwd(*t, b, 1e-6, offset, **options_kw(options))[:13]

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_block_schedule_equals_serial(monkeypatch):
    """The chain run as a CUDA block runs it (16 threads + barriers) equals the serial run bit for
    bit, forward and backward, from a state cut inside a mini-batch."""
    args = [t.detach().float().requires_grad_() for t in _op_args(L=11, D=5, F=9, offset=3)]

    def run():
        outs = titans_mlp_fwd(*args, 8, 1e-6, 3)
        loss = outs[0].square().sum() + outs[1].sum() + outs[6].sum() + outs[9].sum()
        return (*outs, *torch.autograd.grad(loss, args))

    assert_block_schedule_equals_serial(monkeypatch, run)


def test_opcheck():
    args = _op_args(B=2, L=7, offset=1)
    torch.library.opcheck(titans_mlp_fwd, (*args, 3, 1e-6, 1),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))  # fmt: skip


def test_refusals_name_the_reason():
    """The CUDA kernels do not fuse it (the reason says so); a call without causal, or with a
    momentum of the wrong length, raises a ValueError that names the argument."""
    x = make_mlp_inputs(1, 2, 6, 4, dtype=torch.float32, seed=86)
    mom, dec = make_titans(1, 2, 6, dtype=torch.float32, seed=86)
    with FakeTensorMode():  # a CUDA tensor's metadata, no GPU needed
        on_cuda = torch.empty(1, 2, 6, 4, device="cuda")
    assert "has no CUDA kernel" in mlp_unsupported_reason(on_cuda, momentum=mom)
    assert mlp_unsupported_reason(x["q"], momentum=mom) is None  # the C++ CPU path runs it
    with pytest.raises(ValueError, match="causal"):
        fused_ttt_mlp(*x.values(), causal=False, momentum=mom, decay=dec)
    with pytest.raises(ValueError, match="momentum"):
        fused_ttt_mlp(*x.values(), momentum=mom[:, :, :5], decay=dec)
