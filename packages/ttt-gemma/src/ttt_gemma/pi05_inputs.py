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


def check_slots(slots) -> None:
    """Every name is one of pi0.5's image slots (ValueError naming the others)."""
    unknown = sorted(set(slots) - set(IMAGE_SLOTS))
    if unknown:
        raise ValueError(f"data.image_keys: unknown slots {unknown}; pi0.5's are {IMAGE_SLOTS}")


def pi05_observation(cameras: dict[str, Tensor], tasks: list[str], states: Tensor, tokenizer,
                     max_token_len: int, image_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The inputs of :meth:`~ttt_gemma.paligemma.Pi05Policy.loss` / ``sample`` for B observations.

    Args:
        cameras: pi0.5 slot -> [B, H, W, 3] uint8 images (slots not given are masked).
        tasks: B task texts; states: [B, S] normalised states (discretised into the prompt).
        tokenizer: a ``transformers`` tokenizer; max_token_len: prompt length T.
        image_size: the vision tower's input size.

    Returns:
        (images [B, 3, 3, size, size] in [-1, 1], image masks [B, 3] bool, tokens [B, T],
        token masks [B, T] bool).
    """
    check_slots(cameras)
    B = len(tasks)
    images, masks = [], []
    for slot in IMAGE_SLOTS:
        if slot in cameras:
            images.append(preprocess_images(cameras[slot], image_size))  # (B, 3, S, S)
            masks.append(torch.ones(B, dtype=torch.bool, device=states.device))
        else:  # openpi: a black image, masked
            images.append(torch.full((B, 3, image_size, image_size), -1.0, device=states.device))
            masks.append(torch.zeros(B, dtype=torch.bool, device=states.device))
    prompts = [state_prompt(task, state) for task, state in zip(tasks, states.numpy())]
    tokens, token_masks = tokenize(tokenizer, prompts, max_token_len)
    return torch.stack(images, dim=1), torch.stack(masks, dim=1), tokens, token_masks


class Pi05Observations:
    """Frame indices -> :func:`pi05_observation` of those frames.

    Args:
        frames: the dataset, read with its cameras and tasks.
        image_keys: pi0.5 slot -> dataset camera feature (slots not given are masked).
        states: [N, S] the normalised states of all frames (what the prompt discretises).
        tokenizer: a ``transformers`` tokenizer; max_token_len: prompt length T.
        image_size: the vision tower's input size.
    """

    def __init__(self, frames: LeRobotFrames, image_keys: dict[str, str], states: Tensor,
                 tokenizer, max_token_len: int, image_size: int):  # fmt: skip
        check_slots(image_keys)
        self.frames, self.image_keys, self.states = frames, image_keys, states
        self.tokenizer, self.max_token_len, self.image_size = tokenizer, max_token_len, image_size

    def tasks(self, index: Tensor) -> list[str]:
        """The task text of frames ``index`` [B] (meta/tasks.jsonl by each frame's task_index)."""
        return [self.frames.tasks[int(self.frames.task_index[i])] for i in index]

    def __call__(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(images [B, 3, 3, S, S], image masks [B, 3], tokens [B, T], token masks [B, T])."""
        cameras = {slot: torch.stack([torch.from_numpy(self.frames.image(key, int(i)))
                                      for i in index])  # (B, H, W, 3) uint8
                   for slot, key in self.image_keys.items()}  # fmt: skip
        return pi05_observation(cameras, self.tasks(index), self.states[index], self.tokenizer,
                                self.max_token_len, self.image_size)  # fmt: skip
