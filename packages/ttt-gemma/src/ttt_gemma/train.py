"""``ttt-gemma train``: fine-tune a policy (with TTT) on a LeRobot v2 dataset: the whole pi0.5
policy (:class:`~ttt_gemma.paligemma.Pi05Policy`, images + prompt + discretised state) when the
config maps cameras (``data.image_keys``, ``model.vlm``), else the state policy
(:class:`~ttt_gemma.state_policy.StatePolicy`).

One step: the global batch (start frames, noise, flow times) is drawn from one seeded generator
on every process, each process takes its equal slice, and the loss is the flow-matching loss of
its slice; DDP / FSDP2 average the gradients, so N processes compute the step of one process on
the whole batch. Then: global gradient norm, clipping, and the NaN/Inf guard (a non-finite loss
or gradient norm skips the optimizer step and is logged), AdamW, the LR schedule.

The run folder (``run.root/run.name``, see ``ttt_core.runfiles.prepare_run_dir``) holds
``config.yaml``, ``checkpoint.pt`` (model, optimizer, schedule, step, generator: resuming gives
the same next steps as an uninterrupted run), ``metrics.jsonl`` (one record per step, with a
record per TTT layer every ``log_every`` steps: mean |gate|, inner loss before/after the update,
gradient norm), ``model.safetensors`` (the trained policy) and ``plots.png``. The inputs (dataset,
batches, policy, and on ``--resume`` the checkpoint against the config) are checked before any of
these is written: a new run refused there leaves only ttt-core's marker, so the corrected command
starts it again without a flag.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from ttt_core.runfiles import (
    append_jsonl,
    atomic_save,
    atomic_write_text,
    prepare_run_dir,
    safe_load,
    truncate_jsonl,
)

from .checkpoint import check_tensors, load_pi05, save_checkpoint
from .diagnostics import TTTDiagnostics, plot_metrics
from .lerobot import LeRobotFrames, read_lerobot
from .paligemma import Pi05Policy
from .pi05_inputs import Pi05Observations
from .state_policy import StatePolicy
from .train_config import TrainRunConfig, config_from_yaml_text, config_to_yaml
from .word_tokenizer import load_tokenizer

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_OPTIM_LOAD = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)
_TRAINABLE = {  # parameter name -> trains?
    "all": lambda name: True,
    "freeze_vlm": lambda name: not name.startswith(("encoder.", "prefix.")),
    "expert": lambda name: name.startswith("policy.expert."),
    "ttt": lambda name: ".ttt." in name,
}


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when run under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    return rank, world, device or torch.device("cpu")


def make_policy(cfg: TrainRunConfig, state_dim: int) -> StatePolicy | Pi05Policy:
    """The config's policy, fresh from torch's global RNG: the whole pi0.5 policy when
    ``model.vlm`` is set, else the state policy."""
    if cfg.model.vlm is not None:
        return Pi05Policy(cfg.model.vlm, cfg.model.expert)
    prefix = cfg.model.prefix
    return StatePolicy(cfg.model.expert, state_dim, prefix.width, prefix.mlp_dim)


def read_frames(cfg: TrainRunConfig) -> LeRobotFrames:
    """The dataset with what the config's policy reads (cameras and tasks for pi0.5)."""
    d = cfg.data
    cameras = tuple(dict.fromkeys((d.image_keys or {}).values()))
    return read_lerobot(d.root, d.state_key, d.action_key, cameras, tasks=d.image_keys is not None)


def build_model(cfg: TrainRunConfig, frames: LeRobotFrames) -> StatePolicy | Pi05Policy:
    """The config's policy (seeded), its pi0.5 start weights if given, its trainable parameters."""
    expert = cfg.model.expert
    if frames.actions.shape[1] > expert.action_dim:
        raise ValueError(
            f"model.expert.action_dim ({expert.action_dim}) is smaller than the dataset's "
            f"actions ({frames.actions.shape[1]}); actions are zero-padded, never cut"
        )
    torch.manual_seed(cfg.train.seed)
    model = make_policy(cfg, frames.states.shape[1])
    if cfg.model.init_pi05 is not None:  # the whole checkpoint into pi0.5, the expert's otherwise
        load_pi05(model if isinstance(model, Pi05Policy) else model.policy, cfg.model.init_pi05)
    trains = _TRAINABLE[cfg.train.trainable]
    for name, p in model.named_parameters():
        p.requires_grad_(trains(name))
    if cfg.train.precision == "bf16":
        model.to(torch.bfloat16)
    model.policy.expert.gradient_checkpointing = cfg.train.grad_checkpointing
    return model


