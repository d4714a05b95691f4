"""Pre-tokenized Moshi training shards: loading, checks, fixed-length windows, batches.

A shard holds the token streams of one or more recordings in Moshi's layout, codebook 0 = text,
codebooks 1..n_q = audio (Mimi codes), at 12.5 Hz::

    shard.npz           array "codes", integer, [K, T] (one recording) or [N, K, T]
    shard.safetensors   tensor "codes", same shapes

Every value must be a token id of its stream (text: 0 <= id < text_card, audio: 0 <= id < card) or,
if allowed, Moshi's "no input" id -1. The loader checks this for every shard up front and names the
file, codebook and first bad position, so a wrong tokenizer or vocabulary fails before training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ttt_core.runfiles import reading

__all__ = ["TokenShards", "load_shard", "save_shard"]

ZERO_TOKEN_ID = -1  # moshi LMModel.zero_token_id: no input at this step, no loss


def save_shard(path: str | os.PathLike, codes: np.ndarray | Tensor) -> Path:
    """Write ``codes`` ([K, T] or [N, K, T], integer) as .npz or .safetensors, atomically."""
    path = Path(path)
    arr = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"codes must be integer token ids, got dtype {arr.dtype}")
    if path.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"path must end in .npz or .safetensors, got {path.name!r}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, codes=arr.astype(np.int64))
        else:
            from safetensors.numpy import save_file

            save_file({"codes": np.ascontiguousarray(arr.astype(np.int64))}, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file
        raise
    return path


def load_shard(path: str | os.PathLike) -> np.ndarray:
    """Read the ``codes`` array of a shard as int64 [N, K, T] (a [K, T] shard gets N = 1)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"shard {path} does not exist")
    if path.suffix == ".npz":
        with reading(path, "shard"), np.load(path, allow_pickle=False) as z:
            if "codes" not in z.files:
                raise ValueError(f"shard {path} has no array 'codes' (has {sorted(z.files)})")
            arr = z["codes"]
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        with reading(path, "shard"):
            tensors = load_file(str(path))
        if "codes" not in tensors:
            raise ValueError(f"shard {path} has no tensor 'codes' (has {sorted(tensors)})")
        arr = tensors["codes"]
    else:
        raise ValueError(f"shard {path}: unknown format {path.suffix!r} (use .npz or .safetensors)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"shard {path}: 'codes' must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"shard {path}: 'codes' must be [K, T] or [N, K, T], got shape {arr.shape}"
        )
    return arr.astype(np.int64)


def check_codes(
    codes: np.ndarray,
    *,
    num_codebooks: int,
    card: int,
    text_card: int,
    allow_zero_token: bool,
    where: str = "codes",
) -> None:
    """Raise ValueError unless ``codes`` [N, K, T] fit Moshi's streams and vocabularies."""
    if codes.ndim != 3:
        raise ValueError(f"{where}: expected [N, K, T], got shape {codes.shape}")
    if codes.shape[1] != num_codebooks:
        raise ValueError(
            f"{where}: has {codes.shape[1]} codebooks (shape {codes.shape}), the model expects "
            f"num_codebooks={num_codebooks} (1 text + {num_codebooks - 1} audio)"
        )
    low = ZERO_TOKEN_ID if allow_zero_token else 0
    for k in range(num_codebooks):
        high = text_card if k == 0 else card
        row = codes[:, k]
        bad = (row < low) | (row >= high)
        if bad.any():
            n, t = (int(i[0]) for i in np.nonzero(bad))
            kind = "text" if k == 0 else "audio"
            raise ValueError(
                f"{where}: {kind} codebook {k} has token {int(row[n, t])} at sequence {n}, "
                f"step {t}; "
                f"valid ids are {low}..{high - 1} ({'text_card' if k == 0 else 'card'}={high})"
            )


@dataclass
class TokenShards:
    """Fixed-length training windows [K, seq_len] cut from checked shards.

    Args:
        paths: shard files (.npz / .safetensors).
        num_codebooks: K = 1 + n_q of the model (``lm.num_codebooks``).
        card: audio vocabulary size (``lm.card``); text_card: text vocabulary (``lm.text_card``).
        seq_len: window length in steps (``duration_sec * 12.5`` for Moshi).
        allow_zero_token: accept Moshi's -1 ("no input") ids.

    Each recording is cut into ``T // seq_len`` non-overlapping windows (the tail is dropped).
    """

    paths: Sequence[str | os.PathLike]
    num_codebooks: int
    card: int
    text_card: int
    seq_len: int
    allow_zero_token: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, os.PathLike)):
            raise TypeError("paths must be a list of shard files, not a single path")
        if not self.paths:
            raise ValueError("paths is empty: give at least one shard")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        windows = []
        for p in self.paths:
            codes = load_shard(p)  # (N, K, T)
            check_codes(
                codes,
                num_codebooks=self.num_codebooks,
                card=self.card,
                text_card=self.text_card,
                allow_zero_token=self.allow_zero_token,
                where=f"shard {p}",
            )
            n_win = codes.shape[2] // self.seq_len
            for w in range(n_win):
                windows.append(codes[:, :, w * self.seq_len : (w + 1) * self.seq_len])
        if not windows:
            raise ValueError(
                f"no shard is at least seq_len={self.seq_len} steps long; shorten duration_sec"
            )
        self.windows = torch.from_numpy(np.concatenate(windows, axis=0))  # (W, K, seq_len)

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return self.windows[i]

    def batches(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        start: int = 0,
    ) -> Iterator[Tensor]:
        """Batches [batch_size, K, seq_len]; ``epochs=None`` loops forever, reshuffled.

        The stream depends only on ``seed``: ``start=n`` yields what the stream yields after its
        first ``n`` batches (a resumed run reads the batches an uninterrupted run would read).
        """
        if batch_size < 1 or batch_size > len(self):
            raise ValueError(f"batch_size must be in 1..{len(self)} (windows), got {batch_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        g = torch.Generator().manual_seed(seed)
        per_epoch = len(self) // batch_size
        epoch = 0
        n, cpu = len(self), torch.device("cpu")  # the windows' device, whatever the default device
        while epochs is None or epoch < epochs:
            order = (
                torch.randperm(n, generator=g, device=cpu)
                if shuffle
                else torch.arange(n, device=cpu)
            )
            for b in range(per_epoch):
                if epoch * per_epoch + b >= start:
                    yield self.windows[order[b * batch_size : (b + 1) * batch_size]]
            epoch += 1
