"""The action expert: exact start, gates, gradients, lengths, prefix isolation, equivariance."""

import pytest
import torch
from conftest import make_prefix
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer

from ttt_core import TTTConfig
from ttt_gemma import (
    ActionExpert,
    ActionExpertConfig,
    FlowMatchingPolicy,
    GemmaBlock,
    TTTBranch,
    TTTOptions,
    joint_forward,
    pi05_attention_mask,
)
from ttt_gemma.attention import gemma_config


def _open_ttt_gates(module: torch.nn.Module, value: float = 0.5) -> None:
    """Give every TTT branch a non-zero gate (the zero-initialised one blocks all gradients)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, TTTBranch) and m.norm.dense is not None:
                m.norm.dense.weight.normal_(std=0.05)
                m.norm.dense.bias.fill_(value)


def test_block_without_adarms_matches_transformers_gemma_layer():
    """No AdaRMS, no TTT, no prefix: our block is transformers' GemmaDecoderLayer (bidirectional)."""
    kw = dict(width=32, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=8, rms_eps=1e-6)
    ours = GemmaBlock(**kw, rope_theta=10_000.0, cond_dim=None)
    cfg = gemma_config(**kw, depth=1, rope_theta=10_000.0)
    cfg._attn_implementation = "eager"
    ref = GemmaDecoderLayer(cfg, 0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.2)
    missing = ref.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys
    expert_rotary = ActionExpert(ActionExpertConfig.tiny(width=32, head_dim=8, depth=1)).rotary
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9)[None].expand(2, -1)
    cos, sin = expert_rotary(x, pos)
    mask = torch.ones(2, 9, 9, dtype=torch.bool)
    got = ours(x, None, cos, sin, None, None, mask)
    want = ref(x, attention_mask=None, position_embeddings=(cos, sin))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "ttt",
    [
        dict(gating="adarms"),
        dict(layer=dict(inner="mlp"), gating="both", layer_positions=[1]),
        dict(layer=dict(use_dual_form=False, bidirectional=True)),
        dict(layer=dict(qk_l2_norm=True, normalize_target=True)),
        dict(input="attn_output"),
        dict(input="attn_output", layer=dict(inner="mlp"), gating="both"),
        dict(input="attn_output", layer=dict(normalize_target=True, target_norm_affine=True)),
    ],
    ids=[
        "linear-adarms",
        "mlp-both-L1",
        "primal-bidir",
        "l2norm-normtarget",
        "attn-output",
        "attn-output-mlp-both",
        "attn-output-affine-target-norm",
    ],
)
def test_exact_start_equals_base_expert(ttt):
    """Zero-initialised TTT AdaRMS dense -> gate 0 -> exactly the base expert's output."""
    base_cfg = ActionExpertConfig.tiny()
    base = FlowMatchingPolicy(base_cfg)
    with torch.no_grad():  # a "pretrained" base: no zero-initialised dense layers anywhere
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ttt_cfg = base_cfg.replace(use_ttt=True, ttt=TTTOptions(**ttt))
    with_ttt = FlowMatchingPolicy(ttt_cfg)
    result = with_ttt.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".ttt." in k for k in result.missing_keys)
    n_branches = sum(isinstance(m, TTTBranch) for m in with_ttt.modules())
    assert n_branches == len(ttt_cfg.ttt_layers()) > 0
    _, _, _, prefix = make_prefix(base_cfg)
    x_t = torch.randn(2, base_cfg.action_horizon, base_cfg.action_dim)
    t = torch.tensor([0.3, 0.9])
    v_base = base.velocity(x_t, t, prefix)
    v_ttt = with_ttt.velocity(x_t, t, prefix)
    assert torch.equal(v_base, v_ttt)
    # ... and opening the gate changes the output, so the branch is really there
    _open_ttt_gates(with_ttt)
    assert not torch.allclose(with_ttt.velocity(x_t, t, prefix), v_base, atol=1e-4)


