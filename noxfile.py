"""Sessions for the ttt monorepo: one per package, each in its own virtualenv.

Quick start (fresh machine)::

    pip install nox && nox -s demo     # the main job: TTT at work in every integration
    pip install nox && nox -s tests    # every CPU test session

Torch is installed first in every venv with the spec in ``TTT_TORCH_SPEC`` (default
``torch==2.13.0``, which pip takes from a local CPU wheel on our machines). The virtualenv backend is
used on purpose: uv ignores that local wheel and would download a multi-GB CUDA build.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (the packages allow it): nox itself depends on tomli
    import tomli as tomllib

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "virtualenv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent
TORCH_SPEC = os.environ.get("TTT_TORCH_SPEC", "torch==2.13.0")
CORE = "./packages/ttt-core"

# CPU test sessions in the order `nox -s tests` runs them; a package that is not in the tree yet
# is left out, so the list grows as packages land.
CPU_TEST_SESSIONS = {
    "tests-core": "packages/ttt-core",
    "tests-cuda-cpu": "packages/ttt-cuda",
    "tests-gemma": "packages/ttt-gemma",
    "tests-titans": "packages/ttt-titans",
    "tests-moshi": "packages/ttt-moshi",
}


def _install_torch(session: nox.Session) -> None:
    session.install("--upgrade", "pip")
    session.install(TORCH_SPEC)


def _pytest(session: nox.Session, tests_dir: str, *extra: str) -> None:
    """Run pytest on one package's tests with the workspace config (warnings are errors)."""
    session.run(
        "python",
        "-m",
        "pytest",
        "-c",
        str(ROOT / "pyproject.toml"),
        "--rootdir",
        str(ROOT),
        tests_dir,
        *extra,
        *session.posargs,
    )


@nox.session(name="tests-core")
def tests_core(session: nox.Session) -> None:
    """ttt-core alone: references, backends, streaming, layer, compile, DDP."""
    _install_torch(session)
    session.install(f"{CORE}[test]")
    _pytest(session, "packages/ttt-core/tests")


@nox.session(name="tests-gemma")
def tests_gemma(session: nox.Session) -> None:
    """ttt-gemma with only ttt-core and its own dependencies."""
    _install_torch(session)
    session.install(CORE, "./packages/ttt-gemma[test]")
    _pytest(session, "packages/ttt-gemma/tests")


@nox.session(name="tests-titans")
def tests_titans(session: nox.Session) -> None:
    """ttt-titans with only ttt-core and its own dependencies."""
    _install_torch(session)
    session.install(CORE, "./packages/ttt-titans[test]")
    _pytest(session, "packages/ttt-titans/tests")


@nox.session(name="tests-moshi")
def tests_moshi(session: nox.Session) -> None:
    """ttt-moshi with only ttt-core, moshi (installed --no-deps, see its README) and its deps."""
    _install_torch(session)
    session.install(CORE, "./packages/ttt-moshi[test]")  # brings moshi's imported deps
    session.install("--no-deps", "moshi==0.2.13")  # moshi pins torch<2.10: not its deps
    _pytest(session, "packages/ttt-moshi/tests")


@nox.session(name="tests-cuda-cpu")
def tests_cuda_cpu(session: nox.Session) -> None:
    """ttt-cuda built without nvcc (C++ CPU path): build, binding, validation, registration; then
    ttt-core's own tests again with it installed, where ``auto`` sends every CPU call the C++ path
    supports to it (so ttt-core's references, streaming, layer and compile tests check it too)."""
    _install_torch(session)
    session.install(f"{CORE}[test]")
    session.install("./packages/ttt-cuda[test]", env={"TTT_ENABLE_CUDA": "OFF"})
    _pytest(session, "packages/ttt-cuda/tests")
    _pytest(session, "packages/ttt-core/tests")


@nox.session(name="tests-cuda")
def tests_cuda(session: nox.Session) -> None:
    """ttt-cuda compiled with nvcc; device tests run where a GPU exists (TTT_REQUIRE_GPU=1 forces)."""
    if session.venv_backend != "none":
        _install_torch(session)
        session.install(CORE)
        session.install("./packages/ttt-cuda[test]", env={"TTT_ENABLE_CUDA": "ON"})
    else:  # GPU machines: system interpreter, no network
        session.run("pip", "install", "--no-deps", "--no-build-isolation", CORE, external=True)
        session.run(
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "./packages/ttt-cuda",
            env={"TTT_ENABLE_CUDA": "ON"},
            external=True,
        )
    _pytest(session, "packages/ttt-cuda/tests")


