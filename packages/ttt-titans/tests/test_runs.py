"""`ttt-titans run` folders: the run-directory policy, safe resume, no orphan temp files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ttt_titans.cli import main
from ttt_titans.train import Runner


def _run(out, overrides, *flags):
    return main(["run", "--config", "exp_meta_ttt.yaml", "--out", str(out), "--no-progress",
                 *flags, *overrides])  # fmt: skip


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


class _MakesDir:
    """A pickle payload: loading it calls os.mkdir(target) (stands in for os.system)."""

    def __init__(self, target) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_existing_run_is_refused_then_overwritten(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert _run(out, tiny_overrides) == 0
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert _run(out, [*tiny_overrides, "train.epochs=1"]) == 2
    err = capsys.readouterr().err
    assert "not empty: pass --resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "checkpoint.pt").read_bytes() == before  # untouched
    (out / "stale.txt").write_text("from the old run")
    assert _run(out, [*tiny_overrides, "train.epochs=1"], "--overwrite") == 0
    assert _metrics(out)["epochs"] == 1 and not (out / "stale.txt").exists()


def test_resume_needs_a_checkpoint(tmp_path, tiny_overrides, capsys):
    assert _run(tmp_path / "never", tiny_overrides, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["run", "--resume", "--no-progress"]) == 2  # no run folder named at all
    assert "needs --out" in capsys.readouterr().err


def test_resume_refuses_changes_it_cannot_make(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert _run(out, tiny_overrides) == 0
    m = _metrics(out)
    capsys.readouterr()
    assert _run(out, [*tiny_overrides, "memory.chunk=2"], "--resume") == 2
    assert "--resume cannot change memory.chunk: run has 4, requested 2" in capsys.readouterr().err
    cmd = ["run", "--out", str(out), "--resume", "--no-progress"]
    assert main([*cmd, "mode=baseline"]) == 2  # overrides on the run's own config, same rule
    assert "mode: run has 'meta_ttt', requested 'baseline'" in capsys.readouterr().err
    # a nested override on the run's own config is compared with the saved value, not written
    # into it first (apply_overrides copies every section)
    assert main([*cmd, "train.online_lr=0.5", "memory.carry=true"]) == 2
    err = capsys.readouterr().err
    assert "memory.carry: run has False, requested True" in err and "train.online_lr" in err
    assert "online_lr: 0.5" not in (out / "config.yaml").read_text()
    assert main([*cmd, "threads=2"]) == 0  # the machine may change
    assert "resume: threads: 1 -> 2" in capsys.readouterr().err
    assert _metrics(out)["mse"] == m["mse"]


def test_resume_applies_more_epochs_while_pretraining(tmp_path, tiny_cfg, tiny_overrides, capsys):
    """A run stopped after epoch 1 of 2, resumed with train.epochs=3, equals a 3-epoch run."""
    cfg = tiny_cfg("meta_ttt", "train.patience=5", "train.epochs=2")
    out = tmp_path / "run"
    out.mkdir()
    Runner(cfg, progress=False).pretrain(
        on_epoch=lambda r: r.save(out / "checkpoint.pt") if r.epoch == 1 else None
    )
    over = [*tiny_overrides, "train.patience=5"]
    assert _run(out, [*over, "train.epochs=3"], "--resume") == 0
    assert "resume: train.epochs: 2 -> 3" in capsys.readouterr().err
    ref = tmp_path / "ref"
    assert _run(ref, [*over, "train.epochs=3"]) == 0
    assert _metrics(out)["epochs"] == 3
    assert _metrics(out)["mse"] == _metrics(ref)["mse"]


def test_config_name_picks_the_folder_below_runs(tmp_path, tiny_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", "base.yaml", "--no-progress", *tiny_overrides, "name=a/b"]) == 0
    assert (tmp_path / "runs" / "a" / "b" / "metrics.json").is_file()


@pytest.mark.parametrize(
    "name",
    ["../escaped", "/tmp/ttt_titans_escaped", "a/../../escaped"],
    ids=["parent", "absolute", "nested-parent"],
)
def test_config_name_cannot_leave_runs(tmp_path, tiny_overrides, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", "base.yaml", *tiny_overrides, f"name={name}"]) == 2
    assert "ttt-titans: error: run name" in capsys.readouterr().err
    assert not (tmp_path.parent / "escaped").exists()
    assert not os.path.exists("/tmp/ttt_titans_escaped")


def test_malicious_checkpoint_does_not_run(tmp_path, tiny_overrides, capsys):
    out, target = tmp_path / "run", tmp_path / "pwned"
    assert _run(out, tiny_overrides) == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["history"]["payload"] = _MakesDir(target)
    torch.save(ck, out / "checkpoint.pt")
    capsys.readouterr()
    assert _run(out, tiny_overrides, "--resume") == 2
    err = capsys.readouterr().err
    assert "checkpoint.pt' holds objects that a safe load refuses" in err and "posix.mkdir" in err
    assert not target.exists()


def test_truncated_checkpoint_names_the_file(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "run"
    assert _run(out, tiny_overrides) == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert _run(out, tiny_overrides, "--resume") == 2
    assert "checkpoint.pt' is truncated or corrupt" in capsys.readouterr().err


def test_kill_during_a_checkpoint_write_then_resume(tmp_path, tiny_overrides):
    """SIGKILL while the second checkpoint is written (temp file complete, not yet renamed):
    --resume sweeps the orphan temp file and finishes exactly as an uninterrupted run.

    The killed run is a subprocess (torch's default device: the CPU); the resume and the reference
    run here, under the tests' default device: a runner builds its model on the CPU and computes
    on ``device`` (cpu), so the numbers match whatever the default device is."""
    out = tmp_path / "run"
    argv = ["run", "--config", "exp_meta_ttt.yaml", "--out", str(out), "--no-progress",
            *tiny_overrides]  # fmt: skip
    script = textwrap.dedent(f"""
        import os, signal
        from ttt_core import runfiles
        from ttt_titans.cli import main
        replace, saves = os.replace, []
        def killing_replace(src, dst):
            if str(dst).endswith("checkpoint.pt"):
                saves.append(dst)
                if len(saves) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)
        runfiles.os.replace = killing_replace
        main({argv!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert len(list(out.glob("*.tmp"))) == 1  # what the kill left
    assert main([*argv, "--resume"]) == 0
    assert list(out.glob("*.tmp")) == []
    ref = tmp_path / "ref"
    assert main([*argv[:4], str(ref), *argv[5:]]) == 0
    assert _metrics(out)["mse"] == _metrics(ref)["mse"]


def test_compare_refuses_a_non_empty_folder(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert main(["compare", "--out", str(out), "--no-progress", *tiny_overrides]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["compare", "--out", str(out), "--overwrite", *tiny_overrides]) == 2
    assert "no .ttt-run marker" in capsys.readouterr().err
    assert (out / "notes.md").read_text() == "mine"
