"""kill -9 during training, again and again: every checkpoint loads and the resumed run ends
exactly where an uninterrupted run ends (losses, metrics log, final weights)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_KWARGS, random_codes

from ttt_moshi import FinetuneConfig, Trainer, latest_checkpoint, save_shard
from ttt_moshi.checkpoint import read_checkpoint

KILLS = 5
BUDGET_S = 40  # stop killing after this (a loaded machine starts processes slowly)


def _lines(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


@pytest.mark.cpu_only(
    "the killed runs are subprocesses, out of the switch's reach (weights drawn on the CPU, moshi's "
    "kernels compiled on CUDA), compared bit for bit with a run in this process (weights drawn on "
    "the GPU, no compile)"
)
def test_kill_9_loop_resumes_exactly(tmp_path):
    shard = save_shard(tmp_path / "train.npz", random_codes(6, 40, seed=5))
    cfg = {
        "data": {"train_data": [str(shard)]},
        "duration_sec": 1.6,
        "batch_size": 2,
        "max_steps": 30,
        "log_freq": 100,
        "ckpt_freq": 1,
        "num_ckpt_keep": 2,
        "optim": {"lr": 3e-3, "pct_start": 0.2},
        "model": {"lm_kwargs": TINY_KWARGS},
        "ttt": {"layers": [1], "config": {"mini_batch_size": 4}},
        "attention_context": 10,
        "ttt_attention_context": 5,
    }
    reference = Trainer(
        FinetuneConfig.from_dict({**cfg, "run_dir": str(tmp_path / "ref")}), progress=False
    )
    reference.fit()

    run = tmp_path / "run"
    (tmp_path / "ft.yaml").write_text(json.dumps({**cfg, "run_dir": str(run)}))
    cmd = [sys.executable, "-m", "ttt_moshi.finetune", "--config", str(tmp_path / "ft.yaml")]
    cmd.append("--no-progress")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rng = random.Random(0)
    kills, start = 0, time.monotonic()
    while kills < KILLS and time.monotonic() - start < BUDGET_S:
        try:
            latest_checkpoint(run)
            mode = "--resume"
        except ValueError:
            mode = "--overwrite"
        done = len(_lines(run / "metrics.jsonl"))
        proc = subprocess.Popen(
            [*cmd, mode], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        while proc.poll() is None and len(_lines(run / "metrics.jsonl")) <= done:
            time.sleep(0.02)  # wait until it trains
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break  # finished before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        for ckpt in run.glob("*.pt"):  # every checkpoint on disk is whole
            assert read_checkpoint(ckpt)["step"] >= 1
    assert kills >= 2, "the loop must have killed training at least twice"
    if not (run / "final.pt").exists():  # a kill can land after the run wrote final.pt: then done
        last = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True)
        assert last.returncode == 0, last.stderr[-2000:]

    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))
    got = [r["loss"] for r in _lines(run / "metrics.jsonl")]
    assert got == [r["loss"] for r in reference.history]  # bit for bit, no step twice
    final = read_checkpoint(run / "final.pt")["model"]
    assert all(torch.equal(v, final[k]) for k, v in reference.lm.state_dict().items())
