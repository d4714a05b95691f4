"""Device tests of the CUDA kernels (skipped without a GPU; TTT_REQUIRE_GPU=1 makes that a failure).

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
from ttt_cuda_reference import make_inputs

from ttt_core import ttt_linear

pytestmark = pytest.mark.gpu

CASES = [
    # B, H, L, D, b, causal
    (2, 3, 64, 64, 16, True),
    (2, 2, 100, 64, 32, True),  # L not a multiple of b
    (1, 2, 128, 64, 64, True),  # scratch of the backward in global memory
    (2, 2, 80, 128, 16, True),
    (1, 2, 96, 128, 32, False),
    (2, 2, 48, 64, 16, False),
    (1, 2, 100, 128, 48, True),  # forward scratch in global memory too (D=128, b=48: 243 KB)
]


def _id(c):
    B, H, L, D, b, causal = c
    return f"B{B}-H{H}-L{L}-D{D}-b{b}-{'causal' if causal else 'noncausal'}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_fp32_matches_torch_backend(cuda_device, case):
    B, H, L, D, b, causal = case
    x = make_inputs(B, H, L, D, dtype=torch.float32, device=cuda_device, seed=21)
    kw = dict(mini_batch_size=b, causal=causal)
    o, _ = ttt_linear(*x.values(), backend="cuda", **kw)
    ref, _ = ttt_linear(*x.values(), backend="torch", **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(ref)
    for name, g, w in zip(x, output_grads(o, x, go), output_grads(ref, x, go)):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
def test_low_precision_accuracy_rule(cuda_device, dtype, D):
    """Error vs the fp32 reference at most 2x the torch backend's own error in the same dtype.

    Both read the same rounded inputs and keep fp32 state, so their errors come from rounding
    o (and the gradients) to the dtype; the floor is one rounding of the largest output.
    """
    x32 = make_inputs(2, 2, 96, D, dtype=torch.float32, device=cuda_device, seed=22)
    xlo = {n: t.detach().to(dtype).requires_grad_() for n, t in x32.items()}
    ref, _ = ttt_linear(*x32.values(), backend="torch")
    o_torch, _ = ttt_linear(*xlo.values(), backend="torch")
    o_cuda, _ = ttt_linear(*xlo.values(), backend="cuda")
    assert o_cuda.dtype == dtype
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    err_torch = (o_torch.float() - ref).abs().max().item()
    err_cuda = (o_cuda.float() - ref).abs().max().item()
    assert err_cuda <= 2 * err_torch + ulp, (err_cuda, err_torch)
    go = torch.randn_like(ref)
    g_ref = output_grads(ref, x32, go)
    for name, g_c, g_t, g_r in zip(
        x32, output_grads(o_cuda, xlo, go), output_grads(o_torch, xlo, go), g_ref
    ):
        floor = torch.finfo(dtype).eps * g_r.abs().max().item()
        e_c = (g_c.float() - g_r).abs().max().item()
        e_t = (g_t.float() - g_r).abs().max().item()
        assert e_c <= 2 * e_t + floor, (name, e_c, e_t)


def test_state_round_trip_and_auto_backend(cuda_device):
    """auto picks the kernels on CUDA (no warning); boundary states stream exactly like one call."""
    x = make_inputs(
        2, 2, 64, 64, dtype=torch.float32, device=cuda_device, seed=23, requires_grad=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o_full, _ = ttt_linear(*x.values(), backend="auto", output_final_state=True)
    o_cuda, _ = ttt_linear(*x.values(), backend="cuda")
    torch.testing.assert_close(o_full, o_cuda, rtol=0, atol=0)
    first = {**x, **{n: x[n][:, :, :32] for n in ("q", "k", "v", "eta")}}
    second = {**x, **{n: x[n][:, :, 32:] for n in ("q", "k", "v", "eta")}}
    o1, st = ttt_linear(*first.values(), backend="cuda", output_final_state=True)
    o2, st = ttt_linear(*second.values(), backend="cuda", initial_state=st, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o_full, rtol=1e-5, atol=1e-5)
    _, st_torch = ttt_linear(*x.values(), backend="torch", output_final_state=True)
    torch.testing.assert_close(st.params["W1"], st_torch.params["W1"], rtol=1e-4, atol=1e-4)


def test_streaming_one_token_at_a_time_matches_torch_backend(cuda_device):
    """States cut inside mini-batches (offset > 0, grad_sum) resume in the kernels: 21 tokens fed
    one by one (b = 16) equal one torch-backend call, outputs and gradients (fp32)."""
    x = make_inputs(1, 2, 21, 64, dtype=torch.float32, device=cuda_device, seed=29)
    outs, st = [], None
    for t in range(21):
        part = {**x, **{n: x[n][:, :, t : t + 1] for n in ("q", "k", "v", "eta")}}
        o, st = ttt_linear(
            *part.values(), backend="cuda", initial_state=st, output_final_state=True
        )
        outs.append(o)
    o = torch.cat(outs, dim=2)
    ref, st_ref = ttt_linear(*x.values(), backend="torch", output_final_state=True)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset == 5
    torch.testing.assert_close(st.grad_sum["W1"], st_ref.grad_sum["W1"], rtol=1e-4, atol=1e-4)
    go = torch.randn_like(ref)
    for name, g, w in zip(x, output_grads(o, x, go), output_grads(ref, x, go)):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


def test_unsupported_head_dim_falls_back_with_warning(cuda_device):
    x = make_inputs(
        1, 2, 32, 60, dtype=torch.float32, device=cuda_device, seed=24, requires_grad=False
    )
    with pytest.warns(UserWarning, match="head dim 64 or 128"):
        o, _ = ttt_linear(*x.values(), backend="auto")
    ref, _ = ttt_linear(*x.values(), backend="torch")
    torch.testing.assert_close(o, ref)


def test_deterministic(cuda_device):
    x = make_inputs(2, 2, 64, 64, dtype=torch.bfloat16, device=cuda_device, seed=25)
    assert_deterministic(lambda *a: ttt_linear(*a, backend="cuda"), x)


def test_cuda_graph_capture(cuda_device):
    """Forward + backward captured in a CUDA graph replay like eager on fresh inputs."""
    kw = dict(dtype=torch.float32, device=cuda_device, requires_grad=False)
    assert_graph_replay_matches_eager(
        lambda *a: ttt_linear(*a, backend="cuda"),
        make_inputs(1, 2, 48, 64, seed=26, **kw),
        make_inputs(1, 2, 48, 64, seed=27, **kw),
    )


def test_side_stream_matches_default_stream(cuda_device):
    """The kernels run on torch's current stream: a side stream's results equal the default's."""
    x = make_inputs(1, 2, 40, 64, dtype=torch.float32, device=cuda_device, seed=30)
    assert_side_stream_matches_default(lambda *a: ttt_linear(*a, backend="cuda"), x)


