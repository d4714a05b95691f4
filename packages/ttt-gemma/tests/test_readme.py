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
    (text,) = blocks("yaml")
    cfg = config_from_yaml_text(text, "README.md")
    assert cfg.model.expert.use_ttt and cfg.model.expert.ttt.input == "attn_output"
    assert cfg.train.lr == 2e-3 and cfg.train.trainable == "all"
    assert cfg.model.expert.ttt_layer_config().inner == "linear"


def test_readme_mentions_the_test_extra():
    assert '"./packages/ttt-gemma[test]"' in README.read_text()
