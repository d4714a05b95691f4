"""The C++ CPU path spreads the (batch, head) chains over torch's intra-op threads, one thread per
chain: outputs, end states and every gradient are bit-identical for 1, 2 and 3 threads, and on
both instruction-set builds of the chains (portable and AVX2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ttt_cuda_reference import make_inputs, make_mlp_inputs, make_titans

from ttt_core import ttt_linear, ttt_mlp

# B * H = 6 chains, enough work per call for the runner to start threads (> 2 MFLOP each)
B, H, L, D, b = 2, 3, 133, 40, 16


def _linear(x, **kw):
    return ttt_linear(*x.values(), mini_batch_size=b, backend="cpp", output_final_state=True, **kw)


def _mlp(x, **kw):
    return ttt_mlp(*x.values(), mini_batch_size=b, backend="cpp", output_final_state=True, **kw)


def _titans(x):
    mom, dec = make_titans(B, H, L, dtype=torch.float32, seed=5)
    return _linear(x, momentum=mom, decay=dec)


def _titans_mlp(x):
    mom, dec = make_titans(B, H, L, dtype=torch.float32, seed=7)
    return _mlp(x, momentum=mom, decay=dec)


OPS = {
    "linear": (_linear, lambda: make_inputs(B, H, L, D, dtype=torch.float32, seed=3)),
    "mlp": (_mlp, lambda: make_mlp_inputs(B, H, L, D, F=2 * D, dtype=torch.float32, seed=4)),
    "titans": (_titans, lambda: make_inputs(B, H, L, D, dtype=torch.float32, seed=6)),
    "titans_mlp": (
        _titans_mlp,
        lambda: make_mlp_inputs(B, H, L, D, F=2 * D, dtype=torch.float32, seed=8),
    ),
}


def _results(op: str, threads: int = 1) -> tuple[torch.Tensor, ...]:
    """o, the end W1 and every input's gradient of one cpp call of ``op`` on ``threads`` threads."""
    fn, make = OPS[op]
    x = make()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o, st = fn(x)
        loss = o.square().sum() + st.params["W1"].sum()
        if st.grad_sum is not None:  # TTT-Linear / MLP cut inside a mini-batch (L % b != 0)
            loss = loss + st.grad_sum["W1"].square().sum()
        return (o, st.params["W1"], *torch.autograd.grad(loss, list(x.values())))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("op", list(OPS), ids=[f"{o}-B{B}-H{H}-L{L}-D{D}-b{b}" for o in OPS])
def test_results_do_not_depend_on_the_thread_count(op):
    one = _results(op, 1)
    assert one[0].abs().sum() > 0
    for threads in (2, 3):
        for got, want in zip(_results(op, threads), one):
            assert torch.equal(got, want)


def _run_with_isa(isa: str, script: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter (this directory on the path) with TTT_CPU_ISA=isa."""
    env = {**os.environ, "TTT_CPU_ISA": isa}
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n{script}"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_results_do_not_depend_on_the_instruction_set(tmp_path):
    """Every op on the portable build (TTT_CPU_ISA=base caps the build the entry points pick) gives
    the bits of this process's build (AVX2 where the CPU and the build have it)."""
    want = {op: _results(op) for op in OPS}
    for isa in ("base",):
        out = tmp_path / f"{isa}.pt"
        res = _run_with_isa(isa, "import torch, test_cpu_threads as t\n"
                                 f"torch.save({{op: t._results(op) for op in t.OPS}}, {str(out)!r})")  # fmt: skip
        assert res.returncode == 0, res.stderr
        got = torch.load(out, weights_only=True)
        for op in OPS:
            assert len(got[op]) == len(want[op])
            for g, w in zip(got[op], want[op]):
                assert torch.equal(g, w), (isa, op)


def test_unknown_instruction_set_is_refused():
    res = _run_with_isa("sse9", "import test_cpu_threads as t\nt._results('linear')")
    assert res.returncode != 0
    assert "ValueError: TTT_CPU_ISA must be base or avx2" in res.stderr
