"""Fine-tuning loop: one-cycle AdamW, gradient clipping, NaN/Inf guard, monitoring, checkpoints.

One step on a batch of codes [B, K, T]::

    loss = text_loss_weight * CE_text + CE_audio          (masked means, teacher forcing)
    loss.backward(); g = clip_grad_norm_(params, max_norm)
    if loss or g is not finite: skip (no update, no scheduler step), log, count; stop after
        max_bad_steps skipped steps in a row (`TrainingDiverged`)
    else: AdamW step, one-cycle lr step

Every ``log_freq`` steps the record also holds, per TTT layer, the mean inner reconstruction loss
``0.5 * ||LN(f_W(k)) - (v - k)||^2`` at the start weights and after the TTT update
(`TTTLayer.inner_loss_report` on the layer's actual input), and the gradient norm of each TTT block.
Records go to ``<run_dir>/metrics.jsonl`` and to the `logging` logger ``ttt_moshi.train``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checkpoint import build_lm, save_checkpoint, ttt_config_for
from .config import FinetuneConfig
from .data import TokenShards
from .layer import TTTStreamingTransformerLayer
from .losses import token_losses
from .patch import patch_lm, transformer_of

__all__ = ["Trainer", "TrainingDiverged"]

log = logging.getLogger("ttt_moshi.train")


class TrainingDiverged(RuntimeError):
    """Raised after ``max_bad_steps`` non-finite steps in a row."""


class Trainer:
    """Fine-tunes a (patched) Moshi LM on token shards.

    Args:
        config: the fine-tuning config.
        lm: an `LMModel` to train; ``None`` builds ``LMModel(**config.model.lm_kwargs)`` (and loads
            ``config.model.moshi_weights``). It is patched with ``config.ttt`` unless
            ``config.ttt.layers`` is empty (a plain-Moshi baseline with the same windows).
        train_data: training windows; ``None`` loads ``config.data.train_data``.
        eval_data: held-out windows; ``None`` loads ``config.data.eval_data`` if given.
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        config: FinetuneConfig,
        lm: nn.Module | None = None,
        train_data: TokenShards | None = None,
        eval_data: TokenShards | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config.validate()
        torch.manual_seed(config.seed)
        self.lm = (
            lm if lm is not None else build_lm(config.model.lm_kwargs, config.model.moshi_weights)
        )
        self.lm_kwargs = dict(config.model.lm_kwargs)
        if config.ttt.layers:
            t = config.ttt
            cfg = ttt_config_for(
                self.lm,
                inner=t.inner,
                num_heads=t.num_heads,
                mini_batch_size=t.mini_batch_size,
                base_lr=t.base_lr,
                gate_init=t.gate_init,
                **t.extra,
            )
            patch_lm(
                self.lm,
                layers=t.layers,
                ttt=cfg,
                attention_context=config.attention_context,
                ttt_attention_context=config.ttt_attention_context,
            )
        else:
            patch_lm(
                self.lm,
                layers=[],
                ttt=ttt_config_for(self.lm),
                attention_context=config.attention_context,
            )
        self.train_data = (
            train_data if train_data is not None else self._shards(config.data.train_data)
        )
        self.eval_data = eval_data
        if eval_data is None and config.data.eval_data:
            self.eval_data = self._shards(config.data.eval_data)
        if self.train_data.seq_len != config.seq_len:
            raise ValueError(
                f"train_data windows are {self.train_data.seq_len} steps, the config asks for "
                f"duration_sec * frame_rate = {config.seq_len}"
            )
        self.params = self._trainable()
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=o.lr,
            total_steps=config.max_steps,
            pct_start=o.pct_start,
            anneal_strategy="cos",
        )
        self.step = 0
        self.bad_streak = 0
        self.history: list[dict[str, Any]] = []
        self.progress = progress
        self.run_dir = Path(config.run_dir)
        self._batches: Iterator[Tensor] = self.train_data.batches(
            config.batch_size, seed=config.seed
        )

    # ---------------------------------------------------------------- setup helpers
    def _shards(self, paths: list[str]) -> TokenShards:
        lm = self.lm
        return TokenShards(
            paths,
            num_codebooks=lm.num_codebooks,
            card=lm.card,
            text_card=lm.text_card,
            seq_len=self.config.seq_len,
            allow_zero_token=self.config.data.allow_zero_token,
        )

    def _trainable(self) -> list[nn.Parameter]:
        if self.config.train_only_ttt:
            if not self.ttt_layers:
                raise ValueError("train_only_ttt needs ttt.layers (there is nothing else to train)")
            for p in self.lm.parameters():
                p.requires_grad_(False)
            for layer in self.ttt_layers.values():
                for p in [*layer.ttt.parameters(), *layer.norm_ttt.parameters()]:
                    p.requires_grad_(True)
        return [p for p in self.lm.parameters() if p.requires_grad]

    @property
    def ttt_layers(self) -> dict[int, TTTStreamingTransformerLayer]:
        layers = transformer_of(self.lm).layers
        return {i: m for i, m in enumerate(layers) if isinstance(m, TTTStreamingTransformerLayer)}

    # ---------------------------------------------------------------- one step
    def train_step(self, codes: Tensor) -> dict[str, Any]:
        """One optimisation step on codes [B, K, T]; returns the step's record."""
        self.lm.train()
        monitor = self.step % self.config.log_freq == 0
        captured: dict[int, Tensor] = {}
        hooks = []
        if monitor:
            for i, layer in self.ttt_layers.items():
                hooks.append(
                    layer.ttt.register_forward_pre_hook(
                        lambda _m, args, i=i: captured.__setitem__(i, args[0].detach())
                    )
                )
        try:
            loss = token_losses(self.lm, codes).loss(self.config.text_loss_weight)
        finally:
            for h in hooks:
                h.remove()
        self.optimizer.zero_grad(set_to_none=True)
        record: dict[str, Any] = {"step": self.step, "lr": self.scheduler.get_last_lr()[0]}
        loss_ok = bool(torch.isfinite(loss))
        grad_norm = float("nan")
        if loss_ok:
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_norm))
        record["loss"] = float(loss.detach())
        record["grad_norm"] = grad_norm
        if loss_ok and math.isfinite(grad_norm):
            if monitor:
                record.update(self._monitor(captured))
            self.optimizer.step()
            self.scheduler.step()
            self.bad_streak = 0
            record["skipped"] = False
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_streak += 1
            record["skipped"] = True
            what = "loss" if not loss_ok else "gradient norm"
            log.warning(
                "step %d: non-finite %s (loss=%s, grad_norm=%s), update skipped (%d in a row)",
                self.step,
                what,
                record["loss"],
                grad_norm,
                self.bad_streak,
            )
        self.step += 1
        self._write(record)
        if self.bad_streak >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_streak} non-finite steps in a row (max_bad_steps="
                f"{self.config.max_bad_steps}); last at step {self.step - 1}"
            )
        return record

    @torch.no_grad()
    def _monitor(self, captured: dict[int, Tensor]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, layer in self.ttt_layers.items():
            if i in captured:
                rep = layer.ttt.inner_loss_report(captured[i])
                out[f"layer{i}/inner_loss_before"] = float(rep["before"])
                out[f"layer{i}/inner_loss_after"] = float(rep["after"])
            grads = [p.grad for p in layer.ttt.parameters() if p.grad is not None]
            if grads:
                out[f"layer{i}/ttt_grad_norm"] = float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads])
                    )
                )
        return out

    def _write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["step"] % self.config.log_freq == 0:
            log.info(
                "step %d loss %.4f grad_norm %.3f lr %.2e",
                record["step"],
                record["loss"],
                record["grad_norm"],
                record["lr"],
            )

    # ---------------------------------------------------------------- loop
    def fit(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until ``max_steps`` (default: the config's) and save ``final.pt``."""
        total = self.config.max_steps if max_steps is None else max_steps
        bar = tqdm(
            total=total - self.step, desc="fine-tune", disable=not self.progress, leave=False
        )
        while self.step < total:
            rec = self.train_step(next(self._batches))
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            ckpt = self.config.ckpt_freq
            if ckpt and self.step % ckpt == 0 and self.step < total:
                self.save(self.run_dir / f"step{self.step:06d}.pt")
        bar.close()
        self.save(self.run_dir / "final.pt")
        return self.history

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:
        """Mean training loss over held-out windows."""
        if self.eval_data is None:
            raise ValueError("no eval_data: set data.eval_data in the config")
        self.lm.eval()
        n = batches or self.config.eval_batches
        losses = []
        it = self.eval_data.batches(
            min(self.config.batch_size, len(self.eval_data)), shuffle=False, epochs=1
        )
        for _, codes in zip(range(n), it):
            losses.append(float(token_losses(self.lm, codes).loss(self.config.text_loss_weight)))
        return sum(losses) / len(losses)

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(
            path,
            self.lm,
            self.lm_kwargs,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            step=self.step,
            extra={"config": self.config.to_dict()},
        )
