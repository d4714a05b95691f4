"""Two gloo processes (FSDP2 by layer, and DDP) train like one process on the whole batch, also
when the run stops and resumes (a sharded checkpoint gathered, then loaded into the shards)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_KWARGS, random_codes

from ttt_moshi import FinetuneConfig, Trainer, load_checkpoint, save_shard


def _worker(rank: int, world: int, init_file: str, cfg: dict) -> None:
    from moshi.utils.compile import no_compile

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = FinetuneConfig.from_dict(cfg)
        with no_compile():
            Trainer(config, progress=False).fit(max_steps=1)  # stop after one step
            Trainer(config, progress=False, resume=True).fit()
    finally:
        dist.destroy_process_group()


def _config(tmp_path, name: str, batch_size: int, parallelism: str) -> dict:
    shard = tmp_path / "train.npz"
    if not shard.exists():
        save_shard(shard, random_codes(6, 40, seed=8))
    return {
        "run_dir": str(tmp_path / name),
        "data": {"train_data": [str(shard)]},
        "duration_sec": 1.6,
        "batch_size": batch_size,
        "max_steps": 3,
        "log_freq": 100,
        "parallelism": parallelism,
        "optim": {"lr": 1e-2, "pct_start": 0.4},
        "first_codebook_weight_multiplier": 10.0,
        "text_padding_weight": 0.5,
        "model": {"lm_kwargs": TINY_KWARGS},
        "ttt": {"layers": [0, 2], "config": {"mini_batch_size": 4}},
        "attention_context": 10,
        "ttt_attention_context": 5,
    }


def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
def test_two_processes_equal_one_on_the_whole_batch(tmp_path, parallelism):
    two = _config(tmp_path, "two", batch_size=2, parallelism=parallelism)  # 2 x 2 windows
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), two), nprocs=2, join=True)
    one = Trainer(
        FinetuneConfig.from_dict(_config(tmp_path, "one", 4, parallelism)), progress=False
    )
    one.fit()
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    lm_two, payload = load_checkpoint(tmp_path / "two" / "final.pt")  # gathered by rank 0
    assert payload["step"] == 3 and (tmp_path / "two" / "step000001.pt").exists()
    sd_one = one.lm.state_dict()
    for k, v in lm_two.state_dict().items():
        # AdamW divides by sqrt(v): entries with near-zero gradients move by up to lr (1e-2) on
        # rounding alone; measured here: <= 2e-4 after 3 steps, most entries ~1e-6
        torch.testing.assert_close(v, sd_one[k], rtol=0, atol=1e-3, msg=k)
