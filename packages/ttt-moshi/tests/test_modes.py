"""What trains and how: TTT-only, LoRA, bf16, gradient checkpointing, loss weights, gates."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KWARGS, make_lm, random_codes

from ttt_moshi import (
    FinetuneConfig,
    Trainer,
    get_ttt_gates,
    load_checkpoint,
    merge_lora,
    patch_lm,
    save_shard,
    set_attention_contexts,
    set_ttt_gates,
    token_losses,
    ttt_config_for,
)
from ttt_moshi.losses import LossWeights


@pytest.fixture
def base(tmp_path):
    shard = save_shard(tmp_path / "train.npz", random_codes(4, 45, seed=3))
    return {
        "run_dir": str(tmp_path / "run"),
        "data": {"train_data": [str(shard)]},
        "duration_sec": 1.6,  # 20 steps
        "batch_size": 2,
        "max_steps": 5,
        "log_freq": 100,
        "optim": {"lr": 1e-2, "pct_start": 0.4},
        "model": {"lm_kwargs": TINY_KWARGS},
        "ttt": {"layers": [1], "config": {"mini_batch_size": 4, "gate_init": 0.1}},
        "attention_context": 10,
        "ttt_attention_context": 5,
    }


def _cfg(base, **changes):
    return FinetuneConfig.from_dict(json.loads(json.dumps({**base, **changes})))


def _trained(cfg, steps=None):
    tr = Trainer(cfg, progress=False)
    before = {n: p.detach().clone() for n, p in tr.lm.named_parameters()}
    tr.fit(max_steps=steps)
    return tr, before


def test_ttt_only_leaves_every_other_parameter_bit_identical(base):
    cfg = _cfg(base, full_finetuning=False, train_modules=["out_norm.*"])
    tr, before = _trained(cfg)
    trained = {n for n, p in tr.lm.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("transformer.layers.1.", "out_norm.")) for n in trained)
    assert {n for n in trained if ".ttt." in n or ".norm_ttt." in n}
    for n, p in tr.lm.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), n  # it did train
        else:
            assert torch.equal(p, before[n]), n
    with pytest.raises(ValueError, match=r"train_modules\[0\]'.*matches no parameter"):
        Trainer(_cfg(base, full_finetuning=False, train_modules=["nope.*"]), progress=False)


def test_lora_starts_exact_trains_only_adapters_and_merges(base):
    plain = make_lm(0).eval()
    cfg = _cfg(
        base,
        full_finetuning=False,
        ttt={"layers": []},
        lora={"enable": True, "rank": 3, "scaling": 2.0},
    )
    torch.manual_seed(0)
    tr = Trainer(cfg, lm=make_lm(0), progress=False)
    set_attention_contexts(plain, 10)
    codes = random_codes(2, 20, seed=21)
    with torch.no_grad():  # B = 0 at the start: the base model's logits, exactly
        assert torch.equal(tr.lm.eval()(codes).text_logits, plain(codes).text_logits)
    before = {n: p.detach().clone() for n, p in tr.lm.named_parameters()}
    tr.fit()
    trained = {n for n, p in tr.lm.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert any("gating" in n for n in trained) and any("self_attn" in n for n in trained)
    for n, p in tr.lm.named_parameters():
        assert torch.equal(p, before[n]) != (n in trained), n
    merged = merge_lora(copy.deepcopy(tr.lm)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        a, b = tr.lm.eval()(codes), merged(codes)
    torch.testing.assert_close(b.text_logits, a.text_logits)
    torch.testing.assert_close(b.logits.nan_to_num(), a.logits.nan_to_num())
    assert not torch.allclose(a.text_logits, plain(codes).text_logits)  # the adapters changed it
    lm2, _ = load_checkpoint(tr.run_dir / "final.pt")  # rebuilt with its adapters
    with torch.no_grad():
        assert torch.equal(lm2.eval()(codes).text_logits, a.text_logits)


def test_gradient_checkpointing_gives_the_same_gradients(base):
    grads = []
    for ckpt in (False, True):
        tr = Trainer(
            _cfg(base, gradient_checkpointing=ckpt, run_dir=f"{base['run_dir']}{ckpt}"),
            progress=False,
        )
        assert tr.lm.transformer.checkpointing is ckpt
        tr.train_step(next(tr._batches))
        grads.append({n: p.grad.clone() for n, p in tr.lm.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_bfloat16_with_checkpointing_trains(base):
    cfg = _cfg(base, param_dtype="bfloat16", gradient_checkpointing=True)
    tr, before = _trained(cfg, steps=3)
    assert {p.dtype for p in tr.lm.parameters()} == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped"] for r in tr.history)
    assert any(not torch.equal(p, before[n]) for n, p in tr.lm.named_parameters())


def test_loss_weights_match_a_direct_weighted_cross_entropy():
    """first_codebook_weight_multiplier and text_padding_weight, against F.cross_entropy on the
    model's own logits with the weights written out."""
    lm = make_lm(2).eval()
    codes = random_codes(3, 16, seed=5)
    codes[:, 0, ::3] = lm.text_padding_token_id
    codes[:, 0, 1::5] = lm.end_of_text_padding_id
    w = LossWeights(
        text=0.7,
        first_codebook=100.0,
        text_padding=0.5,
        text_padding_ids=(lm.text_padding_token_id, lm.end_of_text_padding_id),
    )
    with torch.no_grad():
        out = lm(codes)
        got = token_losses(lm, codes).loss(w)
        unweighted = token_losses(lm, codes).loss()
    tm = out.text_mask[:, 0]  # (B, T)
    tgt = codes[:, 0]
    ce_t = F.cross_entropy(out.text_logits[:, 0][tm].double(), tgt[tm], reduction="none")
    pad = (tgt[tm] == lm.text_padding_token_id) | (tgt[tm] == lm.end_of_text_padding_id)
    wt = torch.where(pad, 0.5, 1.0).double()
    text = (ce_t * wt).sum() / wt.sum()
    num = den = 0.0
    for k in range(lm.dep_q):
        m = out.mask[:, k]
        ce = F.cross_entropy(out.logits[:, k][m].double(), codes[:, 1 + k][m], reduction="none")
        weight = 100.0 if k == 0 else 1.0
        num, den = num + weight * ce.sum(), den + weight * m.sum()
    expected = 0.7 * text + num / den
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(unweighted) != pytest.approx(float(expected), rel=1e-3)


