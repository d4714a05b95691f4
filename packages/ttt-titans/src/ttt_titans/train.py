"""Protocol: pretrain on the train split (early stopping on val), then online over the test split.

Online (the online-forecasting protocol of FSNet / OneNet): test windows come in time order with
stride ``online_stride``; for each, the model first predicts (the error is recorded), then, once
the truth is known, takes ``online_steps`` outer AdamW steps on that window. The neural memory
writes every window's steps inside its forward pass (test-time training on the lookback). With
``memory.carry`` its state is also carried along the stream: each window's memory pass starts
from the state that has written every step before the window, and the first ``online_stride``
steps (which leave the next window) are committed to it; without it (default) every window starts
from the initial weights, as in pretraining. Errors are MSE / MAE on the normalised scale.

Checkpoints (``Runner.save``) are written atomically (``ttt_core.runfiles.atomic_save``) and hold
the model, optimiser, memory state, history and RNG state, so ``load`` + next step == next step.
``Runner.load`` reads them with ``safe_load`` (``weights_only=True``): a checkpoint holds only
tensors, plain data and ``TTTState``, so a crafted file cannot run code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ttt_core import TTTState
from ttt_core.runfiles import atomic_save, safe_load

from .config import ExperimentConfig, apply_overrides, resume_config
from .data import Splits, WindowDataset, load_embedded, load_ett_csv, make_splits
from .model import ContinualForecaster


def build_splits(cfg: ExperimentConfig) -> Splits:
    d = cfg.data
    need = d.lookback + d.horizon
    series = (
        load_embedded(d.target, min_rows=need)
        if d.path is None
        else load_ett_csv(d.path, d.target, min_rows=need)
    )
    return make_splits(series, d.lookback, d.horizon, d.split, d.features, d.max_rows)


@dataclass
class History:
    epoch_seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    online_pred: list[list[float]] = field(default_factory=list)  # per window (horizon,)
    online_true: list[list[float]] = field(default_factory=list)
    online_seconds: float = 0.0


class Runner:
    """Holds model, optimiser, data and progress of one experiment (one mode)."""

    def __init__(
        self, cfg: ExperimentConfig, splits: Splits | None = None, progress: bool = True
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.splits = splits if splits is not None else build_splits(cfg)
        s, d = self.splits, cfg.data
        for name in ("online_stride", "train_stride"):
            if getattr(d, name) > d.lookback:
                raise ValueError(
                    f"data.{name} ({getattr(d, name)}) must be <= data.lookback ({d.lookback}) "
                    "so every step of the stream is written to the memory"
                )
        target_in = s.in_idx.index(s.target_idx)
        # Built on the CPU (its initial weights drawn from the CPU generator seeded above) and then
        # moved: the same weights on every cfg.device and whatever torch's default device is.
        with torch.device("cpu"):
            model = ContinualForecaster(cfg, len(s.in_idx), target_in)
        self.model = model.to(cfg.device)
        kw = dict(in_idx=s.in_idx, target_idx=s.target_idx)
        self.train_ds = WindowDataset(s.train, d.lookback, d.horizon, d.train_stride, **kw)
        self.val_ds = WindowDataset(s.val, d.lookback, d.horizon, 1, **kw)
        self.test_ds = WindowDataset(s.test, d.lookback, d.horizon, d.online_stride, **kw)
        t = cfg.train
        self.opt = torch.optim.AdamW(
            self.model.outer_parameters(), lr=t.lr, weight_decay=t.weight_decay
        )
        self.history = History()
        self.phase = "pretrain"
        self.epoch = 0
        self.online_step = 0
        self.best_val = math.inf
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.mem_state: TTTState | None = None
        self.resume_changes: dict[str, tuple[Any, Any]] = {}  # set by load: applied config changes

    # ---------------------------------------------------------------- pretraining
    @property
    def streaming(self) -> bool:
        """Carry the memory state across windows (train as the online phase tests)."""
        return self.cfg.memory.carry and self.model.memory is not None

    def _batches(self, ds: WindowDataset, batch_size: int, shuffle: bool):
        """Yield (x, y) batches.

        Shuffled (or in order) windows, each starting from the memory's initial weights; or, when
        ``streaming``, ``batch_size`` parallel streams: stream b reads windows
        ``b * per, ..., b * per + per - 1`` (consecutive, ``ds.stride`` apart), so the memory
        state of batch i is carried to batch i + 1 with ``commit = ds.stride``.
        """
        if self.streaming:
            n_streams = min(batch_size, len(ds))
            per = len(ds) // n_streams
            batches = [[b * per + i for b in range(n_streams)] for i in range(per)]
        else:
            g = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1000 + self.epoch)
            batches = _loader_order(len(ds), batch_size, shuffle, g)
        for idx in batches:  # window indices of one batch
            items = [ds[i] for i in idx]
            yield torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])

    def _n_batches(self, ds: WindowDataset, batch_size: int) -> int:
        if self.streaming:
            return len(ds) // min(batch_size, len(ds))
        return -(-len(ds) // batch_size)

    @torch.no_grad()
    def evaluate(self, ds: WindowDataset) -> float:
        """Mean MSE over ds's windows (streamed with a carried memory state when ``carry``)."""
        self.model.eval()
        tot, n, state = 0.0, 0, None
        for x, y in self._batches(ds, 256, shuffle=False):
            x, y = x.to(self.cfg.device), y.to(self.cfg.device)
            commit = ds.stride if self.streaming else 0
            pred, state = self.model(x, state, commit=commit)
            tot += float(torch.mean((pred - y) ** 2)) * len(x)
            n += len(x)
        return tot / max(n, 1)

    def train_epoch(self) -> float:
        """One pretraining epoch; returns the mean train loss (and records seconds)."""
        t, dev = self.cfg.train, self.cfg.device
        self.model.train()
        loader = self._batches(self.train_ds, t.batch_size, shuffle=True)
        n_batches = self._n_batches(self.train_ds, t.batch_size)
        if t.max_batches_per_epoch is not None:
            n_batches = min(n_batches, t.max_batches_per_epoch)
        losses = []
        state = None  # memory state of the streams (streaming only)
        commit = self.train_ds.stride if self.streaming else 0
        start = time.perf_counter()
        bar = tqdm(
            loader,
            total=n_batches,
            desc=f"{self.cfg.mode} epoch {self.epoch + 1}",
            disable=not self.progress,
            leave=False,
        )
        for i, (x, y) in enumerate(bar):
            if i >= n_batches:
                break
            pred, state = self.model(x.to(dev), state, commit=commit)
            state = None if state is None else state.detach()  # truncated BPTT
            loss = torch.mean((pred - y.to(dev)) ** 2)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.outer_parameters(), t.grad_clip)
            self.opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        self.history.epoch_seconds.append(time.perf_counter() - start)
        return float(np.mean(losses))

    def pretrain(self, on_epoch=None) -> None:
        """Epochs with early stopping on val MSE; restores the best weights at the end."""
        t = self.cfg.train
        while self.phase == "pretrain" and self.epoch < t.epochs:
            tr = self.train_epoch()
            va = self.evaluate(self.val_ds)
            self.history.train_loss.append(tr)
            self.history.val_loss.append(va)
            self.epoch += 1
            if va < self.best_val:
                self.best_val, self.bad_epochs = va, 0
                self.best_state = {k: v.clone() for k, v in self.model.state_dict().items()}
            else:
                self.bad_epochs += 1
            if self.bad_epochs >= t.patience:
                break
            if on_epoch is not None:
                on_epoch(self)
        self._start_online()

    def _start_online(self) -> None:
        if self.phase != "pretrain":
            return
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        self.opt = torch.optim.AdamW(
            self.model.outer_parameters(),
            lr=self.cfg.train.online_lr,
            weight_decay=self.cfg.train.weight_decay,
        )
        self.phase = "online"

    # ---------------------------------------------------------------- online phase
    def online_step_once(self) -> float:
        """Predict test window ``online_step``, then learn from its truth; returns its MSE."""
        if self.phase != "online":
            raise ValueError("online_step_once needs the online phase: call pretrain() first")
        dev, t = self.cfg.device, self.cfg.train
        x, y = self.test_ds[self.online_step]
        x, y = x[None].to(dev), y[None].to(dev)  # (1, L, V), (1, H, 1)
        self.model.eval()
        with torch.no_grad():
            pred, _ = self.model(x, self.mem_state)
        self.history.online_pred.append(pred.flatten().tolist())
        self.history.online_true.append(y.flatten().tolist())
        self.model.train()
        commit = self.cfg.data.online_stride if self.cfg.memory.carry else 0
        new_state = None
        for _ in range(t.online_steps):
            out, st = self.model(x, self.mem_state, commit=commit)
            new_state = st if new_state is None else new_state
            loss = torch.mean((out - y) ** 2)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.outer_parameters(), t.grad_clip)
            self.opt.step()
        self.mem_state = None if new_state is None else new_state.detach()
        self.online_step += 1
        return float(torch.mean((pred - y) ** 2))

    def online(self, max_steps: int | None = None, on_step=None) -> None:
        n = len(self.test_ds) if max_steps is None else min(len(self.test_ds), max_steps)
        start = time.perf_counter()
        bar = tqdm(
            total=n,
            initial=self.online_step,
            desc=f"{self.cfg.mode} online",
            disable=not self.progress,
            leave=False,
        )
        while self.online_step < n:
            self.online_step_once()
            bar.update(1)
            if on_step is not None:
                on_step(self)
        bar.close()
        self.history.online_seconds += time.perf_counter() - start

    # ---------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, Any]:
        p = np.asarray(self.history.online_pred)
        y = np.asarray(self.history.online_true)
        err = p - y
        eps = self.history.epoch_seconds
        return {
            "mode": self.cfg.mode,
            "backbone": self.cfg.model.backbone,
            "mse": float(np.mean(err**2)) if err.size else math.nan,
            "mae": float(np.mean(np.abs(err))) if err.size else math.nan,
            "online_windows": len(p),
            "epochs": self.epoch,
            "seconds_per_epoch": float(np.mean(eps)) if eps else math.nan,
            "online_seconds": self.history.online_seconds,
            "best_val_mse": self.best_val,
            "n_outer_params": sum(p.numel() for p in self.model.outer_parameters()),
        }

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "phase": self.phase,
            "epoch": self.epoch,
            "online_step": self.online_step,
            "best_val": self.best_val,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
            "mem_state": self.mem_state,
            "history": self.history.__dict__,
            "rng": torch.get_rng_state(),
        }

    def save(self, path: str | Path) -> Path:
        """Atomic checkpoint (``atomic_save``): a kill or a full disk leaves the previous one."""
        return atomic_save(self.state_dict(), path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        splits: Splits | None = None,
        progress: bool = True,
        requested: dict[str, Any] | None = None,
        overrides: Sequence[str] = (),
    ) -> Runner:
        """Rebuild a runner from a checkpoint; the next step equals the one the saver would take.

        Args:
            path: a checkpoint written by :meth:`save` (loaded with ``weights_only=True``).
            splits: the data splits, if already built (else read from the config's data).
            progress: tqdm bars.
            requested: the config the caller asks for (a raw dict, e.g. ``--config`` + overrides);
                ``None``: the saved config with ``overrides`` applied. Only the keys
                :func:`~ttt_titans.config.resume_config` allows may differ from the saved config;
                the applied changes are in ``runner.resume_changes`` (dotted key -> (old, new)).
            overrides: ``key=value`` changes to the saved config (when ``requested`` is None).

        Raises:
            ValueError: naming the file: missing, truncated, not a ttt-titans checkpoint, or
                holding objects a safe load refuses; or a requested change a resume cannot make.
        """
        path = Path(path)
        ck = safe_load(path)
        missing = [k for k in cls._CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
        if missing:
            raise ValueError(
                f"checkpoint {str(path)!r} is not a ttt-titans checkpoint (no {missing})"
            )
        saved = ck["config"]
        if requested is None:
            requested = apply_overrides(saved, list(overrides))
        cfg, changes = resume_config(saved, requested, pretraining=ck["phase"] == "pretrain")
        r = cls(cfg, splits=splits, progress=progress)
        r.resume_changes = changes
        r.model.load_state_dict(ck["model"])
        r.phase = ck["phase"]
        if r.phase == "online":  # online optimiser has online_lr
            r.opt = torch.optim.AdamW(
                r.model.outer_parameters(),
                lr=cfg.train.online_lr,
                weight_decay=cfg.train.weight_decay,
            )
        r.opt.load_state_dict(ck["opt"])
        r.epoch, r.online_step = ck["epoch"], ck["online_step"]
        r.best_val, r.bad_epochs = ck["best_val"], ck["bad_epochs"]
        r.best_state = ck["best_state"]  # (loaded into the model on cfg.device when used)
        # the carried memory state: loaded on the CPU, used on cfg.device
        r.mem_state = None if ck["mem_state"] is None else ck["mem_state"].to(cfg.device)
        r.history = History(**ck["history"])
        torch.set_rng_state(ck["rng"])
        return r

    _CHECKPOINT_KEYS = (
        "config", "model", "opt", "phase", "epoch", "online_step", "best_val", "bad_epochs",
        "best_state", "mem_state", "history", "rng",
    )  # fmt: skip


def _loader_order(n: int, batch_size: int, shuffle: bool, g: torch.Generator) -> list[list[int]]:
    """The window indices of each batch, in the order ``DataLoader(ds, batch_size, shuffle,
    generator=g)`` gives them (it draws one int64 from ``g`` for its worker seed, then
    ``randperm(n)``), drawn on the CPU whatever torch's default device is (DataLoader draws on
    the default device, which refuses a CPU generator when a user made CUDA the default)."""
    if shuffle:
        torch.empty((), dtype=torch.int64, device="cpu").random_(generator=g)
        order = torch.randperm(n, generator=g, device="cpu").tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]