def test_exact_start_without_adarms_via_tanh_gate_zero():
    cfg = ActionExpertConfig.tiny(use_adarms=False)
    base = FlowMatchingPolicy(cfg)
    ttt = FlowMatchingPolicy(
        cfg.replace(use_ttt=True, ttt=dict(gating="tanh_alpha", layer=dict(gate_init=0.0)))
    )
    ttt.load_state_dict(base.state_dict(), strict=False)
    x_t, t = torch.randn(2, cfg.action_horizon, cfg.action_dim), torch.rand(2)
    assert torch.equal(base.velocity(x_t, t), ttt.velocity(x_t, t))


def test_gate_shapes():
    B, L = 3, 8
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    h, cond = torch.randn(B, L, cfg.width), torch.randn(B, cfg.width)
    branch = ActionExpert(cfg).layers[0].ttt
    y, gate = branch(h, cond)
    assert y.shape == (B, L, cfg.width) and gate.shape == (B, 1, cfg.width)
    assert ActionExpert(cfg).layers[1].input_layernorm(h, cond)[1].shape == (B, 1, cfg.width)
    plain = ActionExpertConfig.tiny(use_adarms=False, use_ttt=True, ttt=dict(gating="tanh_alpha"))
    expert = ActionExpert(plain)
    y, gate = expert.layers[0].ttt(h, None)
    assert gate is None and y.shape == (B, L, cfg.width)
    assert expert.layers[0].input_layernorm(h)[1] is None


@pytest.mark.parametrize("placement", ["residual", "attn_output"])
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
def test_gradients_reach_every_ttt_parameter_and_the_time_condition(layer_type, placement):
    # the learnable affine target normalisation (video TTT) too: its weight and bias must learn
    layer = dict(inner=layer_type, normalize_target=True, target_norm_affine=True)
    ttt = dict(layer=layer, gating="both", input=placement)
    cfg = ActionExpertConfig.tiny(use_ttt=True, ttt=ttt)
    expert = ActionExpert(cfg)
    _open_ttt_gates(expert)
    _, _, _, prefix = make_prefix(cfg)
    x = torch.randn(2, 12, cfg.width)
    cond = torch.randn(2, cfg.width, requires_grad=True)
    expert(x, cond, prefix).pow(2).mean().backward()
    names = expert.ttt_parameter_names()
    assert names
    for name, p in expert.named_parameters():
        if name in names:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert cond.grad is not None and torch.count_nonzero(cond.grad) > 0
    # ... and the time condition gets a gradient through the TTT branch itself
    cond_only = cond.detach().requires_grad_()
    y, gate = expert.layers[0].ttt(torch.randn(2, 12, cfg.width), cond_only)
    (y * gate).pow(2).mean().backward()
    assert torch.count_nonzero(cond_only.grad) > 0


def test_zero_started_gate_still_learns():
    """At the exact start the TTT weights get no gradient but the gate's dense does."""
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    pol = FlowMatchingPolicy(cfg)
    pol.loss(torch.randn(2, cfg.action_horizon, cfg.action_dim)).backward()
    dense = pol.expert.layers[0].ttt.norm.dense
    gate_rows = slice(2 * cfg.width, 3 * cfg.width)
    assert torch.count_nonzero(dense.bias.grad[gate_rows]) > 0


@pytest.mark.parametrize("A", [8, 16, 32, 64], ids=lambda a: f"A{a}")
def test_sequence_lengths_cached_prefix_matches_joint_attention(A):
    cfg = ActionExpertConfig.tiny(use_ttt=True, action_horizon=A)
    expert = ActionExpert(cfg)
    _open_ttt_gates(expert)
    enc, feats, pad, prefix = make_prefix(cfg)
    x, cond = torch.randn(2, A, cfg.width), torch.randn(2, cfg.width)
    cached = expert(x, cond, prefix)
    _, joint = joint_forward(enc, expert, feats, x, cond, pad)
    assert cached.shape == (2, A, cfg.width) and torch.isfinite(cached).all()
    torch.testing.assert_close(cached, joint, rtol=1e-4, atol=1e-5)


