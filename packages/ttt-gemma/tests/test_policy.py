"""Flow-matching head: time embedding, loss, time schedule, Euler sampling, learning."""

import math

import pytest
import torch
from conftest import make_prefix

from ttt_gemma import ActionExpertConfig, FlowMatchingPolicy, sincos_time_embedding


def test_sincos_time_embedding_against_a_loop():
    t = torch.tensor([0.0, 0.25, 1.0])
    dim, lo, hi = 10, 4e-3, 4.0
    got = sincos_time_embedding(t, dim, lo, hi)
    half = dim // 2
    for b in range(3):
        for k in range(half):
            period = lo * (hi / lo) ** (k / (half - 1))
            arg = 2 * math.pi * float(t[b]) / period
            assert got[b, k].item() == pytest.approx(math.sin(arg), abs=1e-6)
            assert got[b, half + k].item() == pytest.approx(math.cos(arg), abs=1e-6)


def test_loss_is_velocity_regression_on_the_interpolant():
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    pol = FlowMatchingPolicy(cfg)
    _, _, _, prefix = make_prefix(cfg)
    actions = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    noise = torch.randn_like(actions)
    t = torch.tensor([0.2, 0.7])
    x_t = torch.stack([t[i] * noise[i] + (1 - t[i]) * actions[i] for i in range(2)])
    want = ((pol.velocity(x_t, t, prefix) - (noise - actions)) ** 2).mean()
    torch.testing.assert_close(pol.loss(actions, prefix, noise=noise, t=t), want)


def test_time_schedule_is_scaled_beta():
    pol = FlowMatchingPolicy(ActionExpertConfig.tiny())
    t = pol.sample_time(20_000)
    assert t.min() >= 0.001 and t.max() <= 1.0
    # Beta(1.5, 1): mean 0.6, P(x <= 0.5) = 0.5^1.5
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 0.01
    frac = (t <= 0.5 * 0.999 + 0.001).float().mean().item()
    assert abs(frac - 0.5**1.5) < 0.015


def test_sample_is_ten_euler_steps_from_noise():
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    pol = FlowMatchingPolicy(cfg)
    _, _, _, prefix = make_prefix(cfg)
    noise = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    x = noise.clone()
    with torch.no_grad():
        for k in range(10):
            t = 1.0 - k / 10
            x = x - 0.1 * pol.velocity(x, torch.full((2,), t), prefix)
    torch.testing.assert_close(pol.sample(prefix, noise=noise), x, rtol=1e-5, atol=1e-6)
    assert pol.sample(prefix).shape == (2, cfg.action_horizon, cfg.action_dim)


@pytest.mark.parametrize("use_adarms", [True, False], ids=["pi05-adarms", "pi0-concat"])
def test_policy_learns_a_fixed_batch(use_adarms):
    ttt = dict(gating="adarms") if use_adarms else dict(gating="tanh_alpha")
    cfg = ActionExpertConfig.tiny(use_adarms=use_adarms, use_ttt=True, ttt=ttt)
    pol = FlowMatchingPolicy(cfg)
    _, _, _, prefix = make_prefix(cfg)
    prefix = prefix.detach()
    actions = torch.randn(2, cfg.action_horizon, cfg.action_dim)
    noise, t = torch.randn_like(actions), torch.tensor([0.3, 0.8])
    opt = torch.optim.Adam(pol.parameters(), lr=3e-3)
    first = pol.loss(actions, prefix, noise, t).item()
    for _ in range(30):
        loss = pol.loss(actions, prefix, noise, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert pol.loss(actions, prefix, noise, t).item() < 0.5 * first


def test_bad_policy_inputs():
    cfg = ActionExpertConfig.tiny()
    pol = FlowMatchingPolicy(cfg)
    with pytest.raises(ValueError, match="x_t"):
        pol.velocity(torch.randn(2, 16, cfg.action_dim + 1), torch.rand(2))
    with pytest.raises(ValueError, match="t"):
        pol.velocity(torch.randn(2, 16, cfg.action_dim), torch.rand(3))
    with pytest.raises(ValueError, match="batch_size"):
        pol.sample()
