"""Configs: every bad value is rejected with its dotted key; a --config typo never falls back."""

from __future__ import annotations

import pytest

from ttt_core.typed_config import ConfigError
from ttt_titans.cli import main
from ttt_titans.config import load_config, resume_config

# override -> what the message must say the key accepts (the key is the override's left side)
BAD_OVERRIDES = {
    'memory.carry="false"': "true or false without quotes",
    "train.grad_clip=-1": "float > 0",
    "train.batch_size=0": "int >= 1",
    "memory.num_heads=0": "int >= 1",
    "data.lookback=4.5": "whole number",
    "train.lr=-0.1": "float > 0",
    "train.lr=fast": "accepts float",
    "memory.eta=1.5": "<= 1",
    "memory.inner=mlp3": "'linear', 'mlp'",
    "data.split=[0.5,0.2,0.2]": "summing to 1",
    "data.split=[0.5,0.5]": "a list of 3",
    "memory.num_heads=3": "divisible",
    "data.max_rows=0": "int >= 1",
    "memory.backend=gpu": "'auto', 'torch', 'generic', 'cpp', 'cuda'",
}


@pytest.mark.parametrize(("override", "accepted"), BAD_OVERRIDES.items(), ids=BAD_OVERRIDES)
def test_bad_values_are_rejected_with_their_key(override, accepted):
    with pytest.raises(ConfigError) as info:
        load_config("base.yaml", [override])
    assert info.value.key == override.split("=")[0] and accepted in str(info.value)


def test_yaml_file_spellings_are_read_as_their_type(tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string: it is a float lr, not a crash deep inside."""
    (tmp_path / "mine.yaml").write_text("base: base.yaml\ntrain:\n  lr: 1e-3\n  online_lr: 5e-4\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.train.lr == 1e-3 and cfg.train.online_lr == 5e-4
    (tmp_path / "bad.yaml").write_text('base: base.yaml\nmemory:\n  carry: "false"\n')
    with pytest.raises(ConfigError, match=r"'memory\.carry': got 'false'"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    "path", ["configz/exp_meta_ttt.yaml", "/nonexistent/base.yaml", "./exp_meta_tt.yaml"]
)
def test_config_path_typo_is_an_error(path):
    with pytest.raises(ValueError, match=r"does not exist|no packaged config"):
        load_config(path)


def test_config_typo_through_the_cli_prints_one_line(tmp_path, capsys):
    rc = main(
        ["run", "--config", str(tmp_path / "exp_meta_ttt.yaml"), "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("ttt-titans: error: config file") and "does not exist" in err
    assert not (tmp_path / "r").exists()


def test_cli_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        main(["run", "--config", "base.yaml", "--out", str(tmp_path / "r"), "--debug",
              "train.batch_size=0"])  # fmt: skip


def test_invalid_yaml_names_the_file(tmp_path):
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match=r"config '.*broken\.yaml' is not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_resume_config_applies_allowed_changes_and_refuses_others():
    saved = load_config("base.yaml", ["train.epochs=2"]).to_dict()
    cfg, changes = resume_config(saved, {**saved, "threads": 2}, pretraining=False)
    assert cfg.threads == 2 and changes == {"threads": (1, 2)}
    longer = load_config("base.yaml", ["train.epochs=5"]).to_dict()
    cfg, changes = resume_config(saved, longer, pretraining=True)
    assert cfg.train.epochs == 5 and changes == {"train.epochs": (2, 5)}
    with pytest.raises(
        ValueError, match=r"train\.epochs: run has 2, requested 5.*pretraining has ended"
    ):
        resume_config(saved, longer, pretraining=False)
    other = load_config(
        "base.yaml", ["train.epochs=2", "memory.chunk=8", "train.lr=0.01"]
    ).to_dict()
    with pytest.raises(ValueError, match=r"memory\.chunk: run has 16, requested 8; train\.lr"):
        resume_config(saved, other, pretraining=True)
