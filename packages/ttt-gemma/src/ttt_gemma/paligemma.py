"""pi0.5's real prefix: PaliGemma (transformers' SigLIP vision tower, multi-modal projector and Gemma
language model) turning images and prompt tokens into the per-layer keys/values the expert reads.

- images: openpi's preprocessing (:func:`preprocess_images`): resize with padding to 224 x 224,
  scale to [-1, 1]; one ``[B]`` mask per camera (a missing camera's tokens are padding).
- prompt: ``"Task: <task>, State: <discretised state>;\\nAction: "`` (:func:`state_prompt`, pi0.5's
  state in 256 bins over [-1, 1]); the tokenizer is the caller's (:func:`tokenize`).
- prefix = [image tokens of every camera; prompt tokens], one bidirectional block (pad tokens
  masked), RoPE positions ``cumsum(pad) - 1``. Image tokens are the projector's output, prompt
  tokens Gemma's scaled embedding (``embed_tokens``, x sqrt(width)).

The layers run one by one with transformers' modules (RMSNorm, q/k/v/o projections, RoPE, GeGLU
MLP), collecting each layer's rotated keys and values; the last layer stops after its K/V (its
output is never read). Tested against transformers' ``GemmaModel`` with a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb

from .attention import attend, make_att_2d_masks, positions
from .config import ActionExpertConfig
from .policy import FlowMatchingPolicy
from .prefix import PrefixKV

IMAGE_SIZE = 224


@dataclass
class PaliGemmaPrefixConfig:
    """Sizes of the PaliGemma prefix (defaults: pi0.5's PaliGemma 2B with SigLIP So400m/14)."""

    vision_width: int = 1152
    vision_mlp_dim: int = 4304
    vision_depth: int = 27
    vision_heads: int = 16
    patch_size: int = 14
    image_size: int = IMAGE_SIZE
    width: int = 2048  # Gemma language model
    depth: int = 18
    mlp_dim: int = 16_384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257_152

    @classmethod
    def tiny(cls, expert: ActionExpertConfig, **changes) -> PaliGemmaPrefixConfig:
        """A small PaliGemma whose per-layer K/V fit ``expert`` (tests, seconds on a CPU)."""
        base = dict(vision_width=32, vision_mlp_dim=64, vision_depth=2, vision_heads=2,
                    patch_size=14, image_size=28, width=48, mlp_dim=96, depth=expert.depth,
                    num_heads=expert.num_heads, num_kv_heads=expert.num_kv_heads,
                    head_dim=expert.head_dim, vocab_size=128)  # fmt: skip
        return cls(**{**base, **changes})

    def hf_config(self) -> PaliGemmaConfig:
        vision = SiglipVisionConfig(
            hidden_size=self.vision_width, intermediate_size=self.vision_mlp_dim,
            num_hidden_layers=self.vision_depth, num_attention_heads=self.vision_heads,
            patch_size=self.patch_size, image_size=self.image_size, projection_dim=self.width,
            vision_use_head=False,  # PaliGemma reads the patch tokens, not a pooled vector
        )  # fmt: skip
        text = GemmaConfig(
            vocab_size=self.vocab_size, hidden_size=self.width, intermediate_size=self.mlp_dim,
            num_hidden_layers=self.depth, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
            hidden_activation="gelu_pytorch_tanh", use_bidirectional_attention=True,
        )  # fmt: skip
        return PaliGemmaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                               projection_dim=self.width, image_token_index=self.vocab_size - 1)  # fmt: skip