def test_gate_accessors(tiny_lm):
    plain = copy.deepcopy(tiny_lm).eval()
    patch_lm(tiny_lm, [0, 2], ttt_config_for(tiny_lm, mini_batch_size=4, gate_init=0.5))
    gates = get_ttt_gates(tiny_lm)
    assert sorted(gates) == [0, 2] and torch.equal(gates[0], torch.full((32,), 0.5))
    codes = random_codes(1, 12, seed=4)
    tiny_lm.eval()
    with torch.no_grad():
        assert not torch.equal(tiny_lm(codes).text_logits, plain(codes).text_logits)
        set_ttt_gates(tiny_lm, 0.0)  # every block off: the unpatched model (same windows)
        assert torch.equal(tiny_lm(codes).text_logits, plain(codes).text_logits)
    set_ttt_gates(tiny_lm, {2: torch.arange(32.0)})
    assert torch.equal(get_ttt_gates(tiny_lm)[2], torch.arange(32.0))
    assert torch.equal(get_ttt_gates(tiny_lm)[0], torch.zeros(32))
    with pytest.raises(ValueError, match=r"names layer 1; the TTT layers are \[0, 2\]"):
        set_ttt_gates(tiny_lm, {1: 0.0})
    with pytest.raises(ValueError, match=r"alpha\[0\] must be a float or a tensor of shape \[32\]"):
        set_ttt_gates(tiny_lm, {0: torch.zeros(3)})
