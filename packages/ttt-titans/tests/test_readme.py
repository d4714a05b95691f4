"""The READMEs' examples run as written (ttt-titans' python and CLI blocks; the root README's names).

The CLI commands run with a few size overrides appended (fewer rows, two batches per epoch, a
narrower model) so they take seconds; every command of the README's bash blocks either runs here
or is one of the listed kinds that are run elsewhere (installs, nox sessions, benchmarks).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

from ttt_titans.cli import main

PACKAGE = Path(__file__).resolve().parents[1]
ROOT = PACKAGE.parents[1]
SIZE = [
    "data.max_rows=600",
    "train.max_batches_per_epoch=2",
    "model.d_model=8",
    "model.n_heads=2",
    "meta.hidden=8",
]
NOT_RUN_HERE = ("pip ", "nox ", "python benchmarks/")  # installs, CI sessions, benchmarks


def _blocks(readme: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", readme.read_text(encoding="utf-8"), flags=re.S)


def _commands(readme: Path) -> list[str]:
    """The command lines of the bash blocks, comments stripped."""
    lines = [
        line.split("#", 1)[0].strip() for b in _blocks(readme, "bash") for line in b.splitlines()
    ]
    return [line for line in lines if line]


def test_titans_readme_python_example_runs():
    (code,) = _blocks(PACKAGE / "README.md", "python")
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert tuple(ns["y_hat"].shape) == (4, 8, 1) and tuple(ns["y_next"].shape) == (4, 8, 1)
    assert ns["state"] is not None and ns["cfg"].mode == "meta_ttt"


def test_titans_readme_commands_run(tmp_path, monkeypatch, make_csv):
    monkeypatch.chdir(tmp_path)
    make_csv(tmp_path / "ETTh1.csv")  # the "any ETT CSV" example's file, in the ETT format
    ran = []
    for line in _commands(PACKAGE / "README.md"):
        if line.startswith(NOT_RUN_HERE):
            continue
        argv = shlex.split(line)
        assert argv[0] == "ttt-titans", f"README command not covered by this test: {line!r}"
        assert main([*argv[1:], "--no-progress", *SIZE]) == 0, line
        ran.append(argv[1])
    assert ran == ["compare", "run", "run", "run"]
    assert "| meta_ttt |" in (tmp_path / "demo_titans" / "compare.md").read_text()
    meta = json.loads((tmp_path / "runs" / "meta" / "metrics.json").read_text())
    assert meta["mode"] == "meta_ttt" and meta["epochs"] >= 1
    assert json.loads((tmp_path / "runs" / "baseline" / "metrics.json").read_text())["mse"] > 0


def _nox_sessions() -> set[str]:
    """Session names declared in the root noxfile (read, not imported: nox is not a test dep)."""
    names = set()
    for node in ast.parse((ROOT / "noxfile.py").read_text()).body:
        for deco in getattr(node, "decorator_list", []):
            if "session" not in ast.unparse(deco):
                continue
            kw = {k.arg: k.value for k in getattr(deco, "keywords", [])}
            names.add(ast.literal_eval(kw["name"]) if "name" in kw else node.name)
    return names


def test_root_readme_names_real_sessions_and_packages():
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    sessions = _nox_sessions()
    named = set(re.findall(r"nox -s ([\w-]+)", text))
    assert named and named <= sessions, named - sessions
    for link in re.findall(r"\]\((packages/[\w-]+)\)", text):
        assert (ROOT / link / "pyproject.toml").is_file(), link
    assert "DESIGN.md" not in text  # the design lives in ttt-core's README, in the repository
    assert "semantics" in (ROOT / "packages/ttt-core/README.md").read_text().lower()
