"""torch.library registration (opcheck: schema, fake tensors, autograd, AOT dispatch), torch.compile
tracing, the built extension, and input validation."""

from __future__ import annotations

import os

import pytest
import torch
from ttt_cuda_reference import make_inputs, make_mlp_inputs

import ttt_cuda
from ttt_cuda import fused_ttt_linear, fused_ttt_mlp
from ttt_cuda._ext import extension
from ttt_cuda.ops import linear_bwd, linear_fwd


def _op_args(dtype=torch.float32, L=10, b=4, causal=True, seed=0):
    B, H, D = 2, 2, 8
    x = make_inputs(B, H, L, D, dtype=dtype, seed=seed)
    W0 = x["W1"].detach().unsqueeze(0).repeat(B, 1, 1, 1).requires_grad_()
    b0 = x["b1"].detach().reshape(1, H, D).repeat(B, 1, 1).requires_grad_()
    scale = (1.0 / torch.arange(1, b + 1, dtype=dtype)).requires_grad_()
    return (x["q"], x["k"], x["v"], x["eta"], W0, b0, x["ln_weight"], x["ln_bias"], scale, b,
            causal, 1e-6)  # fmt: skip


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_opcheck_forward(causal):
    torch.library.opcheck(linear_fwd, _op_args(causal=causal))
    if causal:  # the cut-state variant (L = 10 is not a multiple of b = 4)
        torch.library.opcheck(linear_fwd, (*_op_args(causal=causal), True))
        # both options off their defaults, as keywords: the schema and the fake impl take them
        # (their gradients are tested against the references in test_linear_cpu.py)
        options = {"reconstruction_target": "value", "output_residual": False}
        torch.library.opcheck(linear_fwd, _op_args(causal=causal), options,
                              test_utils=("test_schema", "test_faketensor"))  # fmt: skip


def test_opcheck_backward():
    args = _op_args()
    q, k, v, eta, _, _, lnw, lnb, scale, b, causal, eps = args
    with torch.no_grad():
        o, W_end, b_end, W_starts, b_starts = linear_fwd(*args)
    grads = (torch.randn_like(o), torch.randn_like(W_end), torch.randn_like(b_end))
    saved = tuple(t.detach() for t in (q, k, v, eta))
    ln_scale = tuple(t.detach() for t in (lnw, lnb, scale))
    for starts_grads in ((None, None), (torch.randn_like(W_starts), torch.randn_like(b_starts))):
        bwd_args = (*grads, *starts_grads, *saved, W_starts, b_starts, *ln_scale, b, causal, eps)
        torch.library.opcheck(linear_bwd, bwd_args)


def test_torch_compile_traces_the_custom_op_fullgraph():
    """aot_eager runs dynamo + AOT autograd over the fake impls without a C++ toolchain."""
    x = make_inputs(1, 2, 12, 8, dtype=torch.float32, seed=1)

    def f(q, k, v, eta, W1, b1, lnw, lnb):
        o, _ = fused_ttt_linear(q, k, v, eta, W1, b1, lnw, lnb, mini_batch_size=4)
        return o

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    o = compiled(*x.values())
    ref = f(*x.values())
    torch.testing.assert_close(o, ref, rtol=0, atol=0)
    g = torch.autograd.grad(o.sum(), x["q"])[0]
    g_ref = torch.autograd.grad(ref.sum(), x["q"])[0]
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)


