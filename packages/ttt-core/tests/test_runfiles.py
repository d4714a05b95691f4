"""ttt_core.runfiles: atomic writes, safe loads, the run-directory policy, the metrics log."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ttt_core.runfiles import (
    RUN_MARKER,
    append_jsonl,
    atomic_path,
    atomic_save,
    atomic_write_text,
    prepare_run_dir,
    reading,
    safe_load,
    sweep_stale_tmp,
    truncate_jsonl,
)
from ttt_core.state import TTTState


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tmp"))


@dataclass
class _Extra:  # a package's own class, allow-listed by the caller
    n: int
    w: torch.Tensor


class _MakesDir:
    """A pickle payload: loading it calls os.mkdir(target) (stands in for os.system)."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


# ----------------------------------------------------------------------------- safe_load
def test_safe_load_round_trips_state_and_plain_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = TTTState(
        params={"W1": torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)},
        offset=2,
        mini_batch_size=7,
        grad_sum={"W1": torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64)},
    )
    obj = {"state": state, "step": 11, "best": float("inf"), "hist": [1.5, 2.5], "name": "x"}
    path = atomic_save(obj, tmp_path / "ck.pt")
    back = safe_load(path)
    assert back["step"] == 11 and back["best"] == float("inf") and back["hist"] == [1.5, 2.5]
    assert isinstance(back["state"], TTTState)
    assert back["state"].offset == 2 and back["state"].mini_batch_size == 7
    assert back["state"].params["W1"].device.type == "cpu"  # safe_load maps to the CPU
    assert torch.equal(back["state"].params["W1"], state.params["W1"].cpu())
    assert torch.equal(back["state"].grad_sum["W1"], state.grad_sum["W1"].cpu())


def test_malicious_pickle_does_not_run(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "x": _MakesDir(target)}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.*GLOBAL posix\.mkdir"):
        safe_load(path)
    assert not target.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert target.is_dir()


def test_own_classes_load_only_when_allow_listed(tmp_path):
    path = atomic_save({"e": _Extra(3, torch.arange(4.0))}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"extra\.pt.*_Extra.*allow="):
        safe_load(path)
    back = safe_load(path, allow=[_Extra])["e"]
    assert back.n == 3 and torch.equal(back.w, torch.arange(4.0, device="cpu"))


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5], ids=["empty", "1byte", "100bytes", "half"])
def test_truncated_checkpoint_names_the_file(tmp_path, keep):
    path = atomic_save({"w": torch.randn(64, 64)}, tmp_path / "ck.pt")
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:n])
    with pytest.raises(ValueError, match=r"checkpoint '.*ck\.pt' is truncated or corrupt"):
        safe_load(path)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint '.*nope\.pt' does not exist"):
        safe_load(tmp_path / "nope.pt")


