"""The real prefix: PaliGemma on transformers' modules, openpi's image preprocessing and prompt."""

import inspect

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.cache_utils import DynamicCache

from ttt_gemma import ActionExpertConfig
from ttt_gemma.paligemma import (
    PaliGemmaPrefix,
    PaliGemmaPrefixConfig,
    Pi05Policy,
    preprocess_images,
    state_prompt,
    tokenize,
)

EXPERT = ActionExpertConfig.tiny(depth=3, use_ttt=True, ttt=dict(input="attn_output"))
PREFIX = PaliGemmaPrefixConfig.tiny(EXPERT)


def observation(batch=2, cams=2, tokens=5):
    images = torch.rand(batch, cams, 3, PREFIX.image_size, PREFIX.image_size) * 2 - 1
    image_masks = torch.ones(batch, cams, dtype=torch.bool)
    ids = torch.randint(0, PREFIX.vocab_size - 1, (batch, tokens))
    token_masks = torch.ones(batch, tokens, dtype=torch.bool)
    return images, image_masks, ids, token_masks


def test_prefix_kv_equals_transformers_gemma_model_with_a_cache():
    """Without padding the prefix is one bidirectional block: transformers' own GemmaModel
    (bidirectional config) on the same embeddings caches the same rotated K/V per layer."""
    prefix = PaliGemmaPrefix(PREFIX)
    obs = observation()
    kv = prefix(*obs)
    embs, pad = prefix.embed(*obs)
    assert pad.all() and embs.shape[1] == 2 * (PREFIX.image_size // PREFIX.patch_size) ** 2 + 5
    lm = prefix.paligemma.model.language_model
    cache = DynamicCache(config=lm.config)
    # the cache argument's name: `cache` in recent transformers 5.x, `past_key_values` before
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    lm(inputs_embeds=embs, use_cache=True, **{name: cache})
    for i in range(PREFIX.depth):
        torch.testing.assert_close(kv.keys[i], cache.layers[i].keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(kv.values[i], cache.layers[i].values, rtol=1e-5, atol=1e-5)
    # prompt tokens are Gemma's embedding x sqrt(width); image tokens the projector's output
    raw = lm.embed_tokens.weight[obs[2]]
    torch.testing.assert_close(embs[:, -5:], raw * PREFIX.width**0.5)


def test_missing_camera_and_padding_do_not_reach_real_tokens():
    prefix = PaliGemmaPrefix(PREFIX)
    images, image_masks, ids, token_masks = observation()
    image_masks[0, 1] = False  # sample 0 has no second camera
    token_masks[0, -2:] = False
    kv = prefix(images, image_masks, ids, token_masks)
    images2, ids2 = images.clone(), ids.clone()
    images2[0, 1] = torch.rand_like(images2[0, 1])  # change what is masked
    ids2[0, -2:] = (ids2[0, -2:] + 1) % (PREFIX.vocab_size - 1)
    kv2 = prefix(images2, image_masks, ids2, token_masks)
    real = kv.pad_mask[0]
    assert (~real).sum() == (PREFIX.image_size // PREFIX.patch_size) ** 2 + 2
    for k, k2 in zip(kv.keys, kv2.keys):
        torch.testing.assert_close(k[0][:, real], k2[0][:, real], rtol=0, atol=1e-6)


def test_a_camera_missing_in_the_whole_batch_is_not_encoded():
    """Sample 0 alone (its second camera masked: the vision tower skips it) gives the real tokens'
    K/V of sample 0 in a batch where another sample has that camera (the tower runs on it)."""
    prefix = PaliGemmaPrefix(PREFIX)
    images, image_masks, ids, token_masks = observation()
    image_masks[0, 1] = False  # sample 1 keeps its second camera
    both = prefix(images, image_masks, ids, token_masks)
    alone = prefix(images[:1], image_masks[:1], ids[:1], token_masks[:1])
    real = alone.pad_mask[0]
    assert torch.equal(real, both.pad_mask[0]) and (~real).sum() > 0
    for k, k1 in zip(both.keys, alone.keys):
        torch.testing.assert_close(k1[0][:, real], k[0][:, real], rtol=0, atol=1e-6)
    for v, v1 in zip(both.values, alone.values):
        torch.testing.assert_close(v1[0][:, real], v[0][:, real], rtol=0, atol=1e-6)


def test_preprocess_images_resizes_with_padding():
    img = torch.full((1, 100, 200, 3), 255, dtype=torch.uint8)  # a white 1:2 image
    out = preprocess_images(img)
    assert out.shape == (1, 3, 224, 224)
    # 200 -> 224 wide, 100 -> 112 high, centred: 56 black rows above and below
    assert torch.equal(out[0, :, :56], torch.full((3, 56, 224), -1.0))
    assert torch.equal(out[0, :, 168:], torch.full((3, 56, 224), -1.0))
    torch.testing.assert_close(out[0, :, 56:168], torch.ones(3, 112, 224))
    half = torch.full((1, 224, 224, 3), 0.25)  # float images in [0, 1]: no resize
    torch.testing.assert_close(preprocess_images(half), torch.full((1, 3, 224, 224), -0.5))


def test_state_prompt_discretises_into_256_bins():
    prompt = state_prompt("pick_up the\ncube ", np.array([-1.0, 0.0, 0.999, -0.99]))
    # bin j covers [-1 + j/128, -1 + (j+1)/128)
    assert prompt == "Task: pick up the cube, State: 0 128 255 1;\nAction: "


def _tokenizer():
    words = ["<pad>", "<unk>", "Task:", "pick", "up", "the", "cube,", "State:", "0", "128", "255",
             "1;", "Action:"]  # fmt: skip
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_whole_policy_from_images_prompt_and_state():
    torch.manual_seed(0)
    model = Pi05Policy(PREFIX, EXPERT)
    prompts = [state_prompt("pick up the cube", np.array([0.0, 0.999])),
               state_prompt("pick up the cube", np.array([-1.0]))]  # fmt: skip
    ids, masks = tokenize(_tokenizer(), prompts, max_length=12)
    assert masks.sum(1).tolist() == [9, 8] and ids[0, :3].tolist() == [2, 3, 4]
    raw = torch.randint(0, 256, (2, 40, 30, 3), dtype=torch.uint8)
    images = torch.stack([preprocess_images(raw, PREFIX.image_size)] * 2, dim=1)  # 2 cameras
    image_masks = torch.tensor([[True, True], [True, False]])
    actions = torch.randn(2, EXPERT.action_horizon, EXPERT.action_dim)
    loss = model.loss(images, image_masks, ids, masks, actions)
    loss.backward()
    vision = model.prefix.paligemma.model.vision_tower
    assert next(vision.parameters()).grad.abs().sum() > 0  # the VLM trains too
    chunk = model.sample(images, image_masks, ids, masks)
    assert chunk.shape == actions.shape and chunk.isfinite().all()
    with pytest.raises(ValueError, match="head_dim"):
        Pi05Policy(PaliGemmaPrefixConfig.tiny(EXPERT, head_dim=8), EXPERT)


def openpi_vlm_tensors(cfg: PaliGemmaPrefixConfig, prefix: str) -> dict:
    """openpi's PaliGemma tensors (transformers 4.x names), spelled out by hand, random values.

    The token embedding is tied to ``lm_head``: openpi's files (``safetensors.torch.save_model``)
    hold it once, under the first name in sorted order, ``lm_head.weight``."""
    V, W, M, D = cfg.vision_width, cfg.width, cfg.mlp_dim, cfg.head_dim
    p = prefix + "paligemma_with_expert.paligemma."
    vis = p + "model.vision_tower.vision_model."
    n_patch = (cfg.image_size // cfg.patch_size) ** 2
    out = {
        vis + "embeddings.patch_embedding.weight": torch.randn(
            V, 3, cfg.patch_size, cfg.patch_size
        ),
        vis + "embeddings.patch_embedding.bias": torch.randn(V),
        vis + "embeddings.position_embedding.weight": torch.randn(n_patch, V),
        vis + "post_layernorm.weight": torch.randn(V),
        vis + "post_layernorm.bias": torch.randn(V),
        p + "model.multi_modal_projector.linear.weight": torch.randn(W, V),
        p + "model.multi_modal_projector.linear.bias": torch.randn(W),
        p + "lm_head.weight": torch.randn(cfg.vocab_size, W),
        p + "model.language_model.norm.weight": torch.randn(W),
    }
    for i in range(cfg.vision_depth):
        L = f"{vis}encoder.layers.{i}."
        for n in ("layer_norm1", "layer_norm2"):
            out[L + f"{n}.weight"], out[L + f"{n}.bias"] = torch.randn(V), torch.randn(V)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[L + f"self_attn.{n}.weight"], out[L + f"self_attn.{n}.bias"] = (
                torch.randn(V, V),
                torch.randn(V),
            )
        out[L + "mlp.fc1.weight"], out[L + "mlp.fc1.bias"] = (
            torch.randn(cfg.vision_mlp_dim, V),
            torch.randn(cfg.vision_mlp_dim),
        )
        out[L + "mlp.fc2.weight"], out[L + "mlp.fc2.bias"] = (
            torch.randn(V, cfg.vision_mlp_dim),
            torch.randn(V),
        )
    for i in range(cfg.depth):
        L = f"{p}model.language_model.layers.{i}."
        out[L + "self_attn.q_proj.weight"] = torch.randn(cfg.num_heads * D, W)
        out[L + "self_attn.k_proj.weight"] = torch.randn(cfg.num_kv_heads * D, W)
        out[L + "self_attn.v_proj.weight"] = torch.randn(cfg.num_kv_heads * D, W)
        out[L + "self_attn.o_proj.weight"] = torch.randn(W, cfg.num_heads * D)
        out[L + "mlp.gate_proj.weight"] = torch.randn(M, W)
        out[L + "mlp.up_proj.weight"] = torch.randn(M, W)
        out[L + "mlp.down_proj.weight"] = torch.randn(W, M)
        out[L + "input_layernorm.weight"] = torch.randn(W)
        out[L + "post_attention_layernorm.weight"] = torch.randn(W)
    return out


@pytest.mark.parametrize("naming,prefix", [("openpi", ""), ("lerobot", "model.")])
def test_whole_checkpoint_loads_strictly_and_round_trips(tmp_path, naming, prefix):
    from safetensors.torch import load_file, save_file
    from test_checkpoint import pi05_tensors

    from ttt_gemma import load_pi05, save_pi05

    tensors = {**pi05_tensors(EXPERT, prefix), **openpi_vlm_tensors(PREFIX, prefix)}
    # openpi's expert has an (unused) lm_head of the VLM's vocabulary
    expert_head = prefix + "paligemma_with_expert.gemma_expert.lm_head.weight"
    tensors[expert_head] = torch.randn(PREFIX.vocab_size, EXPERT.width)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    model = Pi05Policy(PREFIX, EXPERT)
    report = load_pi05(model, path)
    assert report.naming == naming and report.missing_ttt
    state = model.state_dict()
    vis = (
        prefix
        + "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"
    )
    assert torch.equal(
        state["prefix.paligemma.model.vision_tower.encoder.layers.1.mlp.fc2.weight"], tensors[vis]
    )
    head = prefix + "paligemma_with_expert.paligemma.lm_head.weight"
    emb = "prefix.paligemma.model.language_model.embed_tokens.weight"
    assert torch.equal(state[emb], tensors[head])  # the tied embedding, stored once
    assert len(report.loaded) == len(state) - len(report.missing_ttt)  # every other tensor
    # save -> the same key set as the hand-made file (a strict loader finds nothing missing)
    save_pi05(model, tmp_path / "out.safetensors", naming)
    written = load_file(str(tmp_path / "out.safetensors"))
    assert written.keys() == tensors.keys()
    again = Pi05Policy(PREFIX, EXPERT)
    load_pi05(again, tmp_path / "out.safetensors")
    for k, v in model.state_dict().items():
        if ".ttt." not in k:
            assert torch.equal(v, again.state_dict()[k]), k
    # transformers' save_pretrained keeps the embedding's name instead: loads the same
    hf_style = dict(tensors)
    hf_style[prefix + "paligemma_with_expert.paligemma." + emb[len("prefix.paligemma.") :]] = (
        hf_style.pop(head)
    )
    save_file(hf_style, str(tmp_path / "hf.safetensors"))
    load_pi05(again, tmp_path / "hf.safetensors")
    assert torch.equal(again.state_dict()["prefix.paligemma.lm_head.weight"], tensors[head])
    # untied weights cannot be written as one tensor
    with torch.no_grad():
        again.prefix.paligemma.lm_head.weight = torch.nn.Parameter(torch.randn_like(tensors[head]))
    with pytest.raises(ValueError, match="tie them"):
        save_pi05(again, tmp_path / "untied.safetensors", naming)
    load_pi05(again, tmp_path / "out.safetensors")
    # strict: a missing VLM tensor, or one of the wrong shape, changes nothing
    before = {k: v.clone() for k, v in again.state_dict().items()}
    del written[prefix + "paligemma_with_expert.paligemma.model.multi_modal_projector.linear.bias"]
    save_file(written, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="multi_modal_projector"):
        load_pi05(again, tmp_path / "bad.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in again.state_dict().items())