def wrap(
    model: StatePolicy | Pi05Policy, parallel: str, world: int, device: torch.device
) -> nn.Module:
    """DDP or FSDP2 (one shard group per expert layer, the rest in the root's) when world > 1."""
    model.to(device)
    if world == 1:
        return model
    if parallel == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        # the prefix's last layer past its K/V projections does not reach the loss
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=True)  # fmt: skip
    from torch.distributed.fsdp import fully_shard

    # (both prefixes call their layers' parts, not their forward, which is where FSDP2 gathers a
    # group: their layers stay in the root's group)
    for layer in model.policy.expert.layers:
        fully_shard(layer)
    return fully_shard(model)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def guarded_step(optimizer: torch.optim.Optimizer, params: list[Tensor], loss: Tensor,
                 max_norm: float) -> tuple[bool, float]:  # fmt: skip
    """Clip the gradients to ``max_norm`` and step, unless the loss or the global gradient norm is
    NaN/Inf: then nothing changes (no parameter, no optimizer state). Gradients are cleared either
    way. Returns (stepped, gradient norm before clipping)."""
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    stepped = math.isfinite(norm) and math.isfinite(float(loss))
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return stepped, norm


class Batches:
    """Normalised action chunks and the observations of their first frames, drawn by one seeded
    generator (its state is saved)."""

    def __init__(self, frames: LeRobotFrames, cfg: TrainRunConfig):
        horizon, A = cfg.model.expert.action_horizon, cfg.model.expert.action_dim
        state_norm, action_norm = frames.normalizers(cfg.data.normalization)
        self.states = state_norm.normalize(frames.states)  # (N, S)
        actions = action_norm.normalize(frames.actions)  # (N, A_data)
        self.actions = nn.functional.pad(actions, (0, A - actions.shape[1]))  # (N, A), zeros
        self.starts = frames.chunk_starts(horizon)  # (M,)
        self.horizon, self.action_dim = horizon, A
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.pi05 = None
        if cfg.model.vlm is not None:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
            if len(tokenizer) > cfg.model.vlm.vocab_size:
                raise ValueError(
                    f"model.vlm.vocab_size ({cfg.model.vlm.vocab_size}) is smaller than the "
                    f"tokenizer's vocabulary ({len(tokenizer)}, {cfg.data.tokenizer})"
                )
            self.pi05 = Pi05Observations(frames, cfg.data.image_keys, self.states, tokenizer,
                                         cfg.data.max_token_len, cfg.model.vlm.image_size)  # fmt: skip

    def draw(self, batch: int, policy) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A global batch: start frames [B], action chunks [B, H, A], noise [B, H, A], t [B]."""
        g = self.generator
        cpu = torch.device("cpu")  # drawn beside the data, whatever the default device
        frames = self.starts[torch.randint(len(self.starts), (batch,), generator=g, device=cpu)]
        chunk = frames[:, None] + torch.arange(self.horizon, device=cpu)  # (B, H)
        noise = torch.randn(batch, self.horizon, self.action_dim, generator=g, device=cpu)
        t = policy.sample_time(batch, device=cpu, generator=g).float()
        return frames, self.actions[chunk], noise, t

    def observe(self, frames: Tensor) -> tuple[Tensor, ...]:
        """The policy's observation inputs for frames [B]: (states [B, S],) for the state policy,
        (images, image masks, tokens, token masks) for pi0.5 (see :class:`Pi05Observations`)."""
        return (self.states[frames],) if self.pi05 is None else self.pi05(frames)


def _full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state dicts gathered in full on every process (collective)."""
    return get_state_dict(model, optimizer, options=_FULL)


