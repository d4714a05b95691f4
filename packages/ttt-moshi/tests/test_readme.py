"""ttt-moshi's README and example config stay true: its Python example runs as written, its
fine-tuning commands run (on a tiny config of the same name), and the shipped YAML loads in the
new and the old spellings."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import torch
import yaml
from conftest import TINY_KWARGS, random_codes

from ttt_moshi import FinetuneConfig, Trainer, save_shard
from ttt_moshi.finetune import main as finetune_main

PACKAGE = Path(__file__).resolve().parents[1]
README = PACKAGE / "README.md"
NOT_RUN_HERE = ("pip ", "nox ", "torchrun ", "python -m pytest")  # installs, CI; test_distributed


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_example_runs():
    (code,) = _blocks("python")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert torch.equal(ns["after"], ns["before"])  # gates closed, same windows: exact
    assert (torch.cat(ns["steps"], 2) - ns["full"]).abs().max() < 1e-4
    assert not torch.equal(ns["full"], ns["before"])  # open gates, narrow windows: changed
    assert not any(".ttt." in k for k in ns["plain"])


def test_readme_finetune_commands_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shard = save_shard(tmp_path / "train.npz", random_codes(4, 45, seed=3))
    cfg = {
        "run_dir": "runs/my-run",
        "data": {"train_data": [str(shard)]},
        "duration_sec": 1.6,
        "batch_size": 2,
        "max_steps": 4,
        "optim": {"pct_start": 0.4},
        "full_finetuning": False,
        "model": {"lm_kwargs": TINY_KWARGS},
        "ttt": {"layers": [1], "config": {"mini_batch_size": 4}},
    }
    (tmp_path / "my_finetune.yaml").write_text(yaml.safe_dump(cfg))
    ran = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith(NOT_RUN_HERE):
                continue
            argv = shlex.split(line)
            assert argv[0] == "ttt-moshi-finetune", f"README command not covered: {line!r}"
            if "--resume" in argv:  # "after a stop": a new run stopped at step 2
                Trainer(FinetuneConfig.from_dict(cfg), progress=False, overwrite=True).fit(2)
            finetune_main([*argv[1:], "--no-progress"])
            out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert out["steps"] == 4
            ran.append(line)
    assert len(ran) == 2 and (tmp_path / "runs/my-run/final.pt").exists()


def test_example_config_loads_in_new_and_old_spelling():
    raw = yaml.safe_load((PACKAGE / "example_finetune.yaml").read_text())
    new = FinetuneConfig.from_dict(raw)
    assert new.seq_len == 2000 and new.ttt.config["gate_init"] == 0.0
    assert new.ttt.ttt_config(4096, 32).num_heads == 8  # 7B: a quarter of the heads, of dim 128
    old = copy.deepcopy(raw)  # ttt-moshi 0.1's spelling of the same config
    old["ttt"] = {"layers": raw["ttt"]["layers"], **raw["ttt"]["config"]}
    old["ttt"]["extra"] = {"token_scale": "mean"}
    old["train_only_ttt"] = not old.pop("full_finetuning")
    assert FinetuneConfig.from_dict(old) == new.replace(
        ttt={
            "layers": raw["ttt"]["layers"],
            "config": {**raw["ttt"]["config"], "token_scale": "mean"},
        }
    )