def preprocess_images(images: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """openpi's image preprocessing: resize keeping the aspect ratio, pad to ``size`` x ``size``
    (centred, black), scale to [-1, 1].

    As openpi's ``image_tools.resize_with_pad``: ``ratio = max(W / size, H / size)``, the image
    resized to ``int(H / ratio) x int(W / ratio)`` (bilinear with antialiasing, PIL's BILINEAR),
    pasted at ``((size - h) // 2, (size - w) // 2)`` on black; an image already ``size`` x
    ``size`` is not resampled.

    Args:
        images: [B, H, W, 3] uint8 (0..255) or float in [0, 1].

    Returns:
        [B, 3, size, size] float32 in [-1, 1] (padding -1).
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected [B, H, W, 3], got {tuple(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = x.permute(0, 3, 1, 2)  # (B, 3, H, W)
    H, W = x.shape[-2:]
    ratio = max(W / size, H / size)
    h, w = max(1, int(H / ratio)), max(1, int(W / ratio))
    if (h, w) != (H, W):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (size - h) // 2, (size - w) // 2
    x = F.pad(x.clamp(0, 1), (left, size - w - left, top, size - h - top), value=0.0)
    return x * 2.0 - 1.0


def state_prompt(task: str, state: Tensor | np.ndarray) -> str:
    """pi0.5's prompt with the discretised state: each value of ``state`` (normalised to [-1, 1])
    in one of 256 bins, ``"Task: <task>, State: 12 200 ...;\\nAction: "``."""
    bins = np.linspace(-1.0, 1.0, 257)[:-1]
    digits = np.digitize(np.asarray(state, dtype=np.float64), bins) - 1  # 0..255
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(map(str, digits.tolist()))};\nAction: "


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
    """Prompt token ids [B, max_length] and their mask (True = real), with any ``transformers``
    tokenizer (right padding, truncation to ``max_length``)."""
    enc = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")  # fmt: skip
    return enc["input_ids"], enc["attention_mask"].bool()


class PaliGemmaPrefix(nn.Module):
    """The PaliGemma side of pi0.5 (``self.paligemma``: transformers' PaliGemma model).

    Args:
        config: a :class:`PaliGemmaPrefixConfig`; its depth, KV heads and head dim must match the
            expert's.
    """

    def __init__(self, config: PaliGemmaPrefixConfig):
        super().__init__()
        self.config = config
        self.paligemma = PaliGemmaForConditionalGeneration(config.hf_config())

    def embed(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor):
        """Prefix embeddings and pad mask.

        Args:
            images: [B, N, 3, S, S] preprocessed (:func:`preprocess_images`), N cameras.
            image_masks: [B, N] bool (False: the camera is missing; its tokens are padding).
            tokens: [B, T] prompt token ids; token_masks: [B, T] bool.

        Returns:
            (embeddings [B, N * n_patches + T, width], pad mask [B, N * n_patches + T] bool).
        """
        B, N = images.shape[:2]
        if image_masks.shape != (B, N) or tokens.shape != token_masks.shape or tokens.shape[0] != B:
            raise ValueError(
                f"image_masks must be [{B}, {N}] and tokens/token_masks [{B}, T] alike, got "
                f"{tuple(image_masks.shape)}, {tuple(tokens.shape)}, {tuple(token_masks.shape)}"
            )
        model = self.paligemma.model
        lang = model.language_model.embed_tokens(tokens)  # (B, T, W), x sqrt(W) inside
        # a camera missing in every sample (an unused pi0.5 slot) is padding throughout: its
        # tokens are zeros instead of the vision tower's output, which nothing would read
        live = image_masks.any(0)  # (N,)
        n = (self.config.image_size // self.config.patch_size) ** 2
        feats = lang.new_zeros(B, N, n, self.config.width)
        if live.any():
            pixels = images[:, live].flatten(0, 1).to(model.vision_tower.dtype)  # (B*N', 3, S, S)
            seen = model.get_image_features(pixels).pooler_output  # (B*N', n, W)
            feats[:, live] = seen.unflatten(0, (B, -1)).to(lang.dtype)  # (B, N', n, W)
        image_pad = image_masks[:, :, None].expand(B, N, n).reshape(B, N * n)
        embs = torch.cat([feats.reshape(B, N * n, -1), lang], dim=1)
        return embs, torch.cat([image_pad, token_masks.bool()], dim=1)

    def forward(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor):
        """Images + prompt -> :class:`PrefixKV` (one [B, KV, P, D] key and value per layer)."""
        h, pad = self.embed(images, image_masks, tokens, token_masks)  # (B, P, W), (B, P)
        lm = self.paligemma.model.language_model
        B, P, _ = h.shape
        pos, _ = positions(pad, B, 0, h.device)  # (B, P)
        cos, sin = lm.rotary_emb(h, pos)
        mask = make_att_2d_masks(pad, torch.zeros(P, dtype=torch.long, device=h.device))
        keys, values = [], []
        D = self.config.head_dim
        for i, layer in enumerate(lm.layers):
            x = layer.input_layernorm(h)
            a = layer.self_attn
            q = a.q_proj(x).view(B, P, -1, D).transpose(1, 2)  # (B, H, P, D)
            k = a.k_proj(x).view(B, P, -1, D).transpose(1, 2)  # (B, KV, P, D)
            v = a.v_proj(x).view(B, P, -1, D).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys.append(k)
            values.append(v)
            if i == len(lm.layers) - 1:
                break  # the last layer's output is not read by the expert
            h = h + a.o_proj(attend(q, k, v, mask, a.scaling))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return PrefixKV(tuple(keys), tuple(values), pad)


class Pi05Policy(nn.Module):
    """The whole pi0.5 policy: :class:`PaliGemmaPrefix` + :class:`FlowMatchingPolicy` (with TTT).

    Args:
        prefix: the PaliGemma prefix config; expert: the action expert config.
    """

    def __init__(self, prefix: PaliGemmaPrefixConfig, expert: ActionExpertConfig):
        super().__init__()
        for name in ("depth", "num_kv_heads", "head_dim"):
            if getattr(prefix, name) != getattr(expert, name):
                raise ValueError(
                    f"prefix.{name} ({getattr(prefix, name)}) must equal the expert's "
                    f"({getattr(expert, name)}): the expert attends to each prefix layer's K/V"
                )
        self.prefix = PaliGemmaPrefix(prefix)
        self.policy = FlowMatchingPolicy(expert)

    def forward(self, images, image_masks, tokens, token_masks, actions, noise=None, t=None):
        """Flow-matching loss of action chunks [B, H, A] given the observation (images
        [B, N, 3, S, S], image_masks [B, N], tokens/token_masks [B, T]; see
        :meth:`PaliGemmaPrefix.embed`). The training call: DDP and FSDP2 hook into ``forward``."""
        kv = self.prefix(images, image_masks, tokens, token_masks)
        return self.policy.loss(actions, kv, noise=noise, t=t)

    loss = forward

    @torch.no_grad()
    def sample(self, images, image_masks, tokens, token_masks, noise=None) -> Tensor:
        """Action chunks [B, H, A]: the prefix once, then Euler steps of the expert."""
        return self.policy.sample(self.prefix(images, image_masks, tokens, token_masks), noise)
