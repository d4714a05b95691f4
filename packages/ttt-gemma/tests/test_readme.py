"""The README's examples run as written: every ```python block, and the ```yaml training config."""

import re
from pathlib import Path

import pytest

from ttt_gemma.train_config import config_from_yaml_text

README = Path(__file__).parents[1] / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs(index, capsys):
    code = blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {})
    printed = capsys.readouterr().out
    assert "torch.Size([2, 16, 4])" in printed and "torch.bfloat16" in printed


def test_yaml_example_is_a_valid_training_config():
    text, _ = blocks("yaml")
    cfg = config_from_yaml_text(text, "README.md")
    assert cfg.model.expert.use_ttt and cfg.model.expert.ttt.input == "attn_output"
    assert cfg.train.lr == 2e-3 and cfg.train.trainable == "all"
    assert cfg.model.expert.ttt_layer_config().inner == "linear"


def test_readme_mentions_the_test_extra():
    assert '"./packages/ttt-gemma[test]"' in README.read_text()


def test_camera_config_trains_as_written(tmp_path, monkeypatch):
    """The whole-policy YAML block, unchanged, on the dataset and tokenizer folders it names (made
    here: Reacher-like episodes with a drawn camera); two steps through the CLI."""
    import json

    import numpy as np

    from ttt_gemma.cli import main
    from ttt_gemma.lerobot import write_lerobot
    from ttt_gemma.word_tokenizer import build_word_tokenizer

    _, text = blocks("yaml")
    cfg = config_from_yaml_text(text, "README.md")
    assert cfg.model.vlm is not None and cfg.data.image_keys == {
        "base_0_rgb": "observation.images.top"
    }
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    episodes = [{"observation.state": rng.normal(size=(20, 10)).astype(np.float32),
                 "action": rng.normal(size=(20, 2)).astype(np.float32),
                 "observation.images.top": rng.integers(0, 256, (20, 32, 32, 3), np.uint8)}
                for _ in range(2)]  # fmt: skip
    write_lerobot(cfg.data.root, episodes, fps=50, image_keys=["observation.images.top"],
                  task="reach the target")  # fmt: skip
    build_word_tokenizer(cfg.data.tokenizer, ["reach the target"])
    (tmp_path / "config.yaml").write_text(text)
    assert main(["train", "--config", "config.yaml", "--no-progress", "--stop-at", "2"]) == 0
    run = tmp_path / cfg.run.root / cfg.run.name
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
