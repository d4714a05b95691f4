"""The observation of a whole pi0.5 policy from LeRobot frames: camera images in pi0.5's three
image slots, and the prompt with the discretised state, tokenized.

As openpi's pi0.5 data pipeline does it:

- slots ``base_0_rgb``, ``left_wrist_0_rgb``, ``right_wrist_0_rgb`` (this order); each takes the
  dataset camera the config maps to it, preprocessed by :func:`~ttt_gemma.paligemma.preprocess_images`
  (resize with padding, [-1, 1]); a slot without a camera is a black image (-1) with mask False,
  so its tokens are padding.
- prompt: :func:`~ttt_gemma.paligemma.state_prompt` of the frame's task (meta/tasks.jsonl) and its
  normalised state, tokenized by :func:`~ttt_gemma.paligemma.tokenize` (right padding to
  ``max_token_len``, the tokenizer's own BOS).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lerobot import LeRobotFrames
from .paligemma import preprocess_images, state_prompt, tokenize

IMAGE_SLOTS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


class Pi05Observations:
    """Frame indices -> the inputs of :meth:`~ttt_gemma.paligemma.Pi05Policy.loss`.

    Args:
        frames: the dataset, read with its cameras and tasks.
        image_keys: pi0.5 slot -> dataset camera feature (slots not given are masked).
        states: [N, S] the normalised states of all frames (what the prompt discretises).
        tokenizer: a ``transformers`` tokenizer; max_token_len: prompt length T.
        image_size: the vision tower's input size.
    """

    def __init__(self, frames: LeRobotFrames, image_keys: dict[str, str], states: Tensor,
                 tokenizer, max_token_len: int, image_size: int):  # fmt: skip
        unknown = sorted(set(image_keys) - set(IMAGE_SLOTS))
        if unknown:
            raise ValueError(f"data.image_keys: unknown slots {unknown}; pi0.5's are {IMAGE_SLOTS}")
        self.frames, self.image_keys, self.states = frames, image_keys, states
        self.tokenizer, self.max_token_len, self.image_size = tokenizer, max_token_len, image_size

    def images(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(images [B, 3, 3, size, size] in [-1, 1], masks [B, 3] bool) for frames ``index`` [B]."""
        B, size = len(index), self.image_size
        images, masks = [], []
        for slot in IMAGE_SLOTS:
            key = self.image_keys.get(slot)
            if key is None:
                images.append(torch.full((B, 3, size, size), -1.0))
                masks.append(torch.zeros(B, dtype=torch.bool))
                continue
            raw = torch.stack([torch.from_numpy(self.frames.image(key, int(i))) for i in index])
            images.append(preprocess_images(raw, size))  # (B, H, W, 3) uint8 -> (B, 3, S, S)
            masks.append(torch.ones(B, dtype=torch.bool))
        return torch.stack(images, dim=1), torch.stack(masks, dim=1)

    def prompts(self, index: Tensor) -> list[str]:
        """pi0.5's prompt with the discretised state for frames ``index`` [B]."""
        tasks = self.frames.tasks
        return [state_prompt(tasks[int(self.frames.task_index[i])], self.states[i].numpy())
                for i in index]  # fmt: skip

    def __call__(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images [B, 3, 3, S, S], image masks [B, 3], tokens [B, T], token masks [B, T])."""
        images, masks = self.images(index)
        tokens, token_masks = tokenize(self.tokenizer, self.prompts(index), self.max_token_len)
        return images, masks, tokens, token_masks