def test_actions_never_influence_the_prefix():
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    expert = ActionExpert(cfg)
    _open_ttt_gates(expert)
    enc, feats, pad, _ = make_prefix(cfg)
    cond = torch.randn(2, cfg.width)
    x1, x2 = torch.randn(2, 16, cfg.width), torch.randn(2, 16, cfg.width)
    p1, a1 = joint_forward(enc, expert, feats, x1, cond, pad)
    p2, a2 = joint_forward(enc, expert, feats, x2, cond, pad)
    # every real prefix token is bit-identical (padding rows are fully masked: openpi gives them
    # uniform attention over all keys, their values are never read by anyone)
    assert torch.equal(p1[pad], p2[pad])
    assert not torch.allclose(a1, a2)
    # the prefix the expert sees alone (encoder without actions) is the joint run's prefix
    _, alone = enc.encode(feats, pad)
    torch.testing.assert_close(p1[pad], alone[pad], rtol=1e-5, atol=1e-6)
    # and the actions do depend on the prefix
    _, a3 = joint_forward(enc, expert, feats + 1.0, x1, cond, pad)
    assert not torch.allclose(a1, a3)


def test_pi05_mask_against_a_loop():
    pad = torch.tensor([[True, True, False], [True, True, True]])
    A = 4
    got = pi05_attention_mask(pad, A)
    for b in range(2):
        for i in range(3 + A):
            for j in range(3 + A):
                real_i = i >= 3 or bool(pad[b, i])
                real_j = j >= 3 or bool(pad[b, j])
                allowed = (i >= 3) or (j < 3)  # prefix rows never see action columns
                assert bool(got[b, i, j]) == (real_i and real_j and allowed), (b, i, j)


def test_ttt_branch_is_permutation_equivariant_over_action_tokens():
    cfg = ActionExpertConfig.tiny(use_ttt=True, ttt=dict(layer=dict(inner="mlp")))
    branch = ActionExpert(cfg).layers[0].ttt
    _open_ttt_gates(branch)
    h, cond = torch.randn(2, 16, cfg.width), torch.randn(2, cfg.width)
    perm = torch.randperm(16)
    y, gate = branch(h, cond)
    y_perm, gate_perm = branch(h[:, perm], cond)
    assert torch.count_nonzero(y) > 0
    torch.testing.assert_close(y_perm, y[:, perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate_perm, gate)


def test_dual_and_primal_forms_agree():
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    dual = ActionExpert(cfg)
    primal = ActionExpert(cfg.replace(ttt=dict(layer=dict(use_dual_form=False))))
    primal.load_state_dict(dual.state_dict())
    _open_ttt_gates(dual)
    primal.load_state_dict(dual.state_dict())
    x, cond = torch.randn(2, 16, cfg.width), torch.randn(2, cfg.width)
    torch.testing.assert_close(primal(x, cond), dual(x, cond), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(use_ttt=True, ttt=dict(layer_positions=[0, 5])), "layer index 5"),
        (dict(use_ttt=True, ttt=dict(layer_positions=[-1])), "layer index -1"),
        (dict(use_ttt=True, ttt=dict(layer_positions="some")), "layer_positions"),
        (dict(use_ttt=True, ttt=dict(layer_positions=[0, 0])), "duplicates"),
        (dict(use_ttt=True, ttt=dict(layer=dict(inner="conv"))), "inner"),
        (dict(use_ttt=True, ttt=dict(input="mlp_out")), "input"),
        (dict(use_ttt=True, ttt=dict(layer=dict(gate="gelu"))), "ttt.gating"),
        (dict(use_ttt=True, ttt=dict(layer=dict(heads=2))), r"ttt\.layer\.heads.*unknown key"),
        (dict(use_ttt=True, ttt=dict(gating="sigmoid")), "gating"),
        (dict(use_adarms=False, use_ttt=True), "use_adarms"),
        (dict(num_heads=3), "num_kv_heads|num_heads"),
        (dict(width=0), "width"),
    ],
    ids=[
        "index",
        "negative",
        "string",
        "dup",
        "type",
        "input",
        "gate",
        "unknown",
        "gating",
        "adarms",
        "heads",
        "width",
    ],
)
def test_bad_config_raises(changes, match):
    changes = dict(changes)
    if "ttt" in changes:
        changes["ttt"] = TTTOptions(**changes["ttt"])
    with pytest.raises(ValueError, match=match):
        ActionExpertConfig.tiny(**changes)


