"""The real prefix: PaliGemma on transformers' modules, openpi's image preprocessing and prompt."""

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
    lm(inputs_embeds=embs, cache=cache, use_cache=True)
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
