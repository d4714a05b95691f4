"""The Titans form's autograd Function (hand-written backward, ``ops/titans_scan.py``) against the
autograd path through the primal form: outputs, every gradient (inputs, weights, LN, rates, the
carried state) in fp64, streaming cuts and blocks inside long mini-batches included."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
from conftest import call, make_inputs
from naive import naive_ttt

from ttt_core import TTTState
from ttt_core.fast_models import FAST_MODELS
from ttt_core.ops import titans_scan


def _run(kind, form, b, L, cut=None, rates="both", seed=0, backwards=1):
    """Outputs and the gradients of a random projection of (outputs, final state) w.r.t. every
    leaf, optionally cutting the sequence at ``cut`` and carrying the state; with ``backwards``
    > 1, the gradients of each of that many backward passes through one graph (retain_graph)."""
    x, w, ln, extra = make_inputs(kind, B=2, H=2, L=L, D=5, F=7, titans=True, requires_grad=True,
                                  seed=seed)  # fmt: skip
    if rates != "both":
        extra.pop("decay" if rates == "momentum" else "momentum")
    leaves = {**x, **w, **ln, **extra}
    kw = dict(mini_batch_size=b, form=form, output_final_state=True)
    if cut is None:
        o, st = call(kind, x, w, ln, extra, **kw)
    else:
        head = lambda d: {n: t[:, :, :cut] for n, t in d.items()}
        tail = lambda d: {n: t[:, :, cut:] for n, t in d.items()}
        o1, st = call(kind, head(x), w, ln, head(extra), **kw)
        o2, st = call(kind, tail(x), w, ln, tail(extra), initial_state=st, **kw)
        o = torch.cat([o1, o2], dim=2)
    g = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
    for d in (st.params, st.momentum, st.current or {}):
        for t in d.values():
            loss = loss + (t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum()
    runs = [
        torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, retain_graph=True)
        for _ in range(backwards)
    ]
    grads = [{n: gr for n, gr in zip(leaves, gr_)} for gr_ in runs]
    return o.detach(), grads[0] if backwards == 1 else grads, st


CASES = [  # (id, b, L, cut)
    ("b1-L9", 1, 9, None),
    ("b4-L23", 4, 23, None),
    ("b4-L23-cut6", 4, 23, 6),
    ("b16-L40-cut21", 16, 40, 21),
    ("b40-L70-blocks", 40, 70, None),  # 40 = 32 + 8 queries per mini-batch (BLOCK = 32)
    ("b64-L70-cut37-blocks", 64, 70, 37),
    ("b17-L70-cut50", 17, 70, 50),
    ("b72-L150-cut100-blocks", 72, 150, 100),  # 32 + 32 + 8: three blocks carry per mini-batch
]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("case", "b", "L", "cut"), CASES, ids=[c[0] for c in CASES])
def test_function_matches_autograd_primal_fp64(kind, case, b, L, cut):
    od, gd, sd = _run(kind, "dual", b, L, cut)
    op, gp, sp = _run(kind, "primal", b, L, cut)
    torch.testing.assert_close(od, op, rtol=1e-10, atol=1e-10)
    for name in gp:
        assert gd[name] is not None, name
        torch.testing.assert_close(gd[name], gp[name], rtol=1e-9, atol=1e-10, msg=name)
    assert sd.offset == sp.offset
    for field in ("params", "momentum", "current"):
        a, r = getattr(sd, field), getattr(sp, field)
        assert (a is None) == (r is None), field
        for n in r or {}:
            torch.testing.assert_close(a[n], r[n], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rates", ["momentum", "decay"])
def test_function_with_one_rate_fp64(rates):
    od, gd, _ = _run("mlp", "dual", 6, 20, 9, rates=rates)
    op, gp, _ = _run("mlp", "primal", 6, 20, 9, rates=rates)
    torch.testing.assert_close(od, op, rtol=1e-10, atol=1e-10)
    for name in gp:
        torch.testing.assert_close(gd[name], gp[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_blocks_match_the_naive_loop_fp64(kind, monkeypatch):
    """Blocks of 3 queries inside mini-batches of 7: the same outputs as the per-token loop."""
    monkeypatch.setattr(titans_scan, "BLOCK", 3)
    x, w, ln, extra = make_inputs(kind, B=2, H=2, L=17, D=6, dtype=torch.float64, titans=True)
    ref = naive_ttt(FAST_MODELS[kind], w, x["q"], x["k"], x["v"], x["eta"], ln["ln_weight"],
                    ln["ln_bias"], b=7, **extra)  # fmt: skip
    o, _ = call(kind, x, w, ln, extra, mini_batch_size=7)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck_with_blocks(kind, monkeypatch):
    monkeypatch.setattr(titans_scan, "BLOCK", 2)
    x, w, ln, extra = make_inputs(kind, B=1, H=2, L=7, D=3, F=4, titans=True, requires_grad=True)
    names = [*x, *w, *ln, *extra]

    def f(*tensors):
        a = dict(zip(names, tensors))
        xs = {n: a[n] for n in x}
        o, st = call(kind, xs, {n: a[n] for n in w}, {n: a[n] for n in ln},
                     {n: a[n] for n in extra}, mini_batch_size=5, output_final_state=True)  # fmt: skip
        return o, *st.current.values(), *st.momentum.values()

    assert torch.autograd.gradcheck(
        f, tuple({**x, **w, **ln, **extra}.values()), eps=1e-6, atol=1e-5
    )


def test_no_grad_forward_equals_grad_forward():
    x, w, ln, extra = make_inputs("mlp", B=2, H=2, L=30, D=6, titans=True, dtype=torch.float32)
    q = x["q"].clone().requires_grad_(True)
    o_grad, _ = call("mlp", {**x, "q": q}, w, ln, extra, mini_batch_size=20)
    with torch.no_grad():
        o_plain, _ = call("mlp", x, w, ln, extra, mini_batch_size=20)
    torch.testing.assert_close(o_grad.detach(), o_plain, rtol=0, atol=0)


def test_double_backward_is_refused():
    """The hand-written backward is first order: create_graph=True is an error, not a silently
    incomplete second derivative; the primal form (plain autograd) still gives one."""
    x, w, ln, extra = make_inputs("linear", B=1, H=1, L=6, D=3, titans=True, requires_grad=True)
    o, _ = call("linear", x, w, ln, extra, mini_batch_size=4, backend="torch")
    with pytest.raises(RuntimeError, match="first-order backward only"):
        torch.autograd.grad(o.square().sum(), x["q"], create_graph=True)
    o, _ = call("linear", x, w, ln, extra, mini_batch_size=4, form="primal", backend="torch")
    (gq,) = torch.autograd.grad(o.square().sum(), x["q"], create_graph=True)
    torch.autograd.grad(gq.sum(), x["k"])


@pytest.mark.parametrize(("b", "L"), [(40, 70), (72, 150)], ids=["b40-L70", "b72-L150"])
def test_two_backwards_through_one_graph_fp64(b, L):
    """backward(retain_graph=True) twice gives the same gradients twice: the hand-written
    backward leaves what the forward saved as it was (blocks of 32 queries carry inside the
    mini-batches)."""
    _, (g1, g2), _ = _run("mlp", "dual", b, L, backwards=2)
    _, gp, _ = _run("mlp", "primal", b, L)
    for name in gp:
        torch.testing.assert_close(g2[name], g1[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(g1[name], gp[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_results_do_not_alias_the_scratch_fp64(kind):
    """Outputs, gradients and states of one call stay as they were through the next call of the
    same shapes (nothing a call returns lives in memory that a later call writes): the carried W
    and S enter as leaves of their own, so their gradients are those of the carry itself."""

    def once(seed):
        x, w, ln, extra = make_inputs(kind, B=2, H=2, L=70, D=5, F=7, titans=True, seed=seed)
        head = {n: t[:, :, :21] for n, t in {**x, **extra}.items()}
        _, st = call(kind, {n: head[n] for n in x}, w, ln, {n: head[n] for n in extra},
                     mini_batch_size=40, output_final_state=True)  # fmt: skip
        leaf = lambda d: {n: t.detach().clone().requires_grad_(True) for n, t in d.items()}
        st = TTTState(params=st.params, offset=st.offset, mini_batch_size=40,
                      momentum=leaf(st.momentum), current=leaf(st.current))  # fmt: skip
        tail = {n: t[:, :, 21:].clone().requires_grad_(True) for n, t in {**x, **extra}.items()}
        o, st2 = call(kind, {n: tail[n] for n in x}, w, ln, {n: tail[n] for n in extra},
                      mini_batch_size=40, initial_state=st, output_final_state=True)  # fmt: skip
        leaves = [*st.momentum.values(), *st.current.values(), *tail.values()]
        s_term = sum(t.square().sum() for t in st2.momentum.values())
        loss = (o * torch.randn_like(o)).sum() + s_term
        return [o, *torch.autograd.grad(loss, leaves), *st2.params.values(), *st2.momentum.values()]

    first = once(0)
    kept = [t.detach().clone() for t in first]
    once(1)
    for a, b in zip(kept, first):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)


def _binds_only_constants(body: list[ast.stmt]) -> list[str]:
    """The assignments in ``body`` whose value is not a number or string literal."""
    bad = []
    for node in body:
        value = getattr(node, "value", None)
        assigns = isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and value is not None
        literal = isinstance(value, ast.Constant) and type(value.value) in (int, float, str)
        if assigns and not literal:
            bad.append(ast.unparse(node))
    return bad


def test_module_keeps_no_state_between_calls():
    """The module's top level and class bodies bind only functions, classes, imports and literal
    constants: no cache, scratch pool or thread-local that a call could leave behind."""
    tree = ast.parse(inspect.getsource(titans_scan))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    bad = _binds_only_constants(tree.body) + [
        b for c in classes for b in _binds_only_constants(c.body)
    ]
    assert bad == []
    assert not any(isinstance(n, (ast.Global, ast.Nonlocal)) for n in ast.walk(tree))
    imported = {
        a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not imported & {"threading", "functools", "lru_cache", "cache", "local"}


def test_gelu_derivatives_match_autograd_fp64():
    """The closed-form gelu_tanh' (aten's fused gelu backward, ``common.gelu_tanh_vjp``) and the
    key backward's gelu' and gelu'' from one tanh against autograd through F.gelu, in fp64, over
    the range where the tanh saturates."""
    import torch.nn.functional as F

    from ttt_core.ops.common import gelu_tanh_vjp

    x = torch.linspace(-7.0, 7.0, 1001, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(F.gelu(x, approximate="tanh").sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), x)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    torch.testing.assert_close(gelu_tanh_vjp(dy, x.detach()), dy * first, rtol=1e-12, atol=1e-14)
    got_first, got_second = titans_scan._gelu_tanh_grads(x.detach())
    torch.testing.assert_close(got_first, first, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got_second, second, rtol=1e-12, atol=1e-13)
