"""The chunk-parallel NeuralMemory against a plain token-by-token loop written here.

The loop applies the Titans rule one token at a time, fp64, per sample and head:

    at each chunk start (j % chunk == 0):  M_start = M
    g_j = grad_M 0.5 || LN(M(k_j)) - v_j ||^2   at M_start        (torch.func.grad)
    S   = eta_j S - theta_j g_j
    M   = (1 - alpha_j) M + S
    r_j = LN(M(q_j))

With chunk = 1 this is the exact per-step rule. Outputs and every outer gradient (projections,
LN, out_proj, and the meta-learner that produces theta/eta/alpha) must match.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ttt_titans.config import MemoryConfig, MetaConfig
from ttt_titans.memory import NeuralMemory
from ttt_titans.meta import MetaLearner

EPS = 1e-6


def _ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def _fast(params, x):
    if "W2" in params:
        h = F.gelu(x @ params["W1"] + params["b1"][0], approximate="tanh")
        return h @ params["W2"] + params["b2"][0]
    return x @ params["W1"] + params["b1"][0]


def reference_loop(mem, q, k, v, theta, eta, alpha, chunk):
    """Token-by-token Titans memory: q, k, v (B, H, L, D); rates (B, H, L) -> r (B, H, L, D)."""
    B, H, L, _ = q.shape
    names = ["W1", "b1", "W2", "b2"] if mem.inner == "mlp" else ["W1", "b1"]
    init = dict(zip(names, mem.fast_weights()))

    def loss(params, kj, vj, lw, lb):
        return 0.5 * ((_ln(_fast(params, kj), lw, lb) - vj) ** 2).sum()

    grad = torch.func.grad(loss)
    out = []
    for b in range(B):
        per_head = []
        for h in range(H):
            M = {n: init[n][h] for n in names}
            S = {n: torch.zeros_like(M[n]) for n in names}
            lw, lb = mem.ln_weight[h], mem.ln_bias[h]
            rows = []
            for j in range(L):
                if j % chunk == 0:
                    M_start = dict(M)
                g = grad(M_start, k[b, h, j], v[b, h, j], lw, lb)
                S = {n: eta[b, h, j] * S[n] - theta[b, h, j] * g[n] for n in names}
                M = {n: (1 - alpha[b, h, j]) * M[n] + S[n] for n in names}
                rows.append(_ln(_fast(M, q[b, h, j]), lw, lb))
            per_head.append(torch.stack(rows))
        out.append(torch.stack(per_head))
    return torch.stack(out)  # (B, H, L, D)


def _setup(inner, chunk, seed=0, B=2, L=11, C=8, H=2, backend="auto"):
    torch.manual_seed(seed)
    cfg = MemoryConfig(inner=inner, num_heads=H, chunk=chunk, mlp_ratio=2, init_std=0.3,
                       backend=backend)  # fmt: skip
    mem = NeuralMemory(C, cfg).double()
    meta = MetaLearner(C, H, MetaConfig(hidden=8, alpha_init=0.05)).double()
    with torch.no_grad():  # make the rates vary across tokens, and theta large enough to matter
        meta.net[-1].weight.mul_(10.0)
        meta.net[-1].bias[:H] += 2.0
    x = torch.randn(B, L, C, dtype=torch.float64)
    feats = torch.randn(B, L, C, dtype=torch.float64)
    return mem, meta, x, feats


def _outer(mem, meta):
    return [p for p in list(mem.parameters()) + list(meta.parameters())]


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 8, 11, 16], ids=lambda c: f"chunk{c}")
def test_chunk_parallel_equals_token_loop(inner, chunk):
    _check_against_token_loop(inner, chunk, "auto")


def test_memory_backend_is_the_one_ttt_core_runs(monkeypatch):
    """``memory.backend`` is the backend of every ttt-core call of the memory: with "generic"
    (ttt-core's torch.func path, always installed) it equals the token loop, outputs and outer
    gradients."""
    import ttt_titans.memory as memory

    backends, original = [], memory.ttt_linear

    def spy(*args, **kwargs):
        backends.append(kwargs["backend"])
        return original(*args, **kwargs)

    monkeypatch.setattr(memory, "ttt_linear", spy)
    _check_against_token_loop("linear", 3, "generic")
    assert backends == ["generic"] * 2  # the checked call and the theta = 0 one


def _check_against_token_loop(inner, chunk, backend):
    mem, meta, x, feats = _setup(inner, chunk, backend=backend)
    b, n, _ = x.shape

    theta, eta, alpha = meta(feats)
    out, _ = mem(x, theta, eta, alpha)  # (B, L, C)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    grads = [p.grad.clone() for p in _outer(mem, meta)]
    for p in _outer(mem, meta):
        p.grad = None

    theta, eta, alpha = meta(feats)
    q, k, v = mem.project(x)
    r = reference_loop(mem, q, k, v, theta, eta, alpha, chunk)
    ref = mem.out_proj(r.transpose(1, 2).reshape(b, n, -1))
    (ref * w).sum().backward()
    ref_grads = [p.grad.clone() for p in _outer(mem, meta)]

    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    names = [n for n, _ in mem.named_parameters()] + [
        f"meta.{n}" for n, _ in meta.named_parameters()
    ]
    for name, g, gr in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, gr, rtol=1e-8, atol=1e-10, msg=f"grad of {name}")
    # the memory actually learned something: the read-out differs from a memory with theta = 0
    out0, _ = mem(x, torch.zeros_like(theta), eta, alpha)
    assert (out - out0).abs().max() > 1e-3


@pytest.mark.parametrize("chunk", [1, 4, 8])
def test_gradients_reach_meta_learner_through_inner_updates(chunk):
    mem, meta, x, feats = _setup("linear", chunk)
    theta, eta, alpha = meta(feats)
    out, _ = mem(x, theta, eta, alpha)
    out.pow(2).sum().backward()
    for name, p in meta.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the meta-learner reaches the loss only through theta/eta/alpha, i.e. the inner updates
    assert meta.net[-1].weight.grad.abs().sum() > 0
    assert meta.net[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("commit", [1, 5, 8, 11])
def test_commit_split_equals_one_call_and_state_continues(commit):
    mem, meta, x, feats = _setup("mlp", 4, seed=1)
    theta, eta, alpha = (t.detach() for t in meta(feats))
    full, _ = mem(x, theta, eta, alpha)
    split, st = mem(x, theta, eta, alpha, commit=commit)
    torch.testing.assert_close(split, full, rtol=1e-10, atol=1e-12)
    # continuing from the committed state == running the prefix + the rest in one call
    x2 = torch.randn_like(x)
    cat = torch.cat([x[:, :commit], x2], dim=1)
    th2, et2, al2 = (torch.cat([t[..., :commit], t], dim=-1) for t in (theta, eta, alpha))
    one, _ = mem(cat, th2, et2, al2)
    cont, _ = mem(x2, theta, eta, alpha, state=st)
    torch.testing.assert_close(cont, one[:, commit:], rtol=1e-9, atol=1e-11)


def test_rates_shape_checked():
    mem, _, x, _ = _setup("linear", 2)
    bad = torch.zeros(2, 3, 11, dtype=torch.float64)
    with pytest.raises(ValueError, match="theta"):
        mem(x, bad, bad, bad)
    good = torch.zeros(2, 2, 11, dtype=torch.float64)
    with pytest.raises(ValueError, match="commit"):
        mem(x, good, good, good, commit=12)