def test_reading_names_truncated_gzip_and_npz(tmp_path):
    gz = tmp_path / "d.csv.gz"
    packed = gzip.compress(b"date,OT\n" + b"2020-01-01,1.0\n" * 2000)
    gz.write_bytes(packed[: len(packed) // 2])
    with (
        pytest.raises(ValueError, match=r"data file '.*d\.csv\.gz' is truncated.*EOFError"),
        reading(gz, "data file") as p,
        gzip.open(p, "rt") as fh,
    ):
        fh.read()
    npz = tmp_path / "s.npz"
    np.savez(npz, codes=np.arange(5000))
    npz.write_bytes(npz.read_bytes()[:300])
    with (
        pytest.raises(ValueError, match=r"shard '.*s\.npz' is truncated or corrupt"),
        reading(npz, "shard") as p,
        open(p, "rb") as fh,  # np.load(path) leaks the file when the zip is bad
    ):
        np.load(fh)["codes"]


# ----------------------------------------------------------------------------- atomic writes
def test_atomic_save_on_a_full_disk_keeps_the_old_file(tmp_path):
    resource = pytest.importorskip("resource")
    path = atomic_save({"w": torch.zeros(3)}, tmp_path / "ck.pt")
    before = path.read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # writes past 64 KiB fail: EFBIG
    try:
        with pytest.raises((OSError, RuntimeError)):  # torch re-raises EFBIG as RuntimeError
            atomic_save({"w": torch.zeros(1 << 20)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert _tmp_files(tmp_path) == []


def test_atomic_writes_remove_the_temp_file_on_error(tmp_path):
    path = atomic_write_text(tmp_path / "m.json", "old")
    with pytest.raises((AttributeError, TypeError, RuntimeError)):
        atomic_save({"f": lambda x: x}, path)  # not picklable: fails mid-write
    assert path.read_text() == "old"
    assert _tmp_files(tmp_path) == []


def test_atomic_path_for_a_writer_that_takes_a_file_name(tmp_path):
    """atomic_path: the block writes the temp file by name; the target appears whole at the end,
    and an error inside the block leaves the old target and no temp file."""
    path = tmp_path / "w.bin"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp") and not path.exists()
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and _tmp_files(tmp_path) == []
    with pytest.raises(ValueError, match="writer failed"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("writer failed")
    assert path.read_bytes() == b"new" and _tmp_files(tmp_path) == []


def test_kill_during_a_write_leaves_a_tmp_that_is_swept(tmp_path):
    """A real SIGKILL between writing the temp file and renaming it; the sweep removes it."""
    path = tmp_path / "ck.pt"
    atomic_save({"w": torch.zeros(3)}, path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from ttt_core import runfiles
        runfiles.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        runfiles.atomic_save({{"w": torch.ones(3)}}, {str(path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert len(_tmp_files(tmp_path)) == 1
    assert torch.equal(safe_load(path)["w"], torch.zeros(3, device="cpu"))  # the old file is whole
    keep = tmp_path / "notes.txt"
    keep.write_text("kept")
    assert sweep_stale_tmp(tmp_path) != []
    assert _tmp_files(tmp_path) == [] and keep.read_text() == "kept"


# ----------------------------------------------------------------------------- run directory
def test_fresh_run_dir_is_created_and_a_second_start_is_refused(tmp_path):
    run = prepare_run_dir(tmp_path / "runs", "exp1", resume=False, overwrite=False)
    assert run == tmp_path / "runs" / "exp1" and run.is_dir()
    # a run that failed before writing anything (only the marker) may start again
    assert prepare_run_dir(tmp_path / "runs", "exp1", resume=False, overwrite=False) == run
    (run / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not empty: pass --resume .* --overwrite"):
        prepare_run_dir(tmp_path / "runs", "exp1", resume=False, overwrite=False)
    assert (run / "checkpoint.pt").read_bytes() == b"x"


def test_overwrite_empties_a_marked_run_dir_only(tmp_path):
    run = prepare_run_dir(tmp_path, "exp", resume=False, overwrite=False)
    (run / "old_metrics.jsonl").write_text("{}\n")
    run = prepare_run_dir(tmp_path, "exp", resume=False, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [RUN_MARKER]
    unmarked = tmp_path / "home"
    unmarked.mkdir()
    (unmarked / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=r"no \.ttt-run marker"):
        prepare_run_dir(tmp_path, "home", resume=False, overwrite=True)
    assert (unmarked / "thesis.tex").read_text() == "precious"


def test_resume_needs_a_checkpoint_and_keeps_the_run(tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        prepare_run_dir(tmp_path, "exp", resume=True, overwrite=False)
    run = prepare_run_dir(tmp_path, "exp", resume=False, overwrite=False)
    (run / "config.yaml").write_text("a: 1")
    with pytest.raises(ValueError, match=r"nothing to resume .*'\*\.pt'"):
        prepare_run_dir(tmp_path, "exp", resume=True, overwrite=False)
    (run / "step5.pt").write_bytes(b"x")
    (run / ".step6.pt.abc.tmp").write_bytes(b"partial")
    assert prepare_run_dir(tmp_path, "exp", resume=True, overwrite=False) == run
    assert (run / "config.yaml").is_file() and (run / "step5.pt").is_file()
    assert _tmp_files(run) == []
    with pytest.raises(ValueError, match="exclude each other"):
        prepare_run_dir(tmp_path, "exp", resume=True, overwrite=True)


@pytest.mark.parametrize(
    "name",
    ["../x", "/tmp/x", "a/../../x", ".", "", "a/.."],
    ids=["parent", "absolute", "nested-parent", "dot", "empty", "back-to-root"],
)
def test_run_names_cannot_leave_the_root(tmp_path, name):
    root = tmp_path / "runs"
    with pytest.raises(ValueError, match="run name"):
        prepare_run_dir(root, name, resume=False, overwrite=False)
    assert not (tmp_path / "x").exists()


def test_run_name_through_a_symlink_out_of_the_root_is_rejected(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="below"):
        prepare_run_dir(root, "link/x", resume=False, overwrite=False)
    assert prepare_run_dir(root, "sweep/a1", resume=False, overwrite=False).is_dir()


# ----------------------------------------------------------------------------- metrics log
def test_truncate_jsonl_lets_a_resumed_run_continue_without_repeats(tmp_path):
    log = tmp_path / "metrics.jsonl"
    for step in range(1, 6):
        append_jsonl(log, {"step": step, "loss": 1.0 / step})
    with open(log, "a") as fh:
        fh.write('{"step": 6, "lo')  # torn by a kill
    assert truncate_jsonl(log, 3) == 3
    for step in range(4, 8):
        append_jsonl(log, {"step": step, "loss": 0.0})
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


def test_truncate_jsonl_rejects_a_corrupt_middle_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl' line 2 is not JSON"):
        truncate_jsonl(log, 5)
    assert truncate_jsonl(tmp_path / "missing.jsonl", 5) == 0