def test_extension_reports_its_build():
    C = extension()
    assert isinstance(C.WITH_CUDA, bool) and ttt_cuda.built_with_cuda() == C.WITH_CUDA
    if C.WITH_CUDA:  # the nvcc build carries TTT_CUDA_ARCHITECTURES (default sm_80 + sm_90)
        want = os.environ.get("TTT_CUDA_ARCHITECTURES", "80-real;90-real;90-virtual")
        assert all(a.split("-")[0] in C.CUDA_ARCHITECTURES for a in want.split(";"))
    fwd = C.linear_workspace_elems(64, 16, False)
    bwd = C.linear_workspace_elems(64, 16, True)
    assert 64 * 64 + 6 * 16 * 64 <= fwd < bwd  # W plus six [b, D] tiles at least; bwd needs more
    mlp = C.mlp_workspace_elems(64, 256, 16, False)
    assert 2 * 64 * 256 + 6 * 16 * 256 <= mlp < C.mlp_workspace_elems(64, 256, 16, True)
    titans = C.titans_workspace_elems(64, 16, False)  # P, current, momentum + tiles
    assert 3 * 64 * 64 + 8 * 16 * 64 <= titans < C.titans_workspace_elems(64, 16, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_entry_point_without_gpu_says_why():
    C = extension()
    p = C.LinearParams()
    p.D = 64
    mp, tp = C.MLPParams(), C.TitansParams()
    mp.D, mp.F, tp.D = 64, 128, 60  # shapes the kernels do not take: rejected before any launch
    if C.WITH_CUDA:
        p.D = 60
        with pytest.raises(RuntimeError, match="head dim must be 64 or 128"):
            C.linear_fwd_cuda(p)
        with pytest.raises(RuntimeError, match="D = 64 and F = 256"):
            C.mlp_bwd_cuda(mp)
        with pytest.raises(RuntimeError, match="head dim must be 64 or 128"):
            C.titans_fwd_cuda(tp)
    else:
        for fn, params in ((C.linear_fwd_cuda, p), (C.mlp_bwd_cuda, mp), (C.titans_fwd_cuda, tp)):
            with pytest.raises(RuntimeError, match="built without CUDA"):
                fn(params)


def test_cpu_entry_point_rejects_bad_dtype():
    p = extension().LinearParams()
    p.B, p.H, p.L, p.D, p.dtype = 1, 1, 4, 8, extension().DType.float16
    with pytest.raises(ValueError, match="float32 or float64"):
        extension().linear_fwd_cpu(p, 1)


BAD = [
    ("q", lambda x: {**x, "q": x["q"][0]}, ValueError, r"q must be 4-D \[B, H, L, D\]"),
    ("k", lambda x: {**x, "k": x["k"][:, :, :3]}, ValueError, "k must have shape"),
    ("eta", lambda x: {**x, "eta": x["eta"][..., :3]}, ValueError, "eta must have shape"),
    ("W1", lambda x: {**x, "W1": x["W1"][:, :3]}, ValueError, "W1 must have shape"),
    ("ln_weight", lambda x: {**x, "ln_weight": x["ln_weight"][0]}, ValueError, "ln_weight"),
    (
        "v-dtype",
        lambda x: {**x, "v": x["v"].double()},
        TypeError,
        "v has dtype torch.float64 but q has torch.float32",
    ),
    ("q-type", lambda x: {**x, "q": x["q"].tolist()}, TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(bad):
    _, edit, err, match = bad
    x = make_inputs(1, 2, 8, 4, dtype=torch.float32, requires_grad=False)
    with pytest.raises(err, match=match):
        fused_ttt_linear(**edit(x))


def test_bad_keywords():
    x = make_inputs(1, 2, 8, 4, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="mini_batch_size"):
        fused_ttt_linear(**x, mini_batch_size=0)
    with pytest.raises(ValueError, match="token_scale"):
        fused_ttt_linear(**x, token_scale="median")
    with pytest.raises(ValueError, match=r"token_scale must have shape \[mini_batch_size=4\]"):
        fused_ttt_linear(**x, mini_batch_size=4, token_scale=torch.ones(3))
    with pytest.raises(ValueError, match="non-causal TTT cannot stream"):
        fused_ttt_linear(**x, causal=False, output_final_state=True)


@pytest.mark.parametrize("fused", [fused_ttt_linear, fused_ttt_mlp], ids=["linear", "mlp"])
@pytest.mark.parametrize("cut", [4, 6], ids=["at-boundary", "inside-mini-batch"])
def test_non_causal_call_refuses_a_streaming_state(fused, cut):
    """As ``ttt_linear``: a non-causal call given an initial_state raises (DESIGN: non-causal TTT
    cannot stream), whether the state sits at a mini-batch boundary or inside one."""
    x = (make_mlp_inputs if fused is fused_ttt_mlp else make_inputs)(
        1, 2, 8, 4, dtype=torch.float32, requires_grad=False
    )
    head = {**x, **{n: x[n][:, :, :cut] for n in ("q", "k", "v", "eta")}}
    _, state = fused(**head, mini_batch_size=4, output_final_state=True)
    assert state.offset == cut % 4
    with pytest.raises(ValueError, match="non-causal TTT cannot stream"):
        fused(**x, mini_batch_size=4, causal=False, initial_state=state)
