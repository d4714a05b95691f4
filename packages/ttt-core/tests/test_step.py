"""The public single-step entries (``ttt_linear_step``/``ttt_mlp_step``, the recurrent step of
ops/recurrent.py) equal the one-call chunked form and the naive per-token loop.

Streaming one token per call goes through the step; the references are the chunked dual form over
the whole sequence (a different algorithm), the generic torch.func path and tests/naive.py
(autograd per token, no ttt_core code), in fp64: outputs, the carried state at every token, and
outer gradients.
"""

from __future__ import annotations

import pytest
import torch
from conftest import OPTIONS, call, make_inputs
from naive import naive_ttt

from ttt_core import ttt_linear_step, ttt_mlp_step
from ttt_core.fast_models import FAST_MODELS
from ttt_core.ops import recurrent

L = 11
MODES = {  # name: (mini_batch_size, token_scale, titans)
    "mean-b4": (4, "mean", False),
    "sum-b3": (3, "sum", False),
    "vector-b4": (4, "vector", False),
    "b1": (1, "mean", False),
    "whole": (None, "mean", False),
    "titans-b4": (4, "mean", True),
    "titans-whole": (None, "mean", True),
}


def _setup(kind, mode, requires_grad=False):
    b, scale, titans = MODES[mode]
    x, w, ln, extra = make_inputs(kind, B=2, H=2, L=L, D=5, titans=titans,
                                  requires_grad=requires_grad)  # fmt: skip
    ts = torch.linspace(1.0, 0.3, 4, dtype=torch.float64) if scale == "vector" else scale
    return x, w, ln, extra, dict(mini_batch_size=b, token_scale=ts)


def step(kind, x, w, ln, extra=None, **kw):
    """ttt_linear_step / ttt_mlp_step with the dicts of make_inputs."""
    fn = ttt_linear_step if kind == "linear" else ttt_mlp_step
    return fn(x["q"], x["k"], x["v"], x["eta"], *w.values(), *ln.values(), **(extra or {}), **kw)


def _token_by_token(kind, x, w, ln, extra, kw, n=L, backend="torch"):
    """Every token its own step; returns o [B, H, n, D] and the states."""
    outs, states, state = [], [], None
    for t in range(n):
        xs = {k: v[:, :, t : t + 1] for k, v in x.items()}
        es = {k: v[:, :, t : t + 1] for k, v in extra.items()}
        o, state = step(kind, xs, w, ln, es, state=state, backend=backend, **kw)
        outs.append(o)
        states.append(state)
    return torch.cat(outs, dim=2), states


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("mode", list(MODES))
def test_step_equals_chunked_and_naive_fp64(kind, mode, monkeypatch):
    x, w, ln, extra, kw = _setup(kind, mode)
    calls = []
    real = recurrent.ttt_step
    monkeypatch.setattr("ttt_core.functional.ttt_step",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    dec, states = _token_by_token(kind, x, w, ln, extra, kw)
    assert len(calls) == L  # every step took the recurrent step
    full, _ = call(kind, x, w, ln, extra, form="dual", backend="torch", **kw)
    torch.testing.assert_close(dec, full, rtol=1e-11, atol=1e-11)
    ref = naive_ttt(FAST_MODELS[kind], w, x["q"], x["k"], x["v"], x["eta"], ln["ln_weight"],
                    ln["ln_bias"], b=kw["mini_batch_size"], token_scale=kw["token_scale"],
                    **extra)  # fmt: skip
    torch.testing.assert_close(dec, ref, rtol=1e-10, atol=1e-10)
    # the state after every token equals the scan's state after the same prefix
    for t in (0, 2, 3, 6, L - 1):
        pre = {n: v[:, :, : t + 1] for n, v in x.items()}
        pre_e = {n: v[:, :, : t + 1] for n, v in extra.items()}
        _, want = call(kind, pre, w, ln, pre_e, output_final_state=True, form="dual",
                       backend="torch", **kw)  # fmt: skip
        got = states[t]
        assert got.offset == want.offset
        for field in ("params", "grad_sum", "momentum", "current"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None), (t, field)
            for n in a or {}:
                torch.testing.assert_close(a[n], b[n], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("mode", ["mean-b4", "vector-b4", "titans-b4"])
def test_step_gradients_equal_chunked_fp64(kind, mode):
    x, w, ln, extra, kw = _setup(kind, mode, requires_grad=True)
    if isinstance(kw["token_scale"], torch.Tensor):
        kw["token_scale"].requires_grad_(True)
    inputs = [*x.values(), *w.values(), *ln.values(), *extra.values()]
    if isinstance(kw["token_scale"], torch.Tensor):
        inputs.append(kw["token_scale"])
    weight = torch.randn(2, 2, L, 5, dtype=torch.float64)
    dec, _ = _token_by_token(kind, x, w, ln, extra, kw)
    g_dec = torch.autograd.grad((dec * weight).sum(), inputs)
    full, _ = call(kind, x, w, ln, extra, form="dual", backend="torch", **kw)
    g_full = torch.autograd.grad((full * weight).sum(), inputs)
    for a, b in zip(g_dec, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_step_low_precision_keeps_fp32_state():
    """bf16 inputs: fp32 math and fp32 state, output in bf16, close to the fp32 run."""
    x, w, ln, _ = make_inputs("linear", B=1, H=2, L=6, D=8, dtype=torch.float32)
    xb = {n: v.bfloat16() for n, v in x.items()}
    kw = dict(mini_batch_size=4)
    ref, _ = _token_by_token("linear", x, w, ln, {}, kw, n=6)
    out, states = _token_by_token("linear", xb, w, ln, {}, kw, n=6)
    assert out.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in states[-1].params.values())
    err = (out.float() - ref).abs().max()
    rounding = (x["q"].bfloat16().float() - x["q"]).abs().max()  # input rounding alone
    assert err < 8 * rounding, (err, rounding)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("titans", [False, True], ids=["plain", "titans"])
@OPTIONS
def test_step_options_equal_generic_fp64(kind, titans, options):
    """The step with the reconstruction target / output residual options equals the generic
    torch.func path stepping the same tokens and the chunked form over the whole sequence."""
    x, w, ln, extra = make_inputs(kind, B=2, H=2, L=7, D=5, titans=titans)
    kw = dict(mini_batch_size=3, **options)
    got, states = _token_by_token(kind, x, w, ln, extra, kw, n=7)
    ref, ref_states = _token_by_token(kind, x, w, ln, extra, kw, n=7, backend="generic")
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    for n in states[-1].params:
        torch.testing.assert_close(states[-1].params[n], ref_states[-1].params[n])
    full, _ = call(kind, x, w, ln, extra, backend="torch", **kw)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)


def test_step_rejects_more_than_one_token():
    x, w, ln, _ = make_inputs("linear", L=2)
    with pytest.raises(ValueError, match=r"a step takes one token: q must be \[B, H, 1, D\]"):
        step("linear", x, w, ln)
