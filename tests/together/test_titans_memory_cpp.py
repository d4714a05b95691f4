"""The Titans forecaster's memory on ttt-cuda's fused C++ path (``memory.backend: cpp``) against
ttt-core's torch backend: it needs ttt-titans and ttt-cuda installed together.

The memory calls ttt-core's Titans form with ``reconstruction_target="value"`` and
``output_residual=False``, which the C++ path fuses; the read-out, the committed state and every
outer gradient (projections, LN, out_proj and the meta-learner behind the rates) must agree at
fp32 rounding.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ttt_cuda")  # nox -s tests-together installs it; elsewhere this file skips

from ttt_titans.config import MemoryConfig, MetaConfig
from ttt_titans.memory import NeuralMemory
from ttt_titans.meta import MetaLearner


def _memory(backend: str, seed: int = 0) -> tuple[NeuralMemory, MetaLearner]:
    torch.manual_seed(seed)  # the same parameters and buffers for every backend
    cfg = MemoryConfig(inner="linear", num_heads=2, chunk=5, init_std=0.3, backend=backend)
    meta = MetaLearner(12, 2, MetaConfig(hidden=8, alpha_init=0.05))
    with torch.no_grad():  # theta large enough that the inner updates matter
        meta.net[-1].bias[:2] += 2.0
    return NeuralMemory(12, cfg), meta


@pytest.mark.parametrize("commit", [0, 7], ids=["one-call", "commit-7"])
def test_forecaster_memory_on_cpp_equals_torch(monkeypatch, commit):
    """B = 2, L = 13, C = 12, 2 heads, chunk 5 (a shorter last chunk; commit 7 cuts inside one):
    read-out, committed state and every outer gradient; the cpp backend ran every call."""
    from ttt_core.backends import get_backend

    cpp, calls = get_backend("cpp"), []
    original = cpp.ttt_linear
    monkeypatch.setattr(cpp, "ttt_linear", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x = torch.randn(2, 13, 12, generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("torch", "cpp"):
        mem, meta = _memory(backend)
        rates = meta(x)  # theta, eta, alpha: (B, H, L) each
        out, state = mem(x, *rates, commit=commit)  # (B, L, C)
        loss = out.square().sum() + (sum(t.sum() for t in state.tensors()) if commit else 0)
        params = [*mem.parameters(), *meta.parameters()]
        grads = torch.autograd.grad(loss, params)
        results[backend] = (out, state, grads, [n for n, _ in mem.named_parameters()])
    assert len(calls) == (2 if commit else 1)  # the cpp side's ttt-core calls, none on torch's
    out, state, grads, names = results["cpp"]
    ref, ref_state, ref_grads, _ = results["torch"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if commit:
        assert state.offset == ref_state.offset == 2
        for got, want in zip(state.tensors(), ref_state.tensors(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    names += [f"meta.{n}" for n, _ in _memory("torch")[1].named_parameters()]
    for name, g, w in zip(names, grads, ref_grads, strict=True):
        atol = 1e-4 * max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