@nox.session(name="tests-together")
def tests_together(session: nox.Session) -> None:
    """All five packages in one venv (ttt-cuda built without nvcc): they install side by side
    (no downgrade breaks transformers) and each imports and computes; a short smoke run."""
    _install_torch(session)
    session.install("scikit-build-core", "pybind11", "cmake", "ninja", "pytest")
    session.install(CORE, "./packages/ttt-gemma", "./packages/ttt-titans", "./packages/ttt-moshi")
    session.install("--no-deps", "moshi==0.2.13")  # moshi pins torch<2.10: not its deps
    session.install("--no-build-isolation", "./packages/ttt-cuda", env={"TTT_ENABLE_CUDA": "OFF"})
    _pytest(session, "tests/together")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Every CPU test session, one venv each, then all packages in one venv (the CI command)."""
    for name, path in CPU_TEST_SESSIONS.items():
        if (ROOT / path / "pyproject.toml").exists():
            session.notify(name, posargs=session.posargs)
    if all((ROOT / p / "pyproject.toml").exists() for p in CPU_TEST_SESSIONS.values()):
        session.notify("tests-together")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check + ruff format --check over the whole tree."""
    session.install("ruff==0.17.6")  # the version the tree is formatted with
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


DEMOS = {
    # package dir -> command line run in the demo venv (output folder appended)
    "packages/ttt-core": ["ttt-core-demo", "--out"],
    "packages/ttt-gemma": ["ttt-gemma-demo", "--overwrite", "--out"],  # reruns replace it
    "packages/ttt-titans": ["ttt-titans", "compare", "--overwrite", "--out"],  # reruns replace it
    "packages/ttt-moshi": ["ttt-moshi-demo", "--out"],
}


def _has_demo_extra(package: str) -> bool:
    """Whether the package declares a ``demo`` extra (its demo-only dependencies)."""
    with open(ROOT / package / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f)["project"].get("optional-dependencies", {})
    return "demo" in extras


def _install_present_packages(session: nox.Session) -> list[str]:
    """torch, then every package of the tree with a demo, with its ``demo`` extra where it has one
    (one venv); returns their dirs."""
    _install_torch(session)
    present = [p for p in DEMOS if (ROOT / p / "pyproject.toml").exists()]
    session.install(*[f"./{p}[demo]" if _has_demo_extra(p) else f"./{p}" for p in present])
    if "packages/ttt-moshi" in present:
        session.install("--no-deps", "moshi==0.2.13")  # moshi pins torch<2.10: not its deps
    return present


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: TTT at work in each integration; plots + JSON under demo_outputs/."""
    present = _install_present_packages(session)
    out = ROOT / "demo_outputs"
    for p in present:
        name = Path(p).name
        session.run(*DEMOS[p], str(out / name), *session.posargs)
    session.log(f"demo outputs written under {out}")


@nox.session
def bench(session: nox.Session) -> None:
    """Side-by-side CPU benchmarks; JSON figures land in benchmarks/results/ (over the recorded
    ones). ``nox -s bench -- moshi --threads 1``: one script with its own flags."""
    present = _install_present_packages(session)
    if "packages/ttt-titans" in present:
        session.install(
            "./packages/ttt-titans[bench]"
        )  # titans-pytorch, the peer it is timed against
    if (
        ROOT / "packages/ttt-cuda/pyproject.toml"
    ).exists():  # the C++ CPU backend, timed beside torch
        session.install("scikit-build-core", "pybind11", "cmake", "ninja")
        session.install(
            "--no-build-isolation", "./packages/ttt-cuda", env={"TTT_ENABLE_CUDA": "OFF"}
        )
        present.append("packages/ttt-cuda")
    scripts = {
        "packages/ttt-cuda": "benchmarks/cpu_backend.py",
        "packages/ttt-core": "benchmarks/core_cpu.py",
        "packages/ttt-gemma": "benchmarks/gemma.py",
        "packages/ttt-titans": "benchmarks/titans.py",
        "packages/ttt-moshi": "benchmarks/moshi.py",
    }
    runnable = [scripts[p] for p in present if (ROOT / scripts[p]).exists()]
    if not session.posargs:  # every script with its own defaults
        for script in runnable:
            session.run("python", script)
        return
    # `nox -s bench -- NAME [ARGS...]`: benchmarks/NAME.py alone with ARGS (the scripts' flags
    # differ: one set of flags cannot go to all of them)
    name, *args = session.posargs
    script = f"benchmarks/{name.removesuffix('.py')}.py"
    if script not in runnable:
        session.error(f"nox -s bench -- NAME [ARGS...]: NAME is one of "
                      f"{[Path(s).stem for s in runnable]}, got {name!r}")  # fmt: skip
    session.run("python", script, *args)