def save_run(run: Path, model, optimizer, scheduler, batches: Batches, step: int, skipped: int,
             rank: int) -> None:  # fmt: skip
    """``checkpoint.pt`` (atomic) and the policy as ``model.safetensors``, written by rank 0."""
    model_state, optim_state = _full_state(model, optimizer)
    if rank == 0:
        atomic_save({"model": model_state, "optimizer": optim_state,
                     "scheduler": scheduler.state_dict(), "step": step, "skipped": skipped,
                     "generator": batches.generator.get_state()}, run / "checkpoint.pt")  # fmt: skip
        save_checkpoint(model_state, run / "model.safetensors")
    if dist.is_initialized():
        dist.barrier()


def _check_resume_config(run: Path, cfg: TrainRunConfig) -> None:
    """``--resume`` continues the run's own config; a different ``--config`` is refused. Where the
    run folder is (``run.root``, ``run.name``) may change: a run moved or renamed resumes."""
    saved = config_from_yaml_text((run / "config.yaml").read_text(), str(run / "config.yaml"))
    saved = dataclasses.replace(saved, run=cfg.run)
    if saved != cfg:
        mine, theirs = config_to_yaml(cfg).splitlines(), config_to_yaml(saved).splitlines()
        diff = [a.strip() for a, b in zip(mine, theirs) if a != b][:5]
        raise ValueError(
            f"--resume: the config differs from the run's {run / 'config.yaml'} ({diff}); a "
            "resumed run keeps its config: pass that file, or start a new run"
        )


def _check_resumable(run: Path) -> None:
    """``--resume`` of a run that stopped before its first checkpoint: say how to start it again
    (``prepare_run_dir``'s "start it without --resume" would be refused, the folder not empty)."""
    if run.is_dir() and (run / "config.yaml").is_file() and not (run / "checkpoint.pt").exists():
        raise ValueError(
            f"nothing to resume in {str(run)!r}: it has no checkpoint.pt (the run stopped before "
            "its first checkpoint, train.ckpt_every); start it again with --overwrite"
        )


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "step", "skipped", "generator")


def _read_checkpoint(path: Path, model: nn.Module) -> dict:
    """The run's ``checkpoint.pt``, checked against ``model`` (the unwrapped policy) before
    anything is loaded: a file of another config (e.g. copied from another run) raises one
    ValueError naming it and the first tensors that do not fit."""
    ck = safe_load(path)
    entries = list(ck) if isinstance(ck, dict) else []
    if any(k not in entries for k in _CHECKPOINT_KEYS) or not isinstance(ck["model"], dict):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a ttt-gemma train checkpoint: it needs the "
            f"entries {list(_CHECKPOINT_KEYS)}, it has {entries}"
        )
    try:
        check_tensors(model.state_dict(), ck["model"], f"checkpoint {str(path)!r}")
    except ValueError as err:
        raise ValueError(
            f"{err}; it was not written by this run's config ({path.parent / 'config.yaml'})"
        ) from None
    return ck


