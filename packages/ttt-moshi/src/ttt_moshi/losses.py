"""Token losses of a Moshi `LMModel` on codes [B, K, T] (codebook 0 = text, 1.. = audio).

``lm(codes)`` returns logits aligned with ``codes`` (Moshi applies the acoustic delays and undoes
them), so the loss of codebook k at step t is ``CE(logits[:, k, t], codes[:, k, t])`` where the mask
is true. Text-only models (``dep_q == 0``, no depformer, e.g. an ASR-style Moshi) are handled by the
same delay logic on the main transformer only.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from moshi.models.lm import LMModel
from moshi.models.lm_utils import _delay_sequence, _undelay_sequence
from moshi.utils.compile import no_compile
from torch import Tensor, nn

__all__ = ["LossWeights", "TokenLosses", "combine_sums", "token_losses"]


@dataclass(frozen=True)
class LossWeights:
    """Per-token loss weights, in moshi-finetune's spelling.

    ``loss = text * sum(w_t CE_t) / sum(w_t) + sum(w_a CE_a) / sum(w_a)`` over the valid tokens, with
    ``w_t = text_padding`` on the text padding ids (1 elsewhere) and ``w_a = first_codebook`` on the
    first audio codebook (1 on the others).
    """

    text: float = 1.0  # text_loss_weight
    first_codebook: float = 1.0  # first_codebook_weight_multiplier
    text_padding: float = 1.0  # text_padding_weight
    text_padding_ids: tuple[int, ...] = ()  # lm.text_padding_token_id, lm.end_of_text_padding_id


@dataclass
class TokenLosses:
    """Per-token cross-entropies and their masks.

    Attributes:
        text: [B, 1, T] CE of the text stream (0 where masked); text_mask: [B, 1, T] bool.
        text_target: [B, 1, T] the text tokens (to find the padding ids).
        audio: [B, dep_q, T] CE of the audio codebooks (depformer outputs), None if dep_q == 0;
        audio_mask: [B, dep_q, T] bool (None if dep_q == 0).
    """

    text: Tensor
    text_mask: Tensor
    text_target: Tensor
    audio: Tensor | None
    audio_mask: Tensor | None

    def weighted_sums(self, weights: LossWeights = LossWeights()) -> Tensor:
        """``[sum(w_t CE_t), sum(w_t), sum(w_a CE_a), sum(w_a)]`` (a [4] tensor; the weight sums
        carry no gradient). Sums over several processes add up to the sums of the whole batch."""
        w_text = self.text_mask.to(self.text.dtype)  # (B, 1, T)
        for i in weights.text_padding_ids:
            w_text = torch.where(self.text_target == i, w_text * weights.text_padding, w_text)
        parts = [(self.text * w_text).sum(), w_text.sum()]
        if self.audio is not None:
            w_audio = self.audio_mask.to(self.audio.dtype)  # (B, dep_q, T)
            w_audio[:, :1] *= weights.first_codebook
            parts += [(self.audio * w_audio).sum(), w_audio.sum()]
        else:
            parts += [self.text.new_zeros(()), self.text.new_zeros(())]
        return torch.stack(parts)

    def loss(self, weights: LossWeights | float = 1.0) -> Tensor:
        """Scalar loss (see `LossWeights`; a float is the text weight, other weights 1)."""
        if not isinstance(weights, LossWeights):
            weights = LossWeights(text=float(weights))
        return combine_sums(self.weighted_sums(weights), weights.text)

    def per_position(self) -> tuple[Tensor, Tensor]:
        """Sum over batch and codebooks of the CE at each step, and the valid-token count: [T]."""
        s = (self.text * self.text_mask).sum(dim=(0, 1))  # (T,)
        n = self.text_mask.sum(dim=(0, 1))
        if self.audio is not None:
            s = s + (self.audio * self.audio_mask).sum(dim=(0, 1))
            n = n + self.audio_mask.sum(dim=(0, 1))
        return s, n


def combine_sums(
    sums: Tensor, text_weight: float = 1.0, weight_sums: Tensor | None = None
) -> Tensor:
    """``text_weight * sums[0] / W[1] + sums[2] / W[3]`` with ``W = weight_sums`` (default
    ``sums``): pass the weight sums of the whole batch to get each process's share of its loss."""
    w = (sums if weight_sums is None else weight_sums).detach()
    text = sums[0] / w[1].clamp_min(1e-12)
    audio = sums[2] / w[3].clamp_min(1e-12)
    return text_weight * text + audio


def _ce(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """CE per token: logits [B, K, T, V], target [B, K, T] -> [B, K, T] (0 where masked)."""
    safe_logits = torch.where(mask[..., None], logits, torch.zeros_like(logits))  # NaN-free
    safe_target = torch.where(mask, target, torch.zeros_like(target))
    ce = F.cross_entropy(
        safe_logits.float().flatten(0, 2), safe_target.flatten(), reduction="none"
    ).view_as(target)
    return ce * mask


def lm_logits(lm: LMModel, codes: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(text_logits [B,1,T,Vt], text_mask, audio_logits [B,dep_q,T,V] | None, audio_mask)``."""
    if lm.depformer is not None:
        out = lm(codes)
        return out.text_logits, out.text_mask, out.logits, out.mask
    B, K, _ = codes.shape
    if lm.num_codebooks != K:
        raise ValueError(f"codes must be [B, {lm.num_codebooks}, T], got {tuple(codes.shape)}")
    initial = lm._get_initial_token().expand(B, -1, -1)  # (B, K, 1)
    delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)
    _, text_logits = lm.forward_text(delayed[:, :, :-1])  # (B, 1, T, Vt)
    text_logits, text_mask = _undelay_sequence(lm.delays[:1], text_logits, fill_value=float("nan"))
    text_mask = text_mask & (codes[:, :1] != lm.zero_token_id)
    return text_logits, text_mask, None, None


def on_model_device(lm: nn.Module, codes: Tensor) -> Tensor:
    """``codes`` on ``lm``'s device (a dataset's windows live on the CPU)."""
    return codes.to(next(lm.parameters()).device)


def token_losses(lm: LMModel, codes: Tensor) -> TokenLosses:
    """Per-token CE of ``lm`` on ``codes`` [B, K, T] (teacher forcing, one forward pass; the
    losses are on ``lm``'s device)."""
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, K, T], got shape {tuple(codes.shape)}")
    codes = on_model_device(lm, codes)
    with ExitStack() as stack:
        if (
            codes.device.type != "cuda"
        ):  # moshi compiles its out_norm lazily; on CPU only costs time
            stack.enter_context(no_compile())
        text_logits, text_mask, audio_logits, audio_mask = lm_logits(lm, codes)
    text = _ce(text_logits, codes[:, :1], text_mask)
    audio = None
    if audio_logits is not None:
        audio = _ce(audio_logits, codes[:, 1 : 1 + lm.dep_q], audio_mask)
    return TokenLosses(text, text_mask, codes[:, :1], audio, audio_mask)
