"""torch backend == generic backend == naive per-token loop, in every mode, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import OPTIONS, call, make_inputs
from naive import naive_ttt

from ttt_core.fast_models import FAST_MODELS

# (id, keywords, titans)
MODES = [
    ("causal-mean-b4", dict(mini_batch_size=4), False),
    ("causal-sum-b5", dict(mini_batch_size=5, token_scale="sum"), False),
    ("causal-vector-b6", dict(mini_batch_size=6, token_scale="vector"), False),
    ("causal-b1", dict(mini_batch_size=1), False),
    ("causal-b>=L", dict(mini_batch_size=64), False),
    ("causal-whole", dict(mini_batch_size=None), False),
    ("noncausal-b4", dict(mini_batch_size=4, causal=False), False),
    ("noncausal-whole", dict(mini_batch_size=None, causal=False), False),
    ("titans-b4", dict(mini_batch_size=4), True),
    ("titans-b1", dict(mini_batch_size=1), True),
    ("titans-momentum-only-b8", dict(mini_batch_size=8), "momentum"),
]


def _kw(kw, dtype):
    kw = dict(kw)
    if kw.get("token_scale") == "vector":
        g = torch.Generator().manual_seed(3)
        kw["token_scale"] = (0.2 + torch.rand(kw["mini_batch_size"], generator=g)).to(dtype)
    return kw


def _inputs(kind, titans, dtype, requires_grad=False, **shape):
    x, w, ln, extra = make_inputs(
        kind, dtype=dtype, titans=bool(titans), requires_grad=requires_grad, **shape
    )
    if titans == "momentum":
        extra.pop("decay")
    return x, w, ln, extra


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("mode", "kw", "titans"), MODES, ids=[m[0] for m in MODES])
def test_outputs_match_naive_loop_fp64(kind, mode, kw, titans):
    """Every closed form (dual, primal) and the torch.func path equal the hand-written loop."""
    x, w, ln, extra = _inputs(kind, titans, torch.float64, B=2, H=2, L=13, D=6)
    kw = _kw(kw, torch.float64)
    ref = naive_ttt(FAST_MODELS[kind], w, x["q"], x["k"], x["v"], x["eta"], ln["ln_weight"],
                    ln["ln_bias"], b=kw.get("mini_batch_size", 16), causal=kw.get("causal", True),
                    token_scale=kw.get("token_scale", "mean"), **extra)  # fmt: skip
    for backend, form in (("torch", "dual"), ("torch", "primal"), ("generic", "auto")):
        o, _ = call(kind, x, w, ln, extra, backend=backend, form=form, **kw)
        torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10, msg=f"{backend}/{form}")


def _all_grads(kind, titans, kw, dtype, backend, form="auto"):
    x, w, ln, extra = _inputs(kind, titans, dtype, requires_grad=True)
    kw = _kw(kw, dtype)
    if isinstance(kw.get("token_scale"), torch.Tensor):
        kw["token_scale"].requires_grad_(True)
    o, _ = call(kind, x, w, ln, extra, backend=backend, form=form, **kw)
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(o.shape, generator=g, dtype=torch.float64).to(dtype)
    leaves = {**x, **w, **ln, **extra}
    if isinstance(kw.get("token_scale"), torch.Tensor):
        leaves["token_scale"] = kw["token_scale"]
    grads = torch.autograd.grad((o * weight).sum(), list(leaves.values()))
    return o, dict(zip(leaves, grads))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("mode", "kw", "titans"), MODES, ids=[m[0] for m in MODES])
def test_fp32_torch_matches_generic_and_fp64(kind, mode, kw, titans):
    """fp32 outputs and every gradient: torch backend vs generic (fp32) vs torch in fp64.

    rtol 1e-4, with atol 1e-4 times the reference's largest magnitude (gradients reach ~50 here, and
    fp32 rounding of a 23-step recurrence scales with them)."""
    o64, g64 = _all_grads(kind, titans, kw, torch.float64, "torch")
    o_gen, g_gen = _all_grads(kind, titans, kw, torch.float32, "generic")
    o32, g32 = _all_grads(kind, titans, kw, torch.float32, "torch")

    def close(a, ref, msg):
        atol = 1e-4 * max(1.0, ref.abs().max().item())
        torch.testing.assert_close(a.double(), ref.double(), rtol=1e-4, atol=atol, msg=msg)

    close(o32, o_gen, "o torch vs generic")
    close(o32, o64, "o fp32 vs fp64")
    for name in g64:
        close(g32[name], g_gen[name], f"grad {name} torch vs generic")
        close(g32[name], g64[name], f"grad {name} fp32 vs fp64")
        close(g_gen[name], g64[name], f"grad {name} generic fp32 vs fp64")


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("titans", [False, True], ids=["plain", "titans"])
def test_dual_and_primal_gradients_agree_fp64(kind, titans):
    kw = dict(mini_batch_size=5)
    od, gd = _all_grads(kind, titans, kw, torch.float64, "torch", "dual")
    op, gp = _all_grads(kind, titans, kw, torch.float64, "torch", "primal")
    torch.testing.assert_close(od, op, rtol=1e-10, atol=1e-10)
    for name in gd:
        torch.testing.assert_close(gd[name], gp[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_eta_zero_leaves_weights_untouched(kind):
    """With eta = 0 nothing is learned: o = q + LN(f_W0(q)) computed by hand."""
    x, w, ln, _ = make_inputs(kind, dtype=torch.float64)
    x["eta"] = torch.zeros_like(x["eta"])
    o, state = call(kind, x, w, ln, mini_batch_size=4, output_final_state=True)
    z = FAST_MODELS[kind]({n: t.unsqueeze(0) for n, t in w.items()}, x["q"])
    lnz = (
        torch.nn.functional.layer_norm(z, z.shape[-1:], eps=1e-6) * ln["ln_weight"][:, None]
        + ln["ln_bias"][:, None]
    )
    torch.testing.assert_close(o, x["q"] + lnz)
    for n, t in w.items():
        torch.testing.assert_close(state.params[n], t.expand_as(state.params[n]))


def test_learning_reduces_the_token_loss():
    """One non-causal step with a small lr lowers every head's mean token loss (a real descent step)."""
    x, w, ln, _ = make_inputs("linear", B=1, H=2, L=32, D=8, dtype=torch.float64)
    x["eta"] = torch.full_like(x["eta"], 0.02)
    _, state = call(
        "linear", x, w, ln, mini_batch_size=32, token_scale="sum", output_final_state=True
    )

    def loss(W1, b1):
        z = x["k"] @ W1 + b1
        pred = (
            torch.nn.functional.layer_norm(z, z.shape[-1:], eps=1e-6) * ln["ln_weight"][:, None]
            + ln["ln_bias"][:, None]
        )
        return 0.5 * (pred - (x["v"] - x["k"])).pow(2).sum(-1).mean(-1)  # (B, H)

    before = loss(w["W1"], w["b1"])
    after = loss(state.params["W1"], state.params["b1"])
    assert (after < before).all(), (before, after)


