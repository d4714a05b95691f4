"""A pure-bf16 policy: trains, samples, and stays within 2x of the bf16 rounding of the host model."""

import copy

import pytest
import torch
from conftest import make_prefix
from test_expert import _open_ttt_gates

from ttt_gemma import ActionExpertConfig, FlowMatchingPolicy


def _velocity_error(policy: FlowMatchingPolicy, prefix, x_t, t) -> float:
    """Max |v_bf16 - v_fp64| of the same weights (the bf16 copy's weights, so only the compute
    differs), relative to the fp64 velocity's scale."""
    low = copy.deepcopy(policy).to(torch.bfloat16)
    ref = copy.deepcopy(low).to(torch.float64)
    dbl = lambda p: type(p)(*(tuple(x.double() for x in f) for f in (p.keys, p.values)), p.pad_mask)
    want = ref.velocity(x_t.double(), t.double(), dbl(prefix))
    got = low.velocity(x_t.bfloat16(), t.bfloat16(), prefix_bf16(prefix))
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def prefix_bf16(p):
    return type(p)(tuple(k.bfloat16() for k in p.keys), tuple(v.bfloat16() for v in p.values),
                   p.pad_mask)  # fmt: skip


@pytest.mark.parametrize("placement", ["residual", "attn_output"])
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_bf16_error_is_within_twice_the_host_models(placement, inner):
    """The 2x-of-rounding rule: against fp64 on the same weights, the bf16 policy with open TTT
    gates errs at most twice as much as the bf16 policy without TTT (the host model)."""
    cfg = ActionExpertConfig.tiny(depth=3)
    base = FlowMatchingPolicy(cfg)
    ttt = FlowMatchingPolicy(
        cfg.replace(use_ttt=True, ttt=dict(input=placement, layer=dict(inner=inner)))
    )
    ttt.load_state_dict(base.state_dict(), strict=False)
    _open_ttt_gates(ttt, 0.5)
    _, _, _, prefix = make_prefix(cfg, batch=3)
    prefix = prefix.detach()
    x_t, t = torch.randn(3, cfg.action_horizon, cfg.action_dim), torch.tensor([0.1, 0.5, 0.93])
    err_base = _velocity_error(base, prefix, x_t, t)
    err_ttt = _velocity_error(ttt, prefix, x_t, t)
    assert 0 < err_base < 0.05
    assert err_ttt <= 2 * err_base, (err_ttt, err_base)


def test_pure_bf16_policy_trains_and_samples():
    cfg = ActionExpertConfig.tiny(use_ttt=True, ttt=dict(input="attn_output"))
    policy = FlowMatchingPolicy(cfg).to(torch.bfloat16)
    _open_ttt_gates(policy, 0.3)
    _, _, _, prefix = make_prefix(cfg)
    prefix = prefix_bf16(prefix.detach())
    actions = torch.randn(2, cfg.action_horizon, cfg.action_dim)  # fp32 data: cast by the policy
    noise, t = torch.randn_like(actions), torch.tensor([0.3, 0.8])
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = policy.loss(actions, prefix, noise, t)
        assert loss.dtype == torch.bfloat16
        opt.zero_grad()
        loss.backward()
        assert all(
            p.grad.dtype == torch.bfloat16 for p in policy.parameters() if p.grad is not None
        )
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert policy.loss(actions, prefix).isfinite()  # noise and t drawn inside, in bf16
    chunk = policy.sample(prefix)
    assert chunk.dtype == torch.bfloat16 and chunk.shape == (2, cfg.action_horizon, cfg.action_dim)
    assert chunk.isfinite().all()
