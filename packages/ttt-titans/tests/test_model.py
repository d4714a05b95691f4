"""Forecaster, meta-learner ranges, optimiser contents, backbones, configs."""

from __future__ import annotations

import pytest
import torch

from ttt_titans.backbones import build_backbone
from ttt_titans.config import (
    ExperimentConfig,
    MemoryConfig,
    MetaConfig,
    ModelConfig,
    apply_overrides,
    from_dict,
    list_packaged_configs,
    load_config,
)
from ttt_titans.meta import MetaLearner
from ttt_titans.model import ContinualForecaster


@pytest.mark.parametrize("scale", [0.0, 1.0, 100.0])
def test_meta_learner_outputs_in_range(scale):
    torch.manual_seed(0)
    cfg = MetaConfig(hidden=16)
    meta = MetaLearner(16, 3, cfg)
    h = scale * torch.randn(4, 30, 16)
    with torch.no_grad():
        meta.net[-1].weight.normal_(0, 5.0)  # push pre-activations to saturation
    theta, eta, alpha = meta(h)
    for t, (lo, hi) in zip((theta, eta, alpha), (cfg.theta_range, cfg.eta_range, cfg.alpha_range)):
        assert t.shape == (4, 3, 30)
        assert (t >= lo).all() and (t <= hi).all()
    assert theta.min() >= 1e-5 and theta.max() <= 1e-2
    assert eta.min() >= 0.8 and eta.max() <= 0.99


