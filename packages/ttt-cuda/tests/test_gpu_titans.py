"""Device tests of the CUDA Titans-form TTT-Linear kernels (momentum/decay; D 64/128; skipped
without a GPU, TTT_REQUIRE_GPU=1 makes that a failure). References: ttt-core's torch backend on
the same GPU (fp32; its own bf16 run for the accuracy rule), eager runs for the CUDA graph."""

from __future__ import annotations

import pytest
import torch
from gpu_checks import assert_graph_replay_matches_eager, output_grads
from ttt_cuda_reference import make_inputs, make_titans

from ttt_core import ttt_linear

pytestmark = pytest.mark.gpu

CASES = [(2, 2, 64, 64, 16), (1, 2, 70, 64, 32), (1, 2, 48, 128, 16), (1, 1, 96, 64, 64)]


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


def test_bf16_accuracy_rule(cuda_device):
    """Error vs the fp32 reference at most 2x the torch backend's own bf16 error (+ one rounding
    of the largest value): same rounded inputs, fp32 state on both sides."""
    x32 = make_inputs(2, 2, 64, 64, dtype=torch.float32, device=cuda_device, seed=72)
    mom, dec = (
        t.to(cuda_device, torch.float32)
        for t in make_titans(2, 2, 64, seed=72, requires_grad=False)
    )
    xlo = {n: t.detach().bfloat16().requires_grad_() for n, t in x32.items()}
    ref, _ = ttt_linear(*x32.values(), momentum=mom, decay=dec, backend="torch")
    lo = dict(momentum=mom.bfloat16(), decay=dec.bfloat16())
    o_torch, _ = ttt_linear(*xlo.values(), backend="torch", **lo)
    o_cuda, _ = ttt_linear(*xlo.values(), backend="cuda", **lo)
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs().max().item()
    err_torch = (o_torch.float() - ref).abs().max().item()
    err_cuda = (o_cuda.float() - ref).abs().max().item()
    assert err_cuda <= 2 * err_torch + ulp, (err_cuda, err_torch)


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