def test_gemma_300m_preset_has_a_narrow_ttt_branch_by_default():
    """gemma_300m's TTT branch is 8 heads of 64 (width 512, half the expert's); dict changes merge
    into that default, a TTTOptions replaces it (no heads / head dim given: the full width)."""
    cfg = ActionExpertConfig.gemma_300m(use_ttt=True)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        1024, 18, 8, 1, 256,
    )  # fmt: skip
    layer = cfg.ttt_layer_config()
    assert (layer.num_heads, layer.head_dim, layer.mini_batch_size, layer.causal) == (
        8, 64, None, False,
    )  # fmt: skip
    assert cfg.ttt_layers() == tuple(range(18))
    assert cfg.replace(ttt=dict(gating="both")).ttt_layer_config().head_dim == 64  # kept
    assert cfg.replace(ttt=dict(gating="both")).ttt_layer_config().gate == "tanh_alpha"
    mlp = ActionExpertConfig.gemma_300m(ttt=dict(layer=dict(inner="mlp"))).ttt_layer_config()
    assert (mlp.inner, mlp.num_heads, mlp.head_dim) == ("mlp", 8, 64)
    full = ActionExpertConfig.gemma_300m(use_ttt=True, ttt=dict(layer=dict(head_dim=128)))
    assert (full.ttt_layer_config().num_heads, full.ttt_layer_config().head_dim) == (8, 128)
    own = ActionExpertConfig.gemma_300m(use_ttt=True, ttt=TTTOptions(layer=dict(inner="mlp")))
    assert own.ttt_layer_config().head_dim == 128  # 1024 / 8: the full width
    assert ActionExpertConfig.tiny(use_ttt=True).ttt_layer_config().head_dim == 16
    branch = TTTBranch(cfg.width, cfg.width, cfg.ttt, layer, cfg.rms_eps)
    assert branch.layer.config.inner_width == 512
    assert tuple(branch.layer.inner.W1.shape) == (8, 64, 64)  # per-head fast weights
    y, gate = branch(torch.randn(1, 50, cfg.width), torch.randn(1, cfg.width))
    assert y.shape == (1, 50, cfg.width) and gate.shape == (1, 1, cfg.width)


def test_ttt_options_nest_a_ttt_config():
    """A full TTTConfig may be given; it must fit the expert's width and the gating."""
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    given = TTTConfig(hidden_size=64, num_heads=2, mini_batch_size=None, causal=False)
    assert cfg.replace(ttt=TTTOptions(layer=given)).ttt_layer_config() is given
    branch = ActionExpert(cfg.replace(ttt=TTTOptions(layer=given))).layers[0].ttt
    assert branch.layer.config is given
    with pytest.raises(ValueError, match="width"):
        cfg.replace(ttt=TTTOptions(layer=TTTConfig(hidden_size=32, num_heads=2)))
    with pytest.raises(ValueError, match=r"ttt\.gating"):
        cfg.replace(ttt=TTTOptions(layer=given, gating="both"))


@pytest.mark.parametrize(
    "old,new",
    [
        ("layer_type", "layer.inner"),
        ("head_dim", "layer.head_dim"),
        ("gate_init", "layer.gate_init"),
    ],
)
def test_old_ttt_option_spellings_give_the_new_one(old, new):
    with pytest.raises(TypeError, match=rf"ttt\.{old} -> ttt\.{new}"):
        TTTOptions(**{old: 1})
    with pytest.raises(TypeError, match=rf"ttt\.{old} -> ttt\.{new}"):
        ActionExpertConfig.tiny(use_ttt=True, ttt={old: 1})


def test_bad_inputs_raise():
    cfg = ActionExpertConfig.tiny(use_ttt=True)
    expert = ActionExpert(cfg)
    x = torch.randn(2, 8, cfg.width)
    with pytest.raises(ValueError, match="cond"):
        expert(x, torch.randn(2, cfg.width + 1))
    with pytest.raises(ValueError, match="x"):
        expert(torch.randn(2, 8, cfg.width + 1), torch.randn(2, cfg.width))
    deeper = ActionExpertConfig.tiny(depth=3)
    _, _, _, prefix = make_prefix(deeper)
    with pytest.raises(ValueError, match="prefix"):
        expert(x, torch.randn(2, cfg.width), prefix)