@pytest.mark.parametrize("saturate", [False, True], ids=["random", "saturated"])
def test_meta_learner_fp64_rates_follow_the_formula_exactly(saturate):
    """In fp64, rate = lo + (hi - lo) sigmoid(z) with the config's numbers (not fp32-rounded
    ones), inside [lo, hi] even where the sigmoid saturates."""
    torch.manual_seed(0)
    cfg = MetaConfig(hidden=8)
    meta = MetaLearner(8, 2, cfg).double()
    h = torch.randn(3, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        meta.net[-1].weight.normal_(0, 5.0)
        if saturate:  # theta's sigmoid at 1.0, eta's and alpha's at ~4e-18
            meta.net[-1].weight.zero_()
            meta.net[-1].bias.copy_(torch.tensor([40.0, 40.0, -40.0, -40.0, -40.0, -40.0]))
        z = meta.net(h)  # (B, L, 3H)
        rates = meta(h)
    sig = torch.sigmoid(z).view(3, 7, 3, 2).permute(2, 0, 3, 1)  # (3, B, H, L)
    ranges = (cfg.theta_range, cfg.eta_range, cfg.alpha_range)
    for i, (rate, (lo, hi)) in enumerate(zip(rates, ranges)):
        assert rate.dtype == torch.float64
        expected = (lo + (hi - lo) * sig[i]).clamp(lo, hi)
        torch.testing.assert_close(rate, expected, rtol=4e-16, atol=0)
        assert rate.min().item() >= lo and rate.max().item() <= hi
    if saturate:  # the bounds themselves, exactly
        assert rates[0].min().item() == 1e-2 and rates[1].max().item() == 0.8


def test_meta_learner_initial_alpha():
    meta = MetaLearner(8, 2, MetaConfig(alpha_init=0.01))
    with torch.no_grad():
        meta.net[-1].weight.zero_()
    _, eta, alpha = meta(torch.randn(1, 5, 8))
    torch.testing.assert_close(alpha, torch.full_like(alpha, 0.01))
    torch.testing.assert_close(eta, torch.full_like(eta, (0.8 + 0.99) / 2))
    with pytest.raises(ValueError, match="alpha_init"):
        MetaLearner(8, 2, MetaConfig(alpha_init=2.0))


@pytest.mark.parametrize("mode", ["simple_ttt", "meta_ttt"])
def test_memory_weights_not_in_optimizer(mode):
    cfg = ExperimentConfig(mode=mode, memory=MemoryConfig(inner="mlp"))
    model = ContinualForecaster(cfg, 3, 2)
    opt = torch.optim.AdamW(model.outer_parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    mem = model.memory
    for t in mem.fast_weights():
        assert id(t) not in in_opt and not t.requires_grad
    names = {n for n, _ in model.named_buffers()}
    assert {"memory.W1", "memory.b1", "memory.W2", "memory.b2"} <= names
    # every trainable parameter is in the optimiser
    assert in_opt == {id(p) for p in model.parameters()}
    # a training step leaves the memory's initial weights bit-identical
    before = [t.clone() for t in mem.fast_weights()]
    x, y = torch.randn(8, cfg.data.lookback, 3), torch.randn(8, cfg.data.horizon, 1)
    pred, _ = model(x)
    ((pred - y) ** 2).mean().backward()
    opt.step()
    for a, b in zip(before, mem.fast_weights()):
        assert torch.equal(a, b)


def test_meta_mode_gradients_reach_meta_learner():
    torch.manual_seed(0)
    cfg = ExperimentConfig(mode="meta_ttt")
    model = ContinualForecaster(cfg, 3, 2)
    x, y = torch.randn(4, cfg.data.lookback, 3), torch.randn(4, cfg.data.horizon, 1)
    pred, _ = model(x)
    ((pred - y) ** 2).mean().backward()
    g = model.meta.net[-1].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_baseline_has_no_memory_and_modes_differ():
    torch.manual_seed(0)
    base = ContinualForecaster(ExperimentConfig(mode="baseline"), 3, 2)
    assert base.memory is None and base.meta is None
    simple = ContinualForecaster(ExperimentConfig(mode="simple_ttt"), 3, 2)
    assert simple.meta is None and simple.memory is not None


@pytest.mark.parametrize("kind", ["lstm", "transformer", "titans"])
def test_backbones_are_causal(kind):
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(backbone=kind, d_model=16, n_heads=4, window=4))
    e = torch.randn(2, 12, 16)
    h = bb(e)
    e2 = e.clone()
    e2[:, 7:] += torch.randn(2, 5, 16)  # changing the future must not change the past
    h2 = bb(e2)
    assert h.shape == (2, 12, 16)
    torch.testing.assert_close(h[:, :7], h2[:, :7])
    assert not torch.allclose(h[:, 7:], h2[:, 7:])


def test_titans_backbone_window_limits_attention():
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(backbone="titans", d_model=16, n_heads=4, window=3))
    e = torch.randn(1, 10, 16)
    e2 = e.clone()
    e2[:, 2] += torch.randn(16)  # step 2 is outside the window of steps >= 5 (one layer)
    h, h2 = bb(e), bb(e2)
    torch.testing.assert_close(h[:, 5:], h2[:, 5:])
    assert not torch.allclose(h[:, 2:5], h2[:, 2:5])


def test_packaged_configs_load_and_overrides():
    assert {"base.yaml", "exp_baseline.yaml", "exp_simple_ttt.yaml", "exp_meta_ttt.yaml"} <= set(
        list_packaged_configs()
    )
    for mode in ("baseline", "simple_ttt", "meta_ttt"):
        cfg = load_config(f"configs/exp_{mode}.yaml")
        assert cfg.mode == mode
    cfg = load_config("exp_meta_ttt.yaml", ["train.epochs=5", "memory.chunk=4", "data.path=x.csv"])
    assert cfg.train.epochs == 5 and cfg.memory.chunk == 4 and cfg.data.path == "x.csv"
    with pytest.raises(
        ValueError, match=r"'train\.epoch': unknown key \(did you mean 'train\.epochs'"
    ):
        load_config("base.yaml", ["train.epoch=5"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ValueError, match=r"config key 'mode': got 'fancy'; accepts one of"):
        from_dict({"mode": "fancy"})
    with pytest.raises(ValueError, match="no packaged config"):
        load_config("missing.yaml")


def test_config_file_with_base_chain(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: base.yaml\nmode: simple_ttt\nmodel:\n  d_model: 8\n")
    # base.yaml is not next to mine.yaml -> falls back to the packaged base
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.mode == "simple_ttt" and cfg.model.d_model == 8 and cfg.data.lookback == 48
