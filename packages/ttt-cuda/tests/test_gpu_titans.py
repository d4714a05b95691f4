"""Device tests of the CUDA Titans-form TTT-Linear kernels (momentum/decay; D 64/128; skipped
without a GPU, TTT_REQUIRE_GPU=1 makes that a failure). References: ttt-core's torch backend on
the same GPU (fp32; its own bf16/fp16 run for the accuracy rule), eager runs for the CUDA graph,
determinism and the side stream. Sanitizer runs: test_gpu_sanitizers.py."""

from __future__ import annotations

import pytest
import torch
from gpu_checks import (
    assert_deterministic,
    assert_graph_replay_matches_eager,
    assert_side_stream_matches_default,
    output_grads,
)
from ttt_cuda_reference import make_inputs, make_titans

from ttt_core import ttt_linear

pytestmark = pytest.mark.gpu

CASES = [
    # B, H, L, D, b
    (2, 2, 64, 64, 16),
    (1, 2, 70, 64, 32),
    (1, 2, 48, 128, 16),
    (1, 1, 96, 64, 64),  # forward scratch exactly the opt-in shared-memory limit of sm_90 (227 KB)
]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"B{c[0]}-H{c[1]}-L{c[2]}-D{c[3]}-b{c[4]}" for c in CASES]
)
def test_fp32_matches_torch_backend(cuda_device, case):
    B, H, L, D, b = case
    x = make_inputs(B, H, L, D, dtype=torch.float32, device=cuda_device, seed=71)
    mom, dec = (t.detach().to(cuda_device).requires_grad_() for t in make_titans(B, H, L, seed=71))
    kw = dict(mini_batch_size=b, momentum=mom.float(), decay=dec.float(), output_final_state=True)
    o, st = ttt_linear(*x.values(), backend="cuda", **kw)
    ref, st_ref = ttt_linear(*x.values(), backend="torch", **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.momentum["W1"], st_ref.momentum["W1"], rtol=1e-4, atol=1e-4)
    inputs = [*x.values(), mom, dec]
    go = torch.randn_like(ref)
    for name, g, w in zip(
        [*x, "momentum", "decay"], output_grads(o, inputs, go), output_grads(ref, inputs, go)
    ):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_low_precision_accuracy_rule(cuda_device, dtype, D):
    """Error vs the fp32 reference at most 2x the torch backend's own error in the same dtype (+ one
    rounding of the largest value), outputs and every gradient: same rounded inputs, fp32 state."""
    x32 = make_inputs(2, 2, 64, D, dtype=torch.float32, device=cuda_device, seed=72)
    md32 = [
        t.detach().to(cuda_device, torch.float32).requires_grad_()
        for t in make_titans(2, 2, 64, seed=72)
    ]
    xlo = {n: t.detach().to(dtype).requires_grad_() for n, t in x32.items()}
    mdlo = [t.detach().to(dtype).requires_grad_() for t in md32]
    ref, _ = ttt_linear(*x32.values(), momentum=md32[0], decay=md32[1], backend="torch")
    o_torch, _ = ttt_linear(*xlo.values(), momentum=mdlo[0], decay=mdlo[1], backend="torch")
    o_cuda, _ = ttt_linear(*xlo.values(), momentum=mdlo[0], decay=mdlo[1], backend="cuda")
    assert o_cuda.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    err_torch = (o_torch.float() - ref).abs().max().item()
    err_cuda = (o_cuda.float() - ref).abs().max().item()
    assert err_cuda <= 2 * err_torch + ulp, (err_cuda, err_torch)
    go = torch.randn_like(ref)
    names = [*x32, "momentum", "decay"]
    g_ref = output_grads(ref, [*x32.values(), *md32], go)
    g_cuda = output_grads(o_cuda, [*xlo.values(), *mdlo], go)
    g_torch = output_grads(o_torch, [*xlo.values(), *mdlo], go)
    for name, g_c, g_t, g_r in zip(names, g_cuda, g_torch, g_ref):
        floor = torch.finfo(dtype).eps * g_r.abs().max().item()
        e_c = (g_c.float() - g_r).abs().max().item()
        e_t = (g_t.float() - g_r).abs().max().item()
        assert e_c <= 2 * e_t + floor, (name, e_c, e_t)


def _titans_case(B, L, seed, dtype):
    """Inputs on the GPU (H = 2, D = 64) and a run(*inputs) of the CUDA Titans op with fixed fp32
    momentum/decay."""
    x = make_inputs(B, 2, L, 64, dtype=dtype, device="cuda", seed=seed)
    titans = make_titans(B, 2, L, seed=seed, requires_grad=False)
    mom, dec = (t.to("cuda", torch.float32) for t in titans)
    return x, lambda *a: ttt_linear(*a, momentum=mom, decay=dec, backend="cuda")


def test_deterministic(cuda_device):
    x, run = _titans_case(2, 64, seed=76, dtype=torch.bfloat16)
    assert_deterministic(run, x)


def test_side_stream_matches_default_stream(cuda_device):
    x, run = _titans_case(1, 40, seed=77, dtype=torch.float32)
    assert_side_stream_matches_default(run, x)


def test_streaming_one_token_at_a_time(cuda_device):
    x = make_inputs(1, 2, 19, 64, dtype=torch.float32, device=cuda_device, seed=73, requires_grad=False)  # fmt: skip
    mom, dec = (
        t.to(cuda_device, torch.float32)
        for t in make_titans(1, 2, 19, seed=73, requires_grad=False)
    )
    outs, st = [], None
    for t in range(19):
        part = {**x, **{n: x[n][:, :, t : t + 1] for n in ("q", "k", "v", "eta")}}
        o, st = ttt_linear(*part.values(), momentum=mom[:, :, t : t + 1], decay=dec[:, :, t : t + 1],
                           backend="cuda", initial_state=st, output_final_state=True)  # fmt: skip
        outs.append(o)
    ref, _ = ttt_linear(*x.values(), momentum=mom, decay=dec, backend="torch")
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=1e-4, atol=1e-4)


def test_cuda_graph_capture(cuda_device):
    kw = dict(dtype=torch.float32, device=cuda_device, requires_grad=False)
    mom, dec = (
        t.to(cuda_device, torch.float32)
        for t in make_titans(1, 2, 40, seed=74, requires_grad=False)
    )
    assert_graph_replay_matches_eager(
        lambda *a: ttt_linear(*a, momentum=mom, decay=dec, backend="cuda"),
        make_inputs(1, 2, 40, 64, seed=74, **kw),
        make_inputs(1, 2, 40, 64, seed=75, **kw),
    )
