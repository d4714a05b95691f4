"""Checks the GPU test files of every fused op share: output gradients, bit-equal reruns,
CUDA-graph replay against eager, and a compute-sanitizer memcheck run of a script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest
import torch


def output_grads(o, inputs, go):
    """Gradients of ``sum(o * go)`` with respect to ``inputs`` (a list or a dict's values)."""
    inputs = list(inputs.values()) if isinstance(inputs, dict) else inputs
    return torch.autograd.grad((o.float() * go).sum(), inputs)


def assert_deterministic(run: Callable, inputs: dict) -> None:
    """Two runs of forward + backward of ``run(*inputs)`` (returns (o, state)) are bit-equal."""
    runs = []
    for _ in range(2):
        o, _ = run(*inputs.values())
        runs.append((o, *torch.autograd.grad(o.float().square().sum(), list(inputs.values()))))
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


def assert_memcheck_clean(script: str) -> None:
    """Run ``script`` (Python source that prints OK at the end) under compute-sanitizer memcheck."""
    tool = shutil.which("compute-sanitizer") or (
        "/usr/local/cuda/bin/compute-sanitizer"
        if os.path.exists("/usr/local/cuda/bin/compute-sanitizer")
        else None
    )
    if tool is None:
        pytest.skip("compute-sanitizer is not installed")
    res = subprocess.run(
        [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c",
         textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
