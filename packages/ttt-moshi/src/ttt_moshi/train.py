"""Fine-tuning loop: one-cycle AdamW, clipping, NaN/Inf guard, monitoring, exact resume, FSDP2/DDP.

One step on a batch of codes [B, K, T] (``B = batch_size * world size``; process r reads rows
``r * batch_size ... (r + 1) * batch_size - 1``)::

    loss = text_loss_weight * sum(w_t CE_t) / sum(w_t) + sum(w_a CE_a) / sum(w_a)   (LossWeights)
        (sums over the whole batch: each process adds its share, so N processes give the loss
        of one process on the whole batch)
    loss.backward(); g = clip_grad_norm_(params, max_norm)
    if loss or g is not finite: skip (no update, no scheduler step), log, count; stop after
        max_bad_steps skipped steps in a row (`TrainingDiverged`)
    else: AdamW step, one-cycle lr step

What trains: everything (``full_finetuning: true``), or the TTT blocks, the LoRA adapters
(``lora.enable``), the embeddings (``lora.ft_embed``) and the parameters matching
``train_modules`` (globs over parameter names); every other parameter stays bit-identical.

Every ``log_freq`` steps the record also holds, per TTT layer, the mean inner reconstruction loss
``0.5 * ||LN(f_W(k)) - (v - k)||^2`` at the start weights and after the TTT update
(`TTTLayer.inner_loss_report` on the layer's actual input), and the gradient norm of each TTT block
(one process only: a sharded layer's weights are not whole outside its forward).

Run directory (ttt-core's `prepare_run_dir`): a new run needs an empty or missing ``run_dir``;
``resume`` continues the newest ``step*.pt`` (model, optimizer, schedule, RNG, data position, the
skipped-step count) and cuts ``metrics.jsonl`` back to it, so the next steps and the log are those
of an uninterrupted run; ``overwrite`` replaces a run. Checkpoints are written atomically and never
overwrite a file; ``final.pt`` marks a finished run.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from ttt_core.runfiles import append_jsonl, prepare_run_dir, truncate_jsonl

from .checkpoint import build_lm, read_checkpoint, save_checkpoint
from .config import FinetuneConfig
from .data import TokenShards
from .fsdp import LossModule, all_sum, barrier, full_value, shard_by_layer, world
from .layer import TTTStreamingTransformerLayer
from .lora import add_lora
from .losses import LossWeights, combine_sums
from .patch import patch_lm, transformer_of

__all__ = ["RESUMABLE_KEYS", "Trainer", "TrainingDiverged", "latest_checkpoint"]

log = logging.getLogger("ttt_moshi.train")

# config keys a resumed run may change (run_dir: a run moved or renamed resumes from where it is
# now); any other difference from the run's config is refused
RESUMABLE_KEYS = frozenset(
    {"log_freq", "eval_freq", "eval_batches", "ckpt_freq", "num_ckpt_keep", "max_bad_steps"}
    | {"overwrite_run_dir", "data.eval_data", "run_dir"}
)
_STEP_FILE = re.compile(r"step(\d+)\.pt")


class TrainingDiverged(RuntimeError):
    """Raised after ``max_bad_steps`` non-finite steps in a row."""


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest ``step*.pt`` of a run dir (ValueError if the run is finished or has none)."""
    run_dir = Path(run_dir)
    if (run_dir / "final.pt").exists():
        raise ValueError(
            f"run {str(run_dir)!r} is finished (final.pt exists): nothing to resume; start a new "
            "run (another run_dir) from final.pt"
        )
    steps = [
        (int(m.group(1)), p)
        for p in run_dir.glob("step*.pt")
        if (m := _STEP_FILE.fullmatch(p.name))
    ]
    if not steps:
        raise ValueError(f"nothing to resume in {str(run_dir)!r}: no step*.pt checkpoint")
    return max(steps)[1]