def test_closed_form_ln_loss_grad_matches_autograd():
    """The closed-form gradient of 0.5 ||LN_h(z) - t||^2 used inside every mini-batch."""
    from ttt_core.ops.common import ln_loss_grad

    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 7, 10, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, 10, generator=g, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(3, 10, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(3, 10, generator=g, dtype=torch.float64)
    ln = torch.nn.functional.layer_norm(z, (10,), eps=1e-6) * w[:, None] + b[:, None]
    (ref,) = torch.autograd.grad(0.5 * (ln - t).pow(2).sum(), z)
    torch.testing.assert_close(ln_loss_grad(z, t, w, b, 1e-6), ref)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs_stay_close_to_fp32(kind, dtype):
    """bf16/fp16 inputs (fp32 state inside): the error vs fp32 is that of rounding the inputs."""
    x, w, ln, extra = make_inputs(kind, dtype=torch.float32, titans=True)
    ref, _ = call(kind, x, w, ln, extra, mini_batch_size=8)
    low = {n: t.to(dtype) for n, t in x.items()}
    o, _ = call(kind, low, w, ln, extra, mini_batch_size=8)
    assert o.dtype == dtype
    # the same computation from inputs rounded to the low dtype, done in fp32, bounds the error
    rounded, _ = call(kind, {n: t.float() for n, t in low.items()}, w, ln, extra, mini_batch_size=8)
    err, err_rounding = (o.float() - ref).abs().max(), (rounded - ref).abs().max()
    assert err <= 2 * err_rounding + 2 * torch.finfo(dtype).eps * ref.abs().max(), (
        err,
        err_rounding,
    )


OPTION_MODES = [
    ("causal-b4", dict(mini_batch_size=4), False),
    ("noncausal-b5", dict(mini_batch_size=5, causal=False), False),
    ("titans-b4", dict(mini_batch_size=4), True),
]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("mode", "kw", "titans"), OPTION_MODES, ids=[m[0] for m in OPTION_MODES])
@OPTIONS
def test_target_and_residual_options_fp64(kind, mode, kw, titans, options):
    """reconstruction_target="value" (target v) and output_residual=False (o = LN(f(q))): the torch
    backend (dual, primal) equals the generic path, outputs and every gradient, and the naive loop
    fed v + k (its target is v - k) with q subtracted from its output."""
    x, w, ln, extra = _inputs(kind, titans, torch.float64, requires_grad=True, B=2, H=2, L=11, D=5)
    leaves = {**x, **w, **ln, **extra}
    value = options.get("reconstruction_target") == "value"
    ref = naive_ttt(FAST_MODELS[kind], w, x["q"], x["k"], x["v"] + x["k"] if value else x["v"],
                    x["eta"], ln["ln_weight"], ln["ln_bias"], b=kw["mini_batch_size"],
                    causal=kw.get("causal", True), **extra).detach()  # fmt: skip
    if options.get("output_residual") is False:
        ref = ref - x["q"].detach()
    weight = torch.randn(ref.shape, dtype=torch.float64)
    results = {}
    for backend, form in (("generic", "auto"), ("torch", "dual"), ("torch", "primal")):
        o, _ = call(kind, x, w, ln, extra, backend=backend, form=form, **kw, **options)
        results[backend, form] = (o, torch.autograd.grad((o * weight).sum(), list(leaves.values())))
    o_ref, g_ref = results["generic", "auto"]
    torch.testing.assert_close(o_ref, ref, rtol=1e-10, atol=1e-10)
    for key, (o, g) in results.items():
        torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10, msg=str(key))
        for name, a, b in zip(leaves, g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"{key} grad {name}")