def test_empty_sequence_refused_and_next_launch_clean(cuda_device):
    """L = 0 at the op level is refused before any launch (the CPU path's L >= 1 check), and
    leaves no pending CUDA error: the next call runs and matches the torch backend."""
    x = make_inputs(1, 2, 16, 64, dtype=torch.float32, device=cuda_device, seed=31,
                    requires_grad=False)  # fmt: skip
    q, k, v, eta, W1, b1, lnw, lnb = x.values()
    W0, b0 = W1.unsqueeze(0).contiguous(), b1.reshape(1, 2, 64).contiguous()
    scale = torch.ones(16, device=cuda_device)
    empty = [t[:, :, :0] for t in (q, k, v, eta)]
    with pytest.raises(RuntimeError, match="L >= 1"):
        torch.ops.ttt.linear_fwd(*empty, W0, b0, lnw, lnb, scale, 16, True, 1e-6)
    o, _ = ttt_linear(*x.values(), backend="cuda")
    ref, _ = ttt_linear(*x.values(), backend="torch")
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)


def test_final_state_cut_inside_a_mini_batch(cuda_device):
    """L % b != 0 with output_final_state: offset, params and grad_sum as the torch backend."""
    x = make_inputs(2, 2, 53, 64, dtype=torch.float32, device=cuda_device, seed=28)
    o_c, st_c = ttt_linear(*x.values(), backend="cuda", output_final_state=True)
    o_t, st_t = ttt_linear(*x.values(), backend="torch", output_final_state=True)
    assert st_c.offset == st_t.offset == 53 % 16
    torch.testing.assert_close(o_c, o_t, rtol=1e-4, atol=1e-4)
    for field in ("params", "grad_sum"):
        for name in ("W1", "b1"):
            got, want = getattr(st_c, field)[name], getattr(st_t, field)[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(o_c.sum() + st_c.grad_sum["W1"].sum(), list(x.values()))
    want = torch.autograd.grad(o_t.sum() + st_t.grad_sum["W1"].sum(), list(x.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * max(1.0, w.abs().max().item()))
