"""patch_lm / unpatch_lm / export, attention windows, FSDP wrapping by class."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_KWARGS, make_lm, random_codes
from moshi.models.lm import LMModel
from moshi.modules.transformer import RMSNorm, StreamingTransformerLayer
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from ttt_core import TTTConfig
from ttt_moshi import (
    TTTRMSNorm,
    TTTStreamingTransformerLayer,
    export_plain_state_dict,
    fsdp_wrap_policy,
    patch_lm,
    ttt_config_for,
    ttt_layer_indices,
    ttt_layer_policy,
    unpatch_lm,
)


def test_patch_keeps_weights_and_sets_windows(tiny_lm):
    before = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    w0 = tiny_lm.transformer.layers[1].self_attn.in_projs[0].weight
    patch_lm(
        tiny_lm,
        layers=[1],
        ttt=ttt_config_for(tiny_lm),
        attention_context=100,
        ttt_attention_context=50,
    )
    assert ttt_layer_indices(tiny_lm) == [1]
    assert tiny_lm.transformer.layers[1].self_attn.in_projs[0].weight is w0  # same tensor object
    after = tiny_lm.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert [layer.self_attn.context for layer in tiny_lm.transformer.layers] == [100, 50, 100]
    # the streaming KV ring caches are sized from the windows
    with tiny_lm.streaming(1):
        caps = [
            layer.self_attn._streaming_state.kv_cache.capacity
            for layer in tiny_lm.transformer.layers
        ]
    assert caps == [100, 50, 100]
    assert isinstance(tiny_lm.transformer.layers[1], StreamingTransformerLayer)


def test_local_window_is_enforced_in_one_pass():
    """A token further back than the window cannot change the logits (no TTT: gate 0)."""
    lm = make_lm().eval()
    patch_lm(lm, layers=[], ttt=ttt_config_for(lm), attention_context=3)
    # 3 layers x window 3: receptive field of 3 * (3 - 1) = 6 steps back
    a = random_codes(1, 16)
    b = a.clone()
    b[:, :, 0] = (b[:, :, 0] + 1) % 32
    with torch.no_grad():
        la, lb = lm.forward_text(a)[1], lm.forward_text(b)[1]
    assert torch.equal(la[:, :, 7:], lb[:, :, 7:])
    assert not torch.equal(la[:, :, :7], lb[:, :, :7])


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"layers": [3]}, ValueError, "layers must hold indices"),
        ({"layers": [1, 1]}, ValueError, "duplicates"),
        ({"layers": [0], "attention_context": 0}, ValueError, "attention_context"),
        ({"layers": [0], "ttt_attention_context": -5}, ValueError, "ttt_attention_context"),
        ({"layers": [0], "attention_context": {7: 10}}, ValueError, "layer index 7"),
    ],
)
def test_patch_rejects_bad_arguments(tiny_lm, kwargs, err, match):
    with pytest.raises(err, match=match):
        patch_lm(tiny_lm, ttt=ttt_config_for(tiny_lm), **kwargs)


def test_patch_rejects_wrong_width_and_non_causal(tiny_lm):
    with pytest.raises(ValueError, match="hidden_size=64"):
        patch_lm(tiny_lm, layers=[0], ttt=TTTConfig(hidden_size=64, num_heads=4))
    with pytest.raises(ValueError, match="causal"):
        patch_lm(tiny_lm, layers=[0], ttt=TTTConfig(hidden_size=32, num_heads=4, causal=False))
    with pytest.raises(TypeError, match="TTTConfig"):
        patch_lm(tiny_lm, layers=[0], ttt={"hidden_size": 32})
    patch_lm(tiny_lm, layers=[0], ttt=ttt_config_for(tiny_lm))
    with pytest.raises(ValueError, match="already has a TTT block"):
        patch_lm(tiny_lm, layers=[0], ttt=ttt_config_for(tiny_lm))
    with tiny_lm.streaming(1), pytest.raises(ValueError, match="streaming"):
        patch_lm(tiny_lm, layers=[1], ttt=ttt_config_for(tiny_lm))


def test_export_loads_into_plain_moshi_and_unpatch_restores():
    lm = make_lm(4).eval()
    patch_lm(
        lm,
        layers=[0, 2],
        ttt=ttt_config_for(lm, gate_init=0.0),
        attention_context=10,
        ttt_attention_context=5,
    )
    with torch.no_grad():  # train-like change of Moshi weights
        lm.transformer.layers[2].norm2.alpha.mul_(1.5)
    codes = random_codes(2, 17)
    with torch.no_grad():
        ref = lm(codes)
    sd = export_plain_state_dict(lm)
    assert not any(".ttt." in k or "norm_ttt" in k for k in sd)
    plain = LMModel(**TINY_KWARGS).eval()
    plain.load_state_dict(sd, strict=True)  # plain Moshi loads the export
    for i, c in enumerate([5, 10, 5]):
        plain.transformer.layers[i].self_attn.context = c
    with torch.no_grad():
        got = plain(codes)
    assert torch.equal(ref.text_logits.nan_to_num(), got.text_logits.nan_to_num())
    assert unpatch_lm(lm) == [0, 2]
    assert all(type(m) is StreamingTransformerLayer for m in lm.transformer.layers)
    assert set(lm.state_dict()) == set(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(lm(codes).logits.nan_to_num(), ref.logits.nan_to_num())


def test_fsdp_policies_find_layers_by_class(tiny_lm):
    patch_lm(tiny_lm, layers=[0, 2], ttt=ttt_config_for(tiny_lm))
    policy = fsdp_wrap_policy()
    assert isinstance(policy, ModuleWrapPolicy)
    to_wrap = policy._run_policy(tiny_lm, set(), {})
    wrapped = {id(m) for m in to_wrap if m is not tiny_lm}
    layers = [*tiny_lm.transformer.layers, *tiny_lm.depformer.layers]
    assert wrapped == {id(m) for m in layers}  # every Moshi layer, TTT ones included
    # the lambda policy selects exactly the TTT layers
    policy_fn = ttt_layer_policy()
    chosen = [m for m in tiny_lm.modules() if policy_fn(m, recurse=False, nonwrapped_numel=0)]
    assert chosen == [tiny_lm.transformer.layers[0], tiny_lm.transformer.layers[2]]
    assert all(isinstance(m, TTTStreamingTransformerLayer) for m in chosen)
    assert all(getattr(m, "_fsdp_final", False) for m in chosen)  # moshi's FSDP marker kept


@pytest.mark.parametrize("dtype", [torch.float32, None])
def test_ttt_rms_norm_equals_moshi_rms_norm(dtype):
    """The TTT pre-norm (fewer ops) computes Moshi's RMSNorm: same bits in fp32; a bf16 input on
    an fp32 norm takes Moshi's own path (cast, fp32 math, cast back)."""
    torch.manual_seed(0)
    ref = RMSNorm(48, eps=1e-5, dtype=dtype)
    with torch.no_grad():
        ref.alpha.uniform_(0.5, 1.5)
    lean = RMSNorm(48, eps=1e-5, dtype=dtype)
    lean.load_state_dict(ref.state_dict())
    lean.__class__ = TTTRMSNorm
    x = torch.randn(3, 7, 48) * 4
    assert torch.equal(lean(x), ref(x))
    xb = x.to(torch.bfloat16)
    if dtype is not None:
        assert lean(xb).dtype == torch.bfloat16
        assert torch.equal(lean(xb), ref(xb))
    with pytest.raises(ValueError, match="x \\[B, T, C\\]"):
        lean(x[0])


def test_patched_layer_uses_the_lean_norm(tiny_lm):
    patch_lm(tiny_lm, layers=[1], ttt=ttt_config_for(tiny_lm))
    layer = tiny_lm.transformer.layers[1]
    assert type(layer.norm1) is RMSNorm
    assert type(layer.norm_ttt) is TTTRMSNorm
    assert torch.equal(layer.norm_ttt.alpha, torch.ones_like(layer.norm1.alpha))
