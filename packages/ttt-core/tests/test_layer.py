"""TTTLayer: options, gates, streaming, bf16, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt_core import TTTConfig, TTTLayer

VARIANTS = {
    "linear": dict(),
    "mlp": dict(inner="mlp"),
    "titans": dict(titans=True),
    "learnable-scale": dict(token_scale="learnable", qk_l2_norm=True, normalize_target=True),
    "gelu-gate": dict(gate="gelu"),
    "noncausal-whole": dict(causal=False, mini_batch_size=None, gate="tanh_alpha"),
    "bidirectional": dict(bidirectional=True, inner="mlp"),
    "primal": dict(use_dual_form=False),
}


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    return TTTLayer(
        TTTConfig(hidden_size=24, num_heads=3, mini_batch_size=kw.pop("mini_batch_size", 4), **kw)
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_gets_a_gradient(name):
    layer = _layer(**VARIANTS[name])
    x = torch.randn(2, 11, 24, requires_grad=True)
    y, _ = layer(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_dual_and_primal_layers_agree():
    x = torch.randn(2, 13, 24)
    y_dual, _ = _layer(seed=1)(x)
    y_primal, _ = _layer(seed=1, use_dual_form=False)(x)
    torch.testing.assert_close(y_dual, y_primal, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "mlp", "titans", "learnable-scale"])
def test_layer_streaming_equals_one_call(name):
    layer = _layer(**VARIANTS[name])
    x = torch.randn(2, 17, 24)
    y, _ = layer(x)
    outs, state = [], None
    for a, b in [(0, 3), (3, 4), (4, 13), (13, 17)]:
        yi, state = layer(x[:, a:b], state=state)
        outs.append(yi)
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "mlp", "titans", "learnable-scale", "gelu-gate"])
def test_layer_token_by_token_takes_the_step(name, monkeypatch):
    """One token per call goes from the layer through the inner learner's ``step`` and the public
    step entry's dispatch to the recurrent step (never the sequence path) and equals one call:
    outputs and every parameter's gradient, fp64."""
    import ttt_core.functional as functional

    layer = _layer(**VARIANTS[name]).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    y, _ = layer(x)
    want = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    calls = {"step": 0, "chunked": 0}

    def count(name, fn):
        return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k)

    monkeypatch.setattr(functional, "ttt_step", count("step", functional.ttt_step))
    monkeypatch.setattr(functional, "ttt_chunked", count("chunked", functional.ttt_chunked))
    outs, state = [], None
    for t in range(9):
        yt, state = layer(x[:, t : t + 1], state=state)
        outs.append(yt)
    assert calls == {"step": 9, "chunked": 0}
    streamed = torch.cat(outs, 1)
    torch.testing.assert_close(streamed, y, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(streamed.square().sum(), list(layer.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_layer_token_step_for_bf16_and_other_backends(monkeypatch):
    """bf16 tokens and backend="generic" take the same dispatch as everything else, with the same
    result as the whole sequence in one call."""
    import ttt_core.functional as functional

    calls = {"dispatch": 0}

    def count(name, fn):
        return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k)

    monkeypatch.setattr(functional, "_dispatch", count("dispatch", functional._dispatch))
    for kw, dtype, tol in ((dict(backend="generic"), torch.float64, 1e-9),
                           (dict(), torch.bfloat16, 3e-2)):  # fmt: skip
        layer = _layer(**kw).to(dtype)
        x = torch.randn(2, 6, 24, dtype=dtype)
        y, _ = layer(x)
        outs, state = [], None
        for t in range(6):
            yt, state = layer(x[:, t : t + 1], state=state)
            outs.append(yt)
        err = (torch.cat(outs, 1).double() - y.double()).abs().max() / y.double().abs().max()
        assert err < tol, (kw, dtype, err)
    assert calls == {"dispatch": 14}  # 2 x (one whole call + 6 tokens)


def test_layer_token_step_checks_the_state():
    layer = _layer()
    _, state = layer(torch.randn(2, 3, 24))
    with pytest.raises(ValueError, match=r"state\.params\[.W1.\] must have shape"):
        layer(torch.randn(1, 1, 24), state=state)  # state of a batch of 2
    with pytest.raises(ValueError, match="mini-batch of size 4"):
        _layer(mini_batch_size=5)(torch.randn(2, 1, 24), state=state)


def test_zero_tanh_gate_is_exactly_zero():
    layer = _layer(gate="tanh_alpha", gate_init=0.0)
    y, _ = layer(torch.randn(2, 9, 24))
    assert torch.equal(y, torch.zeros_like(y))


def test_bidirectional_sees_the_future_and_causal_does_not():
    x = torch.randn(1, 12, 24)
    x2 = x.clone()
    x2[:, -1] += 1.0  # change only the last token
    for kw, future_visible in ((dict(), False), (dict(bidirectional=True), True)):
        layer = _layer(seed=2, **kw)
        y1, _ = layer(x)
        y2, _ = layer(x2)
        changed = not torch.allclose(y1[:, :-1], y2[:, :-1])
        assert changed == future_visible, kw


def test_bf16_inputs_stay_close_to_fp32():
    layer = _layer(inner="mlp")
    x = torch.randn(2, 20, 24)
    y32, _ = layer(x)
    y16, _ = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    err = (y16.float() - y32).abs().max() / y32.abs().max()
    assert err < 3e-2, err


def test_inner_loop_lowers_the_reconstruction_loss_with_small_lr():
    """A non-causal layer's inner step is a gradient step: "after" < "before" for a small lr (with
    fast weights large enough that the scale-invariant LayerNorm does not blow the step up)."""
    layer = _layer(causal=False, mini_batch_size=None, base_lr=0.1, init_std=0.2)
    report = layer.inner_loss_report(torch.randn(2, 32, 24))
    assert report["after"] < report["before"], report


def test_torch_compile_matches_eager():
    layer = _layer(inner="mlp", gate="gelu")
    x = torch.randn(2, 16, 24)
    y_eager, _ = layer(x)
    compiled = torch.compile(layer, backend="inductor", fullgraph=False)
    y_comp, _ = compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target", ["residual", "value"])
def test_target_norm_affine_is_a_learnable_per_head_affine(target):
    """normalize_target + target_norm_affine: the inner loop's target is the standardised target
    times a learnable per-head weight plus bias ([H, D], init 1 and 0), checked against the
    functional generic path fed that target by hand (fp64); the affine gets gradients."""
    from ttt_core import ttt_linear

    cfg = dict(hidden_size=15, num_heads=3, mini_batch_size=4, normalize_target=True)
    layer = TTTLayer(TTTConfig(**cfg, target_norm_affine=True, reconstruction_target=target))
    layer = layer.double()
    plain = TTTLayer(TTTConfig(**cfg, reconstruction_target=target)).double()
    plain.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 7, 15, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], plain(x)[0])  # init: weight 1, bias 0
    with torch.no_grad():
        layer.target_norm_weight.copy_(1 + 0.3 * torch.randn(3, 5))
        layer.target_norm_bias.copy_(0.2 * torch.randn(3, 5))
    y, _ = layer(x)
    q, k, v, rates = layer.project(x)  # no gelu gate
    q, k, v = (t.view(2, 7, 3, 5).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    t = v - k if target == "residual" else v
    t = (
        F.layer_norm(t, (5,), eps=1e-6) * layer.target_norm_weight[:, None]
        + layer.target_norm_bias[:, None]
    )
    eta = torch.sigmoid(rates).transpose(1, 2) / 5  # base_lr 1 / D
    inner = layer.inner
    o, _ = ttt_linear(q, k, k + t if target == "residual" else t, eta, inner.W1, inner.b1,
                      inner.ln_weight, inner.ln_bias, mini_batch_size=4, backend="generic",
                      reconstruction_target=target)  # fmt: skip
    want = layer.o_proj(layer.post_norm(o.transpose(1, 2).reshape(2, 7, 15)))
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    gw, gb = torch.autograd.grad(
        y.square().sum(), [layer.target_norm_weight, layer.target_norm_bias]
    )
    assert gw.abs().max() > 0 and gb.abs().max() > 0


@pytest.mark.parametrize("name", ["linear", "titans", "bidirectional", "noncausal-whole"])
def test_pre_norm_and_residual_are_the_block_around_the_layer(name):
    """``forward(x, pre_norm=n, residual=True)`` is ``x + TTT(n(x))`` composed by hand, whole
    sequences and streamed in pieces, and gradients reach the norm's weight."""
    layer = _layer(**VARIANTS[name])
    norm = torch.nn.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(24))
    x = torch.randn(2, 13, 24)
    y, _ = layer(x, pre_norm=norm, residual=True)
    torch.testing.assert_close(y, x + layer(norm(x))[0], rtol=0, atol=0)
    y_plain, _ = layer(x, pre_norm=norm)
    torch.testing.assert_close(y_plain, layer(norm(x))[0], rtol=0, atol=0)
    if layer.config.causal and not layer.config.bidirectional:
        outs, state = [], None
        for a, b in [(0, 3), (3, 4), (4, 13)]:
            yi, state = layer(x[:, a:b], state=state, pre_norm=norm, residual=True)
            outs.append(yi)
        torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_pre_norm_and_residual_are_checked():
    layer, x = _layer(), torch.randn(1, 5, 24)
    with pytest.raises(TypeError, match="pre_norm must be a module"):
        layer(x, pre_norm="rms")
    with pytest.raises(TypeError, match="residual must be a bool"):
        layer(x, residual=1)
