"""The console scripts end to end on tiny settings: finetune from YAML, and the demo."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_KWARGS, random_codes

from ttt_moshi import cli, load_checkpoint, save_shard, ttt_layer_indices
from ttt_moshi.demo import corpus_bytes
from ttt_moshi.demo import main as demo_main
from ttt_moshi.finetune import main as finetune_main


def test_finetune_cli(tmp_path, capsys):
    shard = save_shard(tmp_path / "train.safetensors", random_codes(3, 40, seed=4))
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"train_data": [str(shard)], "eval_data": [str(shard)]},
        "duration_sec": 1.6, "batch_size": 2, "max_steps": 6, "log_freq": 3,
        "optim": {"lr": 1e-3, "pct_start": 0.34},
        "model": {"lm_kwargs": TINY_KWARGS},
        "ttt": {"layers": [1], "config": {"mini_batch_size": 4, "inner": "mlp"}},
    }  # fmt: skip
    (tmp_path / "ft.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    finetune_main(["--config", str(tmp_path / "ft.yaml"), "--no-progress"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 6 and np.isfinite(out["eval_loss"])
    lm, payload = load_checkpoint(tmp_path / "run" / "final.pt")
    assert ttt_layer_indices(lm) == [1] and payload["step"] == 6
    assert payload["patch"]["ttt"]["inner"] == "mlp"
    # a second start on the same run dir: one line naming the fix, exit status 1
    with pytest.raises(SystemExit) as exit_info:
        finetune_main(["--config", str(tmp_path / "ft.yaml"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1
    assert err[0].startswith("ttt-moshi-finetune: error: run dir") and "--resume" in err[0]
    with pytest.raises(ValueError, match="finished"):  # --debug: the exception itself
        finetune_main(["--config", str(tmp_path / "ft.yaml"), "--resume", "--debug"])


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("optim: {lr: -1}", "config key 'optim.lr': got -1.0; accepts a float > 0"),
        ("full_finetuning: 'false'", "config key 'full_finetuning': got 'false'"),
        ("ckpt_freq: -1", "config key 'ckpt_freq': got -1; accepts an int >= 0"),
        ("batch_size: 0", "config key 'batch_size': got 0"),
        ("ttt: {config: {mini_batch_size: 4.5}}", "ttt.config.mini_batch_size"),
        ("max_norm: -1", "config key 'max_norm'"),
        ("optim: {lr_max: 1}", "'optim.lr_max': unknown key"),
        ("a: [", "is not valid YAML"),
        ("ttt: {layers: [7]}", "config key 'ttt.layers': holds 7; the model has 3 layers"),
    ],
    ids=["lr-negative", "bool-string", "ckpt-negative", "batch-zero", "mini-batch-float",
         "clip-negative", "unknown-key", "bad-yaml", "ttt-layer-out-of-range"],
)  # fmt: skip
def test_cli_bad_config_is_one_line(tmp_path, capsys, text, match):
    base = f"model: {{lm_kwargs: {json.dumps(TINY_KWARGS)}}}\nttt: {{layers: [1]}}\n"
    if text.startswith("ttt:"):
        base = base.replace("ttt: {layers: [1]}", text.replace("{config", "{layers: [1], config"))
    else:
        base += text + "\n"
    (tmp_path / "ft.yaml").write_text(base)
    with pytest.raises(SystemExit):
        finetune_main(["--config", str(tmp_path / "ft.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    with pytest.raises(SystemExit):  # a --config path with a typo
        finetune_main(["--config", str(tmp_path / "ft.yml")])
    assert "ft.yml' does not exist" in capsys.readouterr().err


def test_demo_runs_and_writes_summary(tmp_path):
    tokens = corpus_bytes()
    assert len(tokens) > 100_000 and tokens.min() >= 0 and tokens.max() < 256
    demo_main([
        "--out", str(tmp_path), "--steps", "12", "--eval-windows", "4", "--seq-len", "48",
        "--window", "8", "--dim", "32", "--layers", "2", "--batch-size", "2",
        "--long-factor", "4", "--long-sequences", "2",
    ])  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    base, ttt = summary["variants"].values()
    base_name = next(iter(summary["variants"]))
    assert base["ttt_layers"] == [] and ttt["ttt_layers"] == [1]
    assert base["attention_context"] == ttt["attention_context"] == [8, 4]
    assert ttt["parameters"] > base["parameters"]
    assert ttt["streaming_max_abs_diff"] < 1e-4
    assert (tmp_path / "loss_per_position.png").stat().st_size > 0
    assert (tmp_path / "train_loss.png").stat().st_size > 0
    assert (tmp_path / "loss_difference.png").stat().st_size > 0
    assert (tmp_path / "long_context_loss.png").stat().st_size > 0
    assert (tmp_path / "memory_analysis.png").stat().st_size > 0
    memory = summary["memory"]
    assert list(memory["gates"]) == list(memory["inner_loss_by_mini_batch"]) == ["layer1"]
    counts = {k: v["tokens"] for k, v in memory["loss_by_name_category"][base_name].items()}
    assert counts["all tokens"] == 4 * 48 and counts["first occurrence"] > 0
    assert memory["inner_loss_by_mini_batch"]["layer1"]["start"] == [0, 16, 32]
    long = ttt["long_context"]
    assert long["length"] == 4 * 48 and long["sequences"] == 2
    assert list(long["loss_by_context"]) == ["0-48", "48-96", "96-192"]
    assert sorted(map(int, long["resident_mb_at_step"])) == [48, 96, 192]  # JSON keys
    assert np.isfinite(long["slope_per_doubling_beyond_training_length"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heads", "3"], "argument --heads: must divide --dim 64 into heads of an even size"),
        (["--dim", "32", "--heads", "32"], "argument --heads: must divide --dim 32"),
        (["--layers", "1", "--quick"], "argument --layers: must be >= 2, got 1"),
        (["--long-factor", "0"], "argument --long-factor: must be >= 2, got 0"),
        (["--seq-len", "1"], "argument --seq-len: must be >= 46 (the attention reach of 4 layers"),
        (["--steps", "10"], "argument --steps: must be >= 11"),
        (["--eval-windows", "1"], "argument --eval-windows: must be 0 (all) or >= 2"),
        (["--lr", "0"], "argument --lr: must be > 0"),
        (["--seq-len", "30000"], "argument --long-factor: --long-factor x --seq-len = 240000"),
    ],
    ids=["heads-not-dividing", "odd-head-dim", "one-layer", "long-factor-zero", "seq-len-short",
         "steps-few", "one-eval-window", "lr-zero", "long-past-held-out"],
)  # fmt: skip
def test_demo_bad_arguments_exit_2_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        demo_main(["--out", str(tmp_path / "demo"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ttt-moshi-demo: error: ") and message in err[-1], err
    assert not (tmp_path / "demo").exists()


def test_demo_runs_at_the_smallest_accepted_sizes(tmp_path):
    # 2 layers, --window 8: contexts 8 and 4, reach 7 + 3 = 10 steps, so --seq-len 12 is the minimum
    demo_main([
        "--out", str(tmp_path), "--steps", "11", "--seq-len", "12", "--window", "8", "--dim", "32",
        "--layers", "2", "--batch-size", "2", "--eval-windows", "2", "--long-factor", "2",
        "--long-sequences", "1", "--probe-windows", "2",
    ])  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    ttt = summary["variants"]["moshi + TTT-Linear"]
    assert ttt["attention_receptive_field"] == 10 and ttt["long_context"]["length"] == 24
    assert np.isfinite(ttt["slope_per_doubling_beyond_receptive_field"])
    assert (tmp_path / "long_context_loss.png").stat().st_size > 0  # smoothing wider than 24


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_top_level_help_exits_0_and_unknown_command_2(flag, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([flag])
    assert (
        done.value.code == 0
        and "usage: ttt-moshi {encode,finetune,demo}" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit) as done:
        cli.main(["nonsense"])
    assert done.value.code == 2 and "usage: ttt-moshi" in capsys.readouterr().err