def _load_checkpoint(path: Path, ck: dict, model: nn.Module, optimizer, scheduler,
                     batches: Batches) -> None:  # fmt: skip
    """Load a checked :func:`_read_checkpoint` into the (wrapped) model, the optimizer, the
    schedule and the batch generator; what still does not fit raises ValueError naming ``path``."""
    set_model_state_dict(model, ck["model"], options=_FULL)
    try:
        # parameters that never had a gradient (the stand-in encoder's last layer past its K/V
        # projections) have no AdamW state in the file nor in an uninterrupted run
        set_optimizer_state_dict(model, optimizer, ck["optimizer"], options=_OPTIM_LOAD)
        scheduler.load_state_dict(ck["scheduler"])
        batches.generator.set_state(ck["generator"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"checkpoint {str(path)!r}: its optimizer, schedule or generator state does not fit "
            f"this run ({type(err).__name__}: {first})"
        ) from err


def train(cfg: TrainRunConfig, *, resume: bool = False, overwrite: bool = False,
          stop_at: int | None = None, progress: bool = True) -> Path:  # fmt: skip
    """Run (or resume) the training described by ``cfg``; returns the run folder.

    ``stop_at``: stop after this step with a checkpoint (e.g. a job's time limit); ``--resume``
    continues from there exactly as if the run had not stopped."""
    rank, world, device = setup_distributed()
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.batch_size % world:
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the {world} processes"
        )
    run = Path(cfg.run.root) / cfg.run.name
    if rank == 0 and not overwrite:  # a wrong flag is refused before the (slow) input checks
        if resume:
            _check_resumable(run)
        run = prepare_run_dir(cfg.run.root, cfg.run.name, resume=resume, overwrite=False,
                              checkpoints="checkpoint.pt")  # fmt: skip
        if resume:
            _check_resume_config(run, cfg)
    if dist.is_initialized():
        dist.barrier()
    # the input checks: until they pass, a new run's folder holds only prepare_run_dir's marker
    # (which counts as empty), so the corrected command starts it again without a flag
    frames = read_frames(cfg)
    batches = Batches(frames, cfg)
    plain = build_model(cfg, frames)
    checkpoint = _read_checkpoint(run / "checkpoint.pt", plain) if resume else None
    model = wrap(plain, cfg.train.parallel, world, device)
    params = [p for p in model.parameters() if p.requires_grad]
    tc = cfg.train
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.steps)
    )
    start, skipped = 0, 0
    if checkpoint is not None:
        _load_checkpoint(run / "checkpoint.pt", checkpoint, model, optimizer, scheduler, batches)
        start, skipped = checkpoint["step"], checkpoint["skipped"]
    if rank == 0:
        if resume:
            truncate_jsonl(run / "metrics.jsonl", start)
        else:
            if overwrite:  # the old run is replaced only now, by a config that passed the checks
                run = prepare_run_dir(cfg.run.root, cfg.run.name, resume=False, overwrite=True)
            atomic_write_text(run / "config.yaml", config_to_yaml(cfg))
    if dist.is_initialized():
        dist.barrier()
    diagnostics = TTTDiagnostics(plain.policy.expert)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=tc.precision == "autocast_bf16")
    local = tc.batch_size // world
    mine = slice(rank * local, (rank + 1) * local)
    last = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    if rank == 0 and start >= last:  # a resumed run never goes back: say that nothing is left
        asked = f" (--stop-at {stop_at})" if stop_at is not None and stop_at < tc.steps else ""
        print(f"{run} is already at step {start} of {tc.steps}{asked}: nothing to train")
    bar = tqdm(range(start + 1, last + 1), desc=f"train {cfg.run.name}", initial=start,
               total=tc.steps, disable=not progress or rank != 0)  # fmt: skip
    for step in bar:
        t0 = time.perf_counter()
        frames, actions, noise, t = (x[mine] for x in batches.draw(tc.batch_size, plain.policy))
        observation = [x.to(device) for x in batches.observe(frames)]
        log_layers = step % tc.log_every == 0
        with diagnostics.capture(log_layers), autocast:
            loss = model(*observation, actions.to(device), noise.to(device), t.to(device))
        loss.backward()
        layer_grads = diagnostics.grad_norms() if log_layers else None
        mean_loss = loss.detach().float()
        if dist.is_initialized():
            dist.all_reduce(mean_loss)
            mean_loss /= world
        stepped, grad_norm = guarded_step(optimizer, params, mean_loss, tc.grad_clip)
        skipped += not stepped
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        if rank == 0:
            record = {"step": step, "loss": float(mean_loss), "grad_norm": grad_norm, "lr": lr,
                      "skipped": not stepped, "skipped_total": skipped,
                      "seconds": time.perf_counter() - t0}  # fmt: skip
            if log_layers:
                record["ttt_layers"] = diagnostics.records(layer_grads)
            if not stepped:
                bar.write(f"step {step}: non-finite loss or gradient norm; optimizer step skipped")
            append_jsonl(run / "metrics.jsonl", record)
            bar.set_postfix(loss=f"{float(mean_loss):.4f}")
        if step % tc.ckpt_every == 0 or step == last:
            save_run(run, model, optimizer, scheduler, batches, step, skipped, rank)
    bar.close()
    if rank == 0 and last == tc.steps:
        plot_metrics(run / "metrics.jsonl", run / "plots.png")
    return run
