"""Shared test data for ttt-titans (a small real-format ETT CSV and overrides for a tiny model) and
the device switch (TTT_TEST_DEVICE=cuda runs the tests on the GPU: tools/ttt_test_device.py)."""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from ttt_titans.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from ttt_test_device import *  # noqa: F403

# Modules that only make sense on the CPU: skipped with this reason under TTT_TEST_DEVICE=cuda.
CPU_ONLY = {"test_data.py": "the ETT CSV loader and its windows are numpy arrays on the CPU"}

TINY = [
    "data.lookback=16",
    "data.horizon=4",
    "data.online_stride=4",
    "data.train_stride=4",
    "data.max_rows=null",
    "data.target=OT",
    "model.d_model=8",
    "model.n_heads=2",
    "model.window=4",
    "model.n_persistent=2",
    "memory.chunk=4",
    "meta.hidden=8",
    "train.epochs=2",
    "train.batch_size=16",
]


def write_csv(path, n=400, seed=0):
    """n hourly rows from 2016-01-01 00:00: OT a noisy daily sine, HUFL a noisy cosine."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    ot = np.sin(2 * np.pi * t / 24) + 0.1 * rng.normal(size=n)
    x1 = np.cos(2 * np.pi * t / 24) + 0.1 * rng.normal(size=n)
    hours = [datetime(2016, 1, 1) + timedelta(hours=int(i)) for i in t]
    lines = ["date,HUFL,OT"] + [
        f"{d:%Y-%m-%d %H:%M},{a:.5f},{b:.5f}" for d, a, b in zip(hours, x1, ot)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_csv():
    """``make_csv(path, n=400, seed=0)``: write an hourly ETT-format CSV (date, HUFL, OT)."""
    return write_csv


@pytest.fixture
def tiny_overrides(tmp_path):
    """TINY plus ``data.path`` of a fresh 400-row CSV: a run of a few seconds."""
    return [*TINY, f"data.path={write_csv(tmp_path / 'ett.csv')}"]


@pytest.fixture
def tiny_cfg(tiny_overrides):
    """``tiny_cfg(mode, *overrides)``: a tiny ExperimentConfig on the fresh CSV."""
    return lambda mode, *extra: load_config("base.yaml", [*tiny_overrides, f"mode={mode}", *extra])