class Trainer:
    """Fine-tunes a (patched) Moshi LM on token shards.

    Args:
        config: the fine-tuning config.
        lm: an `LMModel` to train, on its device; ``None`` builds ``LMModel(**config.model.lm_kwargs)``
            (and loads ``config.model.moshi_weights``) on the current GPU if there is one. It is patched with ``config.ttt`` unless
            ``config.ttt.layers`` is empty (a plain-Moshi baseline with the same windows).
        train_data: training windows; ``None`` loads ``config.data.train_data``.
        eval_data: held-out windows; ``None`` loads ``config.data.eval_data`` if given.
        progress: show a tqdm progress bar (first process only).
        resume: continue the run in ``config.run_dir`` from its newest checkpoint.
        overwrite: replace the run in ``config.run_dir`` (also ``config.overwrite_run_dir``).

    Under ``torchrun`` (a default process group with more than one process) the model is sharded
    by layer with FSDP2 (``parallelism: fsdp``) or replicated with DDP (``parallelism: ddp``).
    """

    def __init__(
        self,
        config: FinetuneConfig,
        lm: nn.Module | None = None,
        train_data: TokenShards | None = None,
        eval_data: TokenShards | None = None,
        progress: bool = True,
        *,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(config, FinetuneConfig):
            raise TypeError(f"config must be a FinetuneConfig, got {type(config).__name__}")
        self.config = config
        self.rank, self.world_size = world()
        self.run_dir = Path(config.run_dir)
        if resume:
            latest_checkpoint(self.run_dir)  # fail before building anything
        torch.manual_seed(config.seed)
        self.lm = (
            lm if lm is not None else build_lm(config.model.lm_kwargs, config.model.moshi_weights)
        )
        self.lm_kwargs = dict(config.model.lm_kwargs)
        self._patch()
        if lm is None and torch.cuda.is_available():  # a model it builds goes to this GPU
            self.lm.to(torch.device("cuda", torch.cuda.current_device()))
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
        self.weights = LossWeights(
            text=config.text_loss_weight,
            first_codebook=config.first_codebook_weight_multiplier,
            text_padding=config.text_padding_weight,
            text_padding_ids=(self.lm.text_padding_token_id, self.lm.end_of_text_padding_id),
        )
        self._select_trainable()
        self.module: nn.Module = LossModule(self.lm, self.weights)
        self.sharded = self.world_size > 1 and config.parallelism == "fsdp"
        if self.sharded:
            shard_by_layer(self.module)
        elif self.world_size > 1:
            self.module = nn.parallel.DistributedDataParallel(self.module)
        self.params = [p for p in self.lm.parameters() if p.requires_grad]
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
        if self.rank == 0:
            prepare_run_dir(
                self.run_dir.parent,
                self.run_dir.name,
                resume=resume,
                overwrite=overwrite or config.overwrite_run_dir,
                checkpoints="step*.pt",
            )
        barrier()
        if resume:
            self._resume(latest_checkpoint(self.run_dir))
        self._batches: Iterator[Tensor] = self.train_data.batches(
            config.batch_size * self.world_size,
            seed=config.seed,
            shuffle=config.data.shuffle,
            start=self.step,
        )

    # ---------------------------------------------------------------- setup helpers
    def _patch(self) -> None:
        """TTT blocks and attention windows, LoRA, parameter dtype, gradient checkpointing."""
        c = self.config
        layers = transformer_of(self.lm).layers
        c.ttt.check_layers(len(layers))  # the model's own count (lm given, or no lm_kwargs)
        attn = layers[0].self_attn
        ttt = c.ttt.ttt_config(int(attn.embed_dim), int(attn.num_heads))
        patch_lm(
            self.lm,
            layers=c.ttt.layers,
            ttt=ttt,
            attention_context=c.attention_context,
            ttt_attention_context=c.ttt_attention_context if c.ttt.layers else None,
        )
        if c.lora.enable:
            add_lora(self.lm, c.lora.rank, c.lora.scaling)
        if c.param_dtype == "bfloat16":
            self.lm.to(torch.bfloat16)
        transformer_of(self.lm).checkpointing = c.gradient_checkpointing

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

    def _select_trainable(self) -> None:
        c = self.config
        if c.full_finetuning:
            return
        names = dict(self.lm.named_parameters())
        chosen: set[str] = set()
        for i in self.ttt_layers:
            prefix = f"transformer.layers.{i}."
            chosen |= {n for n in names if n.startswith((prefix + "ttt.", prefix + "norm_ttt."))}
        chosen |= {n for n in names if ".lora_A." in n or ".lora_B." in n}
        if c.lora.ft_embed:
            embeds = ("text_emb.", "emb.", "depformer_emb.", "depformer_text_emb.")
            chosen |= {n for n in names if n.startswith(embeds)}
        for j, pattern in enumerate(c.train_modules):
            hit = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
            if not hit:
                raise ValueError(
                    f"config key 'train_modules[{j}]': {pattern!r} matches no parameter name "
                    f"(e.g. {next(iter(names))!r}; globs like 'transformer.layers.0.*')"
                )
            chosen |= hit
        for n, p in names.items():
            p.requires_grad_(n in chosen)

    @property
    def ttt_layers(self) -> dict[int, TTTStreamingTransformerLayer]:
        layers = transformer_of(self.lm).layers
        return {i: m for i, m in enumerate(layers) if isinstance(m, TTTStreamingTransformerLayer)}

    # ---------------------------------------------------------------- one step
    def _local(self, codes: Tensor) -> Tensor:
        """This process's rows of a whole batch, on the model's device."""
        n = codes.shape[0] // self.world_size
        device = next(self.lm.parameters()).device
        return codes[self.rank * n : (self.rank + 1) * n].to(device)

    def train_step(self, codes: Tensor) -> dict[str, Any]:
        """One optimisation step on the whole batch's codes [B, K, T]; returns the step's record."""
        self.lm.train()
        monitor = self.step % self.config.log_freq == 0 and not self.sharded
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
            sums = self.module(self._local(codes))  # (4,) this process's share
        finally:
            for h in hooks:
                h.remove()
        whole = all_sum(sums)  # (4,) sums over the whole batch
        loss = combine_sums(whole, self.weights.text)
        self.optimizer.zero_grad(set_to_none=True)
        record: dict[str, Any] = {"step": self.step, "lr": self.scheduler.get_last_lr()[0]}
        loss_ok = bool(torch.isfinite(loss))
        grad_norm = float("nan")
        if loss_ok:
            share = combine_sums(sums, self.weights.text, weight_sums=whole)
            (share * self.world_size).backward()  # gradients are averaged over the processes
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_norm)
            grad_norm = float(full_value(norm))
        record["loss"] = float(loss)
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
        self.history.append(record)
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
        """Append to ``metrics.jsonl`` (first process; non-finite numbers written as null)."""
        if self.rank != 0:
            return
        line = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        append_jsonl(self.run_dir / "metrics.jsonl", line)
        if "loss" in record and record["step"] % self.config.log_freq == 0:
            log.info(
                "step %d loss %.4f grad_norm %.3f lr %.2e",
                record["step"],
                record["loss"],
                record["grad_norm"],
                record["lr"],
            )

    # ---------------------------------------------------------------- loop
    def fit(self, max_steps: int | None = None) -> list[dict[str, Any]]:
        """Train until ``max_steps`` (default and at most: the config's).

        Saves ``step{N:06d}.pt`` every ``ckpt_freq`` steps (keeping the newest ``num_ckpt_keep``),
        evaluates every ``eval_freq`` steps, and saves ``final.pt`` when the run reaches the
        config's ``max_steps``; stopping earlier (``max_steps`` smaller) saves ``step{N}.pt``
        instead, from which ``resume`` continues.
        """
        c = self.config
        total = c.max_steps if max_steps is None else min(max_steps, c.max_steps)
        bar = tqdm(
            total=c.max_steps,
            initial=self.step,
            desc="fine-tune",
            disable=not (self.progress and self.rank == 0),
            leave=False,
        )
        while self.step < total:
            rec = self.train_step(next(self._batches))
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if c.eval_freq and self.eval_data is not None and self.step % c.eval_freq == 0:
                self._write({"step": self.step - 1, "eval_loss": self.evaluate()})
            if c.ckpt_freq and self.step % c.ckpt_freq == 0 and self.step < total:
                self.save(self.run_dir / f"step{self.step:06d}.pt")
        bar.close()
        if self.step == c.max_steps:
            self.save(self.run_dir / "final.pt")
        elif not (self.run_dir / f"step{self.step:06d}.pt").exists():
            self.save(self.run_dir / f"step{self.step:06d}.pt")
        return self.history

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float:
        """Mean loss over held-out batches (the training loss's weights; every process's share)."""
        if self.eval_data is None:
            raise ValueError("no eval_data: set data.eval_data in the config")
        per_process = min(self.config.batch_size, len(self.eval_data) // self.world_size)
        if per_process < 1:
            raise ValueError(
                f"eval_data has {len(self.eval_data)} windows for {self.world_size} processes"
            )
        self.lm.eval()
        n = batches or self.config.eval_batches
        it = self.eval_data.batches(per_process * self.world_size, shuffle=False, epochs=1)
        losses = []
        for _, codes in zip(range(n), it):
            whole = all_sum(self.module(self._local(codes)))
            losses.append(float(combine_sums(whole, self.weights.text)))
        return sum(losses) / len(losses)

    # ---------------------------------------------------------------- checkpoints
    def _options(self) -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=self.world_size > 1)

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint (every process takes part; the first writes); never overwrites."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"checkpoint {str(path)!r} exists; a run never overwrites one")
        model_state = get_model_state_dict(self.lm, options=self._options())
        optim_state = get_optimizer_state_dict(self.lm, self.optimizer, options=self._options())
        if self.rank == 0:
            save_checkpoint(
                path,
                self.lm,
                self.lm_kwargs,
                scheduler=self.scheduler,
                step=self.step,
                extra={
                    "config": self.config.to_dict(),
                    "rng": torch.get_rng_state(),
                    "bad_streak": self.bad_streak,
                },
                model_state=model_state,
                optimizer_state=optim_state,
            )
            if path.name.startswith("step"):
                self._prune()
        barrier()
        return path

    def _prune(self) -> None:
        keep = self.config.num_ckpt_keep
        if keep is None:
            return
        steps = sorted(
            (int(m.group(1)), p)
            for p in self.run_dir.glob("step*.pt")
            if (m := _STEP_FILE.fullmatch(p.name))
        )
        for _, p in steps[:-keep]:
            p.unlink()

    def _resume(self, path: Path) -> None:
        payload = read_checkpoint(path)
        extra = payload.get("extra") or {}
        self._check_resume_config(extra.get("config") or {}, path)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.lm, payload["model"], options=opts)
        set_optimizer_state_dict(self.lm, self.optimizer, payload["optimizer"], options=opts)
        self.scheduler.load_state_dict(payload["scheduler"])
        self.step = int(payload["step"])
        self.bad_streak = int(extra.get("bad_streak", 0))
        torch.set_rng_state(extra["rng"])
        if self.rank == 0:
            truncate_jsonl(self.run_dir / "metrics.jsonl", self.step - 1)
        barrier()
        log.info("resumed %s at step %d", path, self.step)

    def _check_resume_config(self, saved: dict[str, Any], path: Path) -> None:
        now, then = _flatten(self.config.to_dict()), _flatten(saved)
        changed = sorted(
            k for k in set(now) | set(then) if now.get(k) != then.get(k) and k not in RESUMABLE_KEYS
        )
        if changed:
            diffs = "; ".join(f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ValueError(
                f"resume of {str(path)!r}: the config differs from the run's in {diffs}. A resumed "
                f"run may change only {sorted(RESUMABLE_KEYS)}; use the run's config or start a "
                "new run"
            )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("lm_kwargs", "config", "attention_context"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
