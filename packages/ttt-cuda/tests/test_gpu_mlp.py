"""Device tests of the CUDA TTT-MLP kernels (D = 64, F = 256; skipped without a GPU,
TTT_REQUIRE_GPU=1 makes that a failure).

References: ttt-core's torch backend on the same GPU (fp32), the same backend's own low-precision
run for the bf16/fp16 accuracy rule, eager runs for the CUDA-graph and determinism checks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from gpu_checks import (
    assert_deterministic,
    assert_graph_replay_matches_eager,
    assert_side_stream_matches_default,
    output_grads,
)
from ttt_cuda_reference import make_mlp_inputs

from ttt_core import ttt_mlp

pytestmark = pytest.mark.gpu

CASES = [
    # B, H, L, b, causal, token_scale (D = 64, F = 256)
    (2, 2, 64, 16, True, "mean"),
    (1, 2, 70, 32, True, "sum"),  # L not a multiple of b
    (1, 1, 40, 8, True, "vector"),
    (2, 2, 48, 16, False, "mean"),
]


def _id(c):
    B, H, L, b, causal, ts = c
    return f"B{B}-H{H}-L{L}-D64-F256-b{b}-{'causal' if causal else 'noncausal'}-{ts}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_fp32_matches_torch_backend(cuda_device, case):
    B, H, L, b, causal, ts = case
    x = make_mlp_inputs(B, H, L, 64, dtype=torch.float32, device=cuda_device, seed=51)
    token_scale = ts
    if ts == "vector":
        token_scale = torch.linspace(1.0, 0.2, b, device=cuda_device).requires_grad_()
    kw = dict(mini_batch_size=b, causal=causal, token_scale=token_scale)
    o, _ = ttt_mlp(*x.values(), backend="cuda", **kw)
    ref, _ = ttt_mlp(*x.values(), backend="torch", **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    inputs = list(x.values()) + ([token_scale] if ts == "vector" else [])
    go = torch.randn_like(ref)
    for name, g, w in zip(
        [*x, "token_scale"], output_grads(o, inputs, go), output_grads(ref, inputs, go)
    ):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_accuracy_rule(cuda_device, dtype):
    """Error vs the fp32 reference at most 2x the torch backend's own error in the same dtype
    (+ one rounding of the largest value): both read the same rounded inputs and keep fp32
    state, so the kernel may only add the rounding of its outputs, not a worse accumulation."""
    x32 = make_mlp_inputs(2, 2, 80, 64, dtype=torch.float32, device=cuda_device, seed=52)
    xlo = {n: t.detach().to(dtype).requires_grad_() for n, t in x32.items()}
    ref, _ = ttt_mlp(*x32.values(), backend="torch")
    o_torch, _ = ttt_mlp(*xlo.values(), backend="torch")
    o_cuda, _ = ttt_mlp(*xlo.values(), backend="cuda")
    assert o_cuda.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    err_torch = (o_torch.float() - ref).abs().max().item()
    err_cuda = (o_cuda.float() - ref).abs().max().item()
    assert err_cuda <= 2 * err_torch + ulp, (err_cuda, err_torch)
    go = torch.randn_like(ref)
    g_ref = output_grads(ref, list(x32.values()), go)
    g_cuda = output_grads(o_cuda, list(xlo.values()), go)
    g_torch = output_grads(o_torch, list(xlo.values()), go)
    for name, g_c, g_t, g_r in zip(x32, g_cuda, g_torch, g_ref):
        floor = torch.finfo(dtype).eps * g_r.abs().max().item()
        e_c = (g_c.float() - g_r).abs().max().item()
        e_t = (g_t.float() - g_r).abs().max().item()
        assert e_c <= 2 * e_t + floor, (name, e_c, e_t)


def test_auto_dispatch_state_and_fallback(cuda_device):
    """auto runs the kernels (no warning) for D = 64, F = 256; the final state (cut inside a
    mini-batch) equals the torch backend's; another F falls back with a warning naming why."""
    x = make_mlp_inputs(1, 2, 37, 64, dtype=torch.float32, device=cuda_device, seed=53,
                        requires_grad=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, st = ttt_mlp(*x.values(), backend="auto", output_final_state=True)
    ref, st_ref = ttt_mlp(*x.values(), backend="torch", output_final_state=True)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == 37 % 16
    for name in ("W1", "b1", "W2", "b2"):
        torch.testing.assert_close(st.grad_sum[name], st_ref.grad_sum[name], rtol=1e-4, atol=1e-4)
    wide = make_mlp_inputs(1, 2, 16, 64, F=128, dtype=torch.float32, device=cuda_device, seed=54,
                           requires_grad=False)  # fmt: skip
    with pytest.warns(UserWarning, match="D = 64 and F = 256"):
        ttt_mlp(*wide.values(), backend="auto")


def test_streaming_one_token_at_a_time(cuda_device):
    """States cut inside mini-batches (offset > 0, grad_sum of both layers) resume in the kernels:
    19 tokens fed one by one (b = 16) equal one torch-backend call (fp32), outputs and gradients."""
    x = make_mlp_inputs(1, 2, 19, 64, dtype=torch.float32, device=cuda_device, seed=58)
    outs, st = [], None
    for t in range(19):
        part = {**x, **{n: x[n][:, :, t : t + 1] for n in ("q", "k", "v", "eta")}}
        o, st = ttt_mlp(*part.values(), backend="cuda", initial_state=st, output_final_state=True)
        outs.append(o)
    o = torch.cat(outs, dim=2)
    ref, st_ref = ttt_mlp(*x.values(), backend="torch", output_final_state=True)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == 3
    go = torch.randn_like(ref)
    inputs = list(x.values())
    for name, g, w in zip(x, output_grads(o, inputs, go), output_grads(ref, inputs, go)):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


def test_deterministic(cuda_device):
    x = make_mlp_inputs(2, 2, 48, 64, dtype=torch.bfloat16, device=cuda_device, seed=55)
    assert_deterministic(lambda *a: ttt_mlp(*a, backend="cuda"), x)


def test_cuda_graph_capture(cuda_device):
    """Forward + backward captured in a CUDA graph replay like eager on fresh inputs."""
    kw = dict(dtype=torch.float32, device=cuda_device, requires_grad=False)
    assert_graph_replay_matches_eager(
        lambda *a: ttt_mlp(*a, backend="cuda"),
        make_mlp_inputs(1, 2, 40, 64, seed=56, **kw),
        make_mlp_inputs(1, 2, 40, 64, seed=57, **kw),
    )


def test_side_stream_matches_default_stream(cuda_device):
    x = make_mlp_inputs(1, 2, 40, 64, dtype=torch.float32, device=cuda_device, seed=59)
    assert_side_stream_matches_default(lambda *a: ttt_mlp(*a, backend="cuda"), x)


def test_direct_call_takes_F_from_W1(cuda_device):
    """ttt_cuda.fused_ttt_mlp on CUDA tensors without initial_state reads F from W1 (it used to
    refuse with "F = None"); outputs and gradients equal ttt-core's torch backend."""
    from ttt_cuda import fused_ttt_mlp

    x = make_mlp_inputs(1, 2, 37, 64, dtype=torch.float32, device=cuda_device, seed=60)
    o, _ = fused_ttt_mlp(*x.values(), mini_batch_size=16)
    ref, _ = ttt_mlp(*x.values(), mini_batch_size=16, backend="torch")
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(ref)
    for name, g, w in zip(x, output_grads(o, x, go), output_grads(ref, x, go)):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")
    wide = make_mlp_inputs(1, 2, 16, 64, F=128, dtype=torch.float32, device=cuda_device, seed=61)
    with pytest.raises(ValueError, match="F = 128"):
        fused_ttt_mlp(*wide.values())
