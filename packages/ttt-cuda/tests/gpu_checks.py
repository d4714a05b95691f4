"""Checks the GPU test files of every fused op share: output gradients, bit-equal reruns,
CUDA-graph replay against eager, side stream against default stream, and compute-sanitizer runs
(memcheck; racecheck, synccheck and initcheck for the shared-memory kernels) of a script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from functools import cache

import pytest
import torch


def output_grads(o, inputs, go):
    """Gradients of ``sum(o * go)`` with respect to ``inputs`` (a list or a dict's values)."""
    inputs = list(inputs.values()) if isinstance(inputs, dict) else inputs
    return torch.autograd.grad((o.float() * go).sum(), inputs)


def _fwd_bwd(run: Callable, inputs: dict) -> tuple:
    o, _ = run(*inputs.values())
    return (o, *torch.autograd.grad(o.float().square().sum(), list(inputs.values())))


def assert_deterministic(run: Callable, inputs: dict) -> None:
    """Two runs of forward + backward of ``run(*inputs)`` (returns (o, state)) are bit-equal."""
    runs = [_fwd_bwd(run, inputs) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def assert_graph_replay_matches_eager(run: Callable, first: dict, fresh: dict) -> None:
    """Forward + backward of ``run(*inputs)`` (returns (o, state)) captured in a CUDA graph on
    ``first``, replayed on ``fresh`` copied into the static inputs, equals eager on ``fresh``
    exactly."""
    static = {n: t.clone().requires_grad_() for n, t in first.items()}

    def step():
        o, _ = run(*static.values())
        return (o, *torch.autograd.grad(o.square().sum(), list(static.values())))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    with torch.no_grad():
        for n, t in fresh.items():
            static[n].copy_(t)
    graph.replay()
    eager_in = {n: t.clone().requires_grad_() for n, t in fresh.items()}
    o, _ = run(*eager_in.values())
    want = (o, *torch.autograd.grad(o.square().sum(), list(eager_in.values())))
    for a, b in zip(outs, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def assert_side_stream_matches_default(run: Callable, inputs: dict) -> None:
    """Forward + backward of ``run(*inputs)`` on a side stream equal the default stream's bit for
    bit. The side stream's inputs are written there just after a ~20 ms spin, so a kernel launched
    on any other stream would read them before they exist (and return other numbers)."""
    want = _fwd_bwd(run, inputs)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(40_000_000)  # cycles: ~20 ms at 2 GHz, queued before the copies
        fresh = {n: (t.detach() * 1).requires_grad_(t.requires_grad) for n, t in inputs.items()}
        got = _fwd_bwd(run, fresh)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


SANITIZER_TIMEOUT_S = 150  # per run: well under the 10 minutes one GPU-machine command may take


def _sanitizer() -> str | None:
    """compute-sanitizer's path, or None."""
    for path in (shutil.which("compute-sanitizer"), "/usr/local/cuda/bin/compute-sanitizer"):
        if path and os.path.exists(path):
            return path
    return None


def _sanitizer_env() -> dict[str, str]:
    # torch's caching allocator hides out-of-bounds accesses inside its cached blocks
    return {**os.environ, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}


@cache
def sanitizer_refusal() -> str | None:
    """None when compute-sanitizer runs a CUDA program here, else why not (not installed, or the
    sandbox refuses the device, e.g. "Device not supported" under gVisor)."""
    tool = _sanitizer()
    if tool is None:
        return "compute-sanitizer is not installed"
    probe = (
        "import torch; torch.zeros(1, device='cuda').add_(1); torch.cuda.synchronize(); print('OK')"
    )
    try:
        res = subprocess.run(
            [tool, "--tool", "memcheck", "--report-api-errors", "no", sys.executable, "-c", probe],
            capture_output=True, text=True, timeout=120, env=_sanitizer_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "compute-sanitizer did not finish a one-kernel probe in 120 s"
    if res.returncode != 0 or "OK" not in res.stdout:
        return f"compute-sanitizer refused a one-kernel probe: {(res.stdout + res.stderr)[-400:]}"
    return None


def assert_sanitizer_clean(script: str, tool: str = "memcheck") -> None:
    """Run ``script`` (Python source that prints OK at the end) under ``compute-sanitizer --tool
    tool`` (memcheck, racecheck, synccheck or initcheck) and require no report. CUDA API errors
    are not reported (torch's own start-up makes some); the caching allocator is off. Skips with
    the reason when the sanitizer cannot run here."""
    refusal = sanitizer_refusal()
    if refusal is not None:
        pytest.skip(refusal)
    extra = ["--racecheck-report", "all"] if tool == "racecheck" else []
    cmd = [_sanitizer(), "--tool", tool, "--report-api-errors", "no", "--error-exitcode", "3",
           *extra, sys.executable, "-c", textwrap.dedent(script)]  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=SANITIZER_TIMEOUT_S, env=_sanitizer_env()
    )
    out = res.stdout[-3000:] + res.stderr[-3000:]
    assert res.returncode == 0 and "OK" in res.stdout, f"{tool}: {out}"
