"""ttt-core's ``ttt_linear(backend="cuda")`` (the C++ CPU path here) against ttt-core's torch
backend: outputs and every gradient at fp32, rtol 1e-4; both options of the semantics in every
combination; streaming states at mini-batch boundaries (cuts inside a mini-batch:
test_streaming.py, and here with the options)."""

from __future__ import annotations

import warnings

import pytest
import torch
from ttt_cuda_reference import (
    OPTION_CASES,
    assert_cpp_matches_torch_one_call,
    make_inputs,
    option_case_id,
    options_kw,
)

import ttt_core
from ttt_core import ttt_linear

CASES = [
    # B, H, L, D, b, causal, token_scale
    (2, 3, 64, 16, 16, True, "mean"),
    (2, 2, 45, 32, 16, True, "mean"),  # L not a multiple of b
    (1, 2, 40, 16, 8, True, "sum"),
    (2, 2, 33, 16, 8, True, "vector"),
    (2, 2, 40, 16, 16, False, "mean"),
    (1, 2, 24, 16, None, False, "mean"),
    (1, 2, 30, 60, 16, True, "mean"),  # odd head dim
]


def _id(c):
    B, H, L, D, b, causal, ts = c
    return f"B{B}-H{H}-L{L}-D{D}-b{b}-{'causal' if causal else 'noncausal'}-{ts}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_outputs_and_gradients_match_torch_backend(case):
    B, H, L, D, b, causal, ts = case
    x = make_inputs(B, H, L, D, dtype=torch.float32, seed=11)
    token_scale = ts
    if ts == "vector":
        token_scale = (
            0.2 + torch.rand(b, generator=torch.Generator().manual_seed(1))
        ).requires_grad_()
    kw = dict(mini_batch_size=b, causal=causal, token_scale=token_scale)
    o, _ = ttt_linear(*x.values(), backend="cuda", **kw)
    ref, _ = ttt_linear(*x.values(), backend="torch", **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    go = torch.randn_like(ref)
    inputs = list(x.values()) + ([token_scale] if ts == "vector" else [])
    got = torch.autograd.grad((o * go).sum(), inputs)
    want = torch.autograd.grad((ref * go).sum(), inputs)
    names = list(x) + (["token_scale"] if ts == "vector" else [])
    for name, g, w in zip(names, got, want):
        # scale-aware: atol relative to the gradient's magnitude (sums over L*B terms)
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("case", OPTION_CASES, ids=option_case_id)
def test_options_match_torch_backend(case):
    """reconstruction_target and output_residual (every combination; streamed with cuts inside
    mini-batches): o, the final state and every gradient equal one torch-backend call."""
    options, cuts = case
    x = make_inputs(2, 2, 19, 12, dtype=torch.float32, seed=72)
    assert_cpp_matches_torch_one_call(ttt_linear, x, cuts, mini_batch_size=8,
                                      **options_kw(options))  # fmt: skip


def test_streaming_at_mini_batch_boundaries_matches_one_call():
    """Chunks cut at multiples of b, carrying the state, equal one call; so do the end weights."""
    x = make_inputs(2, 2, 48, 16, dtype=torch.float32, seed=12, requires_grad=False)
    o_full, st_full = ttt_linear(*x.values(), backend="cuda", output_final_state=True)
    outs, st = [], None
    for t0, t1 in ((0, 16), (16, 32), (32, 48)):
        part = {**x, **{n: x[n][:, :, t0:t1] for n in ("q", "k", "v", "eta")}}
        o, st = ttt_linear(
            *part.values(), backend="cuda", initial_state=st, output_final_state=True
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, dim=2), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.params["W1"], st_full.params["W1"], rtol=1e-5, atol=1e-5)
    _, st_torch = ttt_linear(*x.values(), backend="torch", output_final_state=True)
    assert st_full.offset == 0 and st_full.params["b1"].shape == (2, 2, 1, 16)
    for name in ("W1", "b1"):
        torch.testing.assert_close(
            st_full.params[name], st_torch.params[name], rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("token_scale", ["mean", "sum"])
def test_final_state_cut_inside_a_mini_batch_matches_torch_backend(token_scale):
    """L % b != 0: the state (offset, start params, grad_sum) equals ttt-core's, gradients flow
    through it, and resuming from it with the torch backend continues the sequence exactly."""
    x = make_inputs(2, 2, 40, 16, dtype=torch.float32, seed=13)
    first = {**x, **{n: x[n][:, :, :21] for n in ("q", "k", "v", "eta")}}  # 21 = 16 + 5
    second = {**x, **{n: x[n][:, :, 21:] for n in ("q", "k", "v", "eta")}}
    kw = dict(token_scale=token_scale, output_final_state=True)
    o_c, st_c = ttt_linear(*first.values(), backend="cuda", **kw)
    o_t, st_t = ttt_linear(*first.values(), backend="torch", **kw)
    assert st_c.offset == st_t.offset == 5 and st_c.mini_batch_size == 16
    torch.testing.assert_close(o_c, o_t, rtol=1e-4, atol=1e-4)
    for field in ("params", "grad_sum"):
        for name in ("W1", "b1"):
            got, want = getattr(st_c, field)[name], getattr(st_t, field)[name]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    full, _ = ttt_linear(*x.values(), backend="torch", token_scale=token_scale)
    rest, _ = ttt_linear(
        *second.values(), backend="torch", initial_state=st_c, token_scale=token_scale
    )
    torch.testing.assert_close(torch.cat([o_c, rest], 2), full, rtol=1e-4, atol=1e-4)

    # gradients through the state's tensors (params and grad_sum) as well as o
    def loss(o, st):
        return (
            o.square().sum()
            + st.params["W1"].sum()
            + (st.grad_sum["W1"] * 3).sum()
            + (st.grad_sum["b1"].square().sum() + st.params["b1"].sum())
        )

    got = torch.autograd.grad(loss(o_c, st_c), list(x.values()))
    want = torch.autograd.grad(loss(o_t, st_t), list(x.values()))
    for name, g, w in zip(x, got, want):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


def test_backends_registered_through_entry_point():
    assert {"cpp", "cuda"} <= set(ttt_core.available_backends())
    from ttt_core.backends import get_backend

    cuda, cpp = get_backend("cuda"), get_backend("cpp")
    assert cuda.name == "cuda" and cuda.device_types == ("cuda",)
    assert cpp.name == "cpp" and cpp.device_types == ("cpu",)  # auto's choice on the CPU
    assert cpp.warn_on_fallback is False and getattr(cuda, "warn_on_fallback", True) is True
    q = torch.zeros(1, 1, 4, 64)
    for backend in (cuda, cpp):
        assert backend.supports("ttt_linear", q, mini_batch_size=4, causal=True) is None
        assert backend.supports("ttt_mlp", q, mini_batch_size=4, causal=True) is None
        assert backend.supports("ttt_linear", q, momentum=torch.zeros(1, 1, 4)) is None  # Titans
        assert backend.supports("ttt_linear", q.bfloat16()) is None  # computed in fp32
        assert backend.supports("ttt_mlp", q, momentum=torch.zeros(1, 1, 4)) is None  # C++ path
        assert "checkpoint_group_size" in backend.supports("ttt_linear", q, checkpoint_group_size=2)
    assert "CPU tensors" in cpp.supports("ttt_linear", torch.zeros(1, 1, 4, 64, device="meta"))


def test_auto_on_cpu_runs_the_cpp_path():
    """auto on CPU tensors runs "cpp" (bit-identical to asking for it by name, no warning), which
    agrees with ttt-core's torch backend to float rounding."""
    x = make_inputs(1, 2, 21, 8, dtype=torch.float32, seed=14, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o_auto, _ = ttt_linear(*x.values(), mini_batch_size=4, backend="auto")
    o_cpp, _ = ttt_linear(*x.values(), mini_batch_size=4, backend="cpp")
    o_torch, _ = ttt_linear(*x.values(), mini_batch_size=4, backend="torch")
    assert torch.equal(o_auto, o_cpp)
    assert not torch.equal(o_auto, o_torch)  # a different algorithm: not the torch backend's bits
    torch.testing.assert_close(o_auto, o_torch, rtol=1e-4, atol=1e-4)


def test_cpp_refusal_runs_torch_silently_under_auto_and_raises_by_name():
    """A call "cpp" refuses (checkpoint_group_size): auto runs the torch backend without a
    warning (bit-identical to it); asking for "cpp" by name raises ValueError with the reason."""
    from ttt_core import ttt_mlp

    g = torch.Generator().manual_seed(15)
    B, H, L, D, F = 1, 2, 10, 4, 8
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    eta, mom = torch.full((B, H, L), 0.1), torch.full((B, H, L), 0.5)
    w = [0.3 * torch.randn(H, D, F, generator=g), torch.zeros(H, 1, F),
         0.3 * torch.randn(H, F, D, generator=g), torch.zeros(H, 1, D)]  # fmt: skip
    ln = [torch.ones(H, D), torch.zeros(H, D)]
    args = (q, k, v, eta, *w, *ln)
    kw = dict(momentum=mom, mini_batch_size=4, checkpoint_group_size=2)
    ref, _ = ttt_mlp(*args, **kw, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, _ = ttt_mlp(*args, **kw, backend="auto")
    assert torch.equal(o, ref)
    with pytest.raises(ValueError, match=r"backend 'cpp' cannot run .*checkpoint_group_size"):
        ttt_mlp(*args, **kw, backend="cpp")


@pytest.mark.parametrize("titans", [False, True], ids=["plain", "titans"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_cpu_inputs_compute_in_fp32(dtype, titans):
    """bf16/fp16 CPU inputs: the C++ path computes the fp32 result of the rounded inputs (o in the
    inputs' dtype, fp32 state); it stays as close to the fp32 call as ttt-core's torch backend
    on the same low-precision inputs, and its gradients reach the inputs in their dtype."""
    x32 = make_inputs(2, 2, 19, 8, dtype=torch.float32, seed=16, requires_grad=False)
    low = {n: t.to(dtype) if n in ("q", "k", "v", "eta") else t for n, t in x32.items()}
    extra = {"momentum": torch.full((2, 2, 19), 0.6, dtype=dtype)} if titans else {}
    kw = dict(mini_batch_size=4, output_final_state=True, **extra)
    ref, _ = ttt_linear(
        *x32.values(), backend="torch", **{**kw, **{n: t.float() for n, t in extra.items()}}
    )
    q = low["q"].clone().requires_grad_()
    o, state = ttt_linear(q, *list(low.values())[1:], backend="cpp", **kw)
    o_torch, _ = ttt_linear(*low.values(), backend="torch", **kw)
    assert o.dtype == dtype and state.params["W1"].dtype == torch.float32
    err, err_torch = (o.float() - ref).abs().max(), (o_torch.float() - ref).abs().max()
    assert err <= 1.5 * err_torch + torch.finfo(dtype).eps * ref.abs().max(), (err, err_torch)
    (gq,) = torch.autograd.grad(o.float().square().sum(), q)
    assert gq.dtype == dtype and torch.isfinite(gq).all()


def test_double_backward_is_refused():
    """The fused backward is first order: create_graph=True raises naming the fix, instead of
    returning gradients whose own graph is missing."""
    x = make_inputs(1, 2, 12, 8, dtype=torch.float32, seed=17)
    o, _ = ttt_linear(*x.values(), mini_batch_size=4, backend="cpp")
    with pytest.raises(RuntimeError, match=r"first-order backward only.*backend='torch'"):
        torch.autograd.grad(o.square().sum(), x["q"], create_graph=True)


@pytest.mark.parametrize(
    "inner,token_scale", [("linear", "mean"), ("linear", "learnable"), ("mlp", "learnable")]
)
def test_ttt_layer_with_cuda_backend_matches_torch_backend(inner, token_scale):
    """A whole TTTLayer (projections, learnable lr and token scale, post-norm) trains the same
    through backend "cuda" as through "torch": outputs and every parameter gradient."""
    from ttt_core import TTTConfig, TTTLayer

    cfg = dict(hidden_size=64, num_heads=4, mini_batch_size=8, token_scale=token_scale, inner=inner)
    torch.manual_seed(0)
    layer_torch = TTTLayer(TTTConfig(**cfg, backend="torch"))
    layer_cuda = TTTLayer(TTTConfig(**cfg, backend="cuda"))
    layer_cuda.load_state_dict(layer_torch.state_dict())
    x = torch.randn(2, 37, 64)
    y_torch, _ = layer_torch(x)
    y_cuda, _ = layer_cuda(x)
    torch.testing.assert_close(y_cuda, y_torch, rtol=1e-4, atol=1e-4)
    y_torch.square().sum().backward()
    y_cuda.square().sum().backward()
    grads_torch = dict(layer_torch.named_parameters())
    for name, p in layer_cuda.named_parameters():
        want = grads_torch[name].grad
        assert p.grad is not None and want is not None, name
        atol = 1e-4 * max(1.0, want.abs().max().item())
        torch.testing.assert_close(
            p.grad, want, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )
