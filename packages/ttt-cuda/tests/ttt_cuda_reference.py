"""A plain fp64 reference of DESIGN.md's TTT semantics (TTT-Linear and TTT-MLP), independent of
the fused ops.

Primal form, token by token: every token's gradient comes from ``torch.func.grad`` of the token
loss (no closed form), W_i is materialised, and the output reads f_{W_i}(q_i). It is slow and
obviously right; outer gradients flow through it with ordinary autograd. Both options of the
semantics are written out here: the loss target (``v - k`` or ``v``) and the output (``q + LN`` or
``LN`` alone).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor


def layer_norm(z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return weight * (z - mu) / torch.sqrt(var + eps) + bias


def reference_ttt(
    fast_model,  # f(params: dict, x [D]) -> [D]
    q: Tensor,  # (B, H, L, D)
    k: Tensor,
    v: Tensor,
    eta: Tensor,  # (B, H, L)
    params0: dict[str, Tensor],  # name -> (B, H, ...) start weights per chain
    ln_weight: Tensor,  # (H, D)
    ln_bias: Tensor,
    *,
    mini_batch_size: int,
    causal: bool,
    scale: Tensor,  # (b,) token scale s_i (causal)
    eps: float = 1e-6,
    reconstruction_target: str = "residual",
    output_residual: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Any fast model, primal form: returns (o [B, H, L, D], end weights {name: (B, H, ...)})."""
    B, H, L, D = q.shape
    names = list(params0)

    def token_loss(P, kj, vj, h):
        pred = layer_norm(fast_model(P, kj), ln_weight[h], ln_bias[h], eps)
        target = vj - kj if reconstruction_target == "residual" else vj
        return 0.5 * ((pred - target) ** 2).sum()

    grad = torch.func.grad(token_loss)
    outs, ends = [], {n: [] for n in names}
    for bi in range(B):
        for h in range(H):
            P = {n: params0[n][bi, h] for n in names}
            rows = []
            for t0 in range(0, L, mini_batch_size):
                n_tok = min(mini_batch_size, L - t0)
                gs = [grad(P, k[bi, h, t0 + j], v[bi, h, t0 + j], h) for j in range(n_tok)]
                for i in range(n_tok):
                    seen = range(i + 1) if causal else range(n_tok)
                    s = scale[i] if causal else 1.0
                    Wi = {
                        n: P[n] - s * sum(eta[bi, h, t0 + j] * gs[j][n] for j in seen)
                        for n in names
                    }
                    qi = q[bi, h, t0 + i]
                    y = layer_norm(fast_model(Wi, qi), ln_weight[h], ln_bias[h], eps)
                    rows.append(qi + y if output_residual else y)
                P = Wi  # the last query's weights start the next mini-batch
            outs.append(torch.stack(rows))
            for n in names:
                ends[n].append(P[n])
    o = torch.stack(outs).reshape(B, H, L, D)
    return o, {n: torch.stack(ends[n]).reshape(params0[n].shape) for n in names}


def linear_model(P, x):
    return x @ P["W"] + P["b"]


def mlp_model(P, x):
    """gelu_tanh written out (not F.gelu): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    z = x @ P["W1"] + P["b1"]
    z = 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z**3)))
    return z @ P["W2"] + P["b2"]


def reference_ttt_linear(q, k, v, eta, W0, b0, ln_weight, ln_bias, *, mini_batch_size, causal,
                         scale, eps=1e-6, **options):  # fmt: skip
    """TTT-Linear: W0 (B, H, D, D), b0 (B, H, D); ``options``: reconstruction_target,
    output_residual. Returns (o, W_end, b_end)."""
    o, end = reference_ttt(linear_model, q, k, v, eta, {"W": W0, "b": b0}, ln_weight, ln_bias,
                           mini_batch_size=mini_batch_size, causal=causal, scale=scale, eps=eps,
                           **options)  # fmt: skip
    return o, end["W"], end["b"]


def reference_titans(fast_model, q, k, v, eta, mom, dec, params0, ln_weight, ln_bias, *,
                     mini_batch_size, eps=1e-6, reconstruction_target="residual",
                     output_residual=True):  # fmt: skip
    """Titans form of any fast model, token by token: gradients at the mini-batch's start P,
    S_j = m_j S_{j-1} - eta_j grad_j, W_j = (1 - a_j) W_{j-1} + S_j, o_j from W_j; P <- W at each
    mini-batch end. params0: name -> (B, H, ...) start weights. Returns (o [B, H, L, D], end
    weights {name: (B, H, ...)}, end momentum {name: (B, H, ...)})."""
    B, H, L, D = q.shape

    def token_loss(P, kj, vj, h):
        pred = layer_norm(fast_model(P, kj), ln_weight[h], ln_bias[h], eps)
        target = vj - kj if reconstruction_target == "residual" else vj
        return 0.5 * ((pred - target) ** 2).sum()

    grad = torch.func.grad(token_loss)
    outs, W_ends, S_ends = [], {n: [] for n in params0}, {n: [] for n in params0}
    for bi in range(B):
        for h in range(H):
            P = {n: params0[n][bi, h] for n in params0}
            W, S = dict(P), {n: torch.zeros_like(t) for n, t in P.items()}
            rows = []
            for t0 in range(0, L, mini_batch_size):
                n_tok = min(mini_batch_size, L - t0)
                gs = [grad(P, k[bi, h, t0 + j], v[bi, h, t0 + j], h) for j in range(n_tok)]
                for i in range(n_tok):
                    t = t0 + i
                    S = {n: mom[bi, h, t] * S[n] - eta[bi, h, t] * gs[i][n] for n in S}
                    W = {n: (1 - dec[bi, h, t]) * W[n] + S[n] for n in W}
                    qi = q[bi, h, t]
                    y = layer_norm(fast_model(W, qi), ln_weight[h], ln_bias[h], eps)
                    rows.append(qi + y if output_residual else y)
                P = dict(W)
            outs.append(torch.stack(rows))
            for n in params0:
                W_ends[n].append(W[n])
                S_ends[n].append(S[n])
    o = torch.stack(outs).reshape(B, H, L, D)
    stack = lambda d: {n: torch.stack(d[n]).reshape(params0[n].shape) for n in params0}
    return o, stack(W_ends), stack(S_ends)


def reference_ttt_titans(q, k, v, eta, mom, dec, W0, b0, ln_weight, ln_bias, **kw):
    """Titans-form TTT-Linear (:func:`reference_titans`): W0 (B, H, D, D), b0 (B, H, D).
    Returns (o, W_end, b_end, S_end, sb_end)."""
    o, W, S = reference_titans(linear_model, q, k, v, eta, mom, dec, {"W": W0, "b": b0},
                               ln_weight, ln_bias, **kw)  # fmt: skip
    return o, W["W"], W["b"], S["W"], S["b"]


def make_titans(B, H, L, *, dtype=torch.float64, seed=0, requires_grad=True):
    """Per-token momentum m in [0.5, 0.95] and decay a in [0, 0.3] (Titans' usual ranges)."""
    g = torch.Generator().manual_seed(seed + 2000)
    mom = 0.5 + 0.45 * torch.rand(B, H, L, generator=g, dtype=torch.float64)
    dec = 0.3 * torch.rand(B, H, L, generator=g, dtype=torch.float64)
    return mom.to(dtype).requires_grad_(requires_grad), dec.to(dtype).requires_grad_(requires_grad)


def make_mlp_inputs(B, H, L, D, *, F=None, dtype=torch.float64, device="cpu", seed=0,
                    requires_grad=True):  # fmt: skip
    """TTT-MLP inputs (F = 4D by default): make_inputs' plus W1 [H, D, F], b1, W2 [H, F, D], b2."""
    F = 4 * D if F is None else F
    x = make_inputs(B, H, L, D, dtype=dtype, device=device, seed=seed, requires_grad=requires_grad)
    g = torch.Generator().manual_seed(seed + 1000)

    def rnd(*shape, scale):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
        return t.requires_grad_(requires_grad)

    W1, b1 = rnd(H, D, F, scale=D**-0.5), rnd(H, 1, F, scale=0.1)
    W2, b2 = rnd(H, F, D, scale=F**-0.5), rnd(H, 1, D, scale=0.1)
    return dict(q=x["q"], k=x["k"], v=x["v"], eta=x["eta"], W1=W1, b1=b1, W2=W2, b2=b2,
                ln_weight=x["ln_weight"], ln_bias=x["ln_bias"])  # fmt: skip


def make_inputs(B, H, L, D, *, dtype=torch.float64, device="cpu", seed=0, requires_grad=True):
    """Random TTT-Linear inputs at a scale where the inner updates matter (eta ~ 0.1-0.5)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(
            device, dtype
        )
        return t.requires_grad_(requires_grad)

    q, k, v = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
    eta = (0.1 + 0.4 * torch.rand(B, H, L, generator=g, dtype=torch.float64)).to(device, dtype)
    W1 = rnd(H, D, D, scale=D**-0.5)
    b1 = rnd(H, 1, D, scale=0.1)
    ln_weight, ln_bias = rnd(H, D, scale=0.2, shift=1.0), rnd(H, D, scale=0.1)
    return dict(q=q, k=k, v=v, eta=eta.requires_grad_(requires_grad), W1=W1, b1=b1,
                ln_weight=ln_weight, ln_bias=ln_bias)  # fmt: skip


def scale_vector(token_scale, b: int, dtype=torch.float64) -> Tensor:
    """The s_i vector that a token_scale name stands for (mean: 1/(i+1), sum: 1)."""
    if isinstance(token_scale, Tensor):
        return token_scale
    if token_scale == "mean":
        return 1.0 / torch.arange(1, b + 1, dtype=dtype)
    return torch.ones(b, dtype=dtype)


# Every combination of the two options: (reconstruction_target, output_residual)
OPTIONS = [("residual", True), ("residual", False), ("value", True), ("value", False)]


def options_id(options) -> str:
    target, residual = options
    return f"target-{target}-{'residual' if residual else 'no-residual'}"


def options_kw(options) -> dict:
    return dict(zip(("reconstruction_target", "output_residual"), options))


# Cases of assert_cpp_matches_torch_one_call with the options: every combination in one call
# (b = 8, L = 19: the final state is cut inside a mini-batch), and both options off their defaults
# streamed in chunks cut inside mini-batches. Entries: (options, cuts of the cpp side).
OPTION_CASES = [*((o, [0, 19]) for o in OPTIONS), (("value", False), [0, 5, 13, 19])]


def option_case_id(case) -> str:
    options, cuts = case
    return options_id(options) + ("-one-call" if len(cuts) == 2 else f"-cuts-{len(cuts) - 1}")


def assert_grads_close(got, want, names):
    """fp32 gradients against the torch backend's: rtol 1e-4, atol relative to the scale."""
    for name, g, w in zip(names, got, want):
        atol = 1e-4 * max(1.0, w.abs().max().item())  # sums over L * B terms
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"d{n}: {m}")


def assert_cpp_matches_torch_one_call(op, x, cuts, *, extra=None, **kw):
    """ttt-core's ``op`` (``ttt_linear`` / ``ttt_mlp``) through backend "cpp", in chunks
    [cuts[i], cuts[i + 1]) that carry the state, against one torch-backend call (fp32, rtol
    1e-4): o, the final state (offset and every tensor) and every gradient, of ``x``, the
    ``extra`` per-token tensors (momentum, decay: [B, H, L]) and through the final state."""
    extra = extra or {}
    per_token = ("q", "k", "v", "eta")
    outs, st = [], None
    for t0, t1 in itertools.pairwise(cuts):
        part = {**x, **{n: x[n][:, :, t0:t1] for n in per_token}}
        o, st = op(*part.values(), **{n: t[:, :, t0:t1] for n, t in extra.items()},
                   backend="cpp", initial_state=st, output_final_state=True, **kw)  # fmt: skip
        outs.append(o)
    o = torch.cat(outs, dim=2)
    ref, st_ref = op(*x.values(), **extra, backend="torch", output_final_state=True, **kw)
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-4)
    assert st.offset == st_ref.offset
    for field in ("params", "grad_sum", "momentum", "current"):
        got, want = getattr(st, field), getattr(st_ref, field)
        assert (got is None) == (want is None), field
        for name in want or {}:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, f=field, n=name: f"{f}[{n}]: {m}")  # fmt: skip
    go = torch.randn_like(ref)
    inputs = [*x.values(), *extra.values()]

    def loss(o, st):  # o and every tensor of the final state
        return (o * go).sum() + sum(t.square().sum() for t in st.tensors())

    got = torch.autograd.grad(loss(o, st), inputs)
    want = torch.autograd.grad(loss(ref, st_ref), inputs)
    assert_grads_close(got, want, [*x, *extra])


def assert_outputs_and_grads_close(got, want, inputs, names, tol):
    """fp64: the outputs ``got`` against ``want`` (tuples of tensors) at ``tol``, and the gradients
    of a random weighting of them with respect to ``inputs`` at 10 ``tol``."""
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    weights = [torch.randn_like(t) for t in want]
    g = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), inputs)
    r = torch.autograd.grad(sum((t * w).sum() for t, w in zip(want, weights)), inputs)
    for name, a, b in zip(names, g, r):
        torch.testing.assert_close(a, b, rtol=10 * tol, atol=10 * tol,
                                   msg=lambda m, n=name: f"d{n}: {m}")  # fmt: skip


def assert_block_schedule_equals_serial(monkeypatch, run, threads=16):
    """``run()`` (a tuple of tensors: outputs and gradients) run as a CUDA block runs the chains
    (``threads`` threads per chain + barriers, ``CPU_BLOCK_THREADS``) equals the serial run bit
    for bit."""
    import ttt_cuda.ops.launch as ops

    serial = run()
    monkeypatch.setattr(ops, "CPU_BLOCK_THREADS", threads)
    for got, want in zip(run(), serial, strict=True):
        assert torch.equal(got, want)
