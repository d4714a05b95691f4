"""checkpoint_group_size: groups of mini-batches recomputed in the backward give the same outputs,
final states and every gradient as the run that keeps its intermediates (fp64)."""

from __future__ import annotations

import pytest
import torch
from conftest import call, make_inputs
from torch.utils.checkpoint import checkpoint

from ttt_core import TTTConfig, TTTLayer
from ttt_core.split import group_bounds
from ttt_core.state import TTTState

CASES = [  # id, kind, titans, causal
    ("linear", "linear", False, True),
    ("mlp", "mlp", False, True),
    ("titans-linear", "linear", True, True),
    ("titans-mlp", "mlp", True, True),
    ("noncausal-linear", "linear", False, False),
]


def _run(kind, x, w, ln, extra, cut, **kw):
    """The call from a state cut 2 tokens into a mini-batch (streaming) when ``cut``."""
    state = None
    if cut:
        head = {n: t[:, :, :2] for n, t in x.items()}
        _, state = call(kind, head, w, ln, {n: t[:, :, :2] for n, t in extra.items()},
                        mini_batch_size=3, output_final_state=True)  # fmt: skip
        x = {n: t[:, :, 2:] for n, t in x.items()}
        extra = {n: t[:, :, 2:] for n, t in extra.items()}
    causal = kw.get("causal", True)
    return call(kind, x, w, ln, extra, mini_batch_size=3, initial_state=state,
                output_final_state=causal, **kw)  # fmt: skip


RUNS = [
    (*c, cut) for c in CASES for cut in (False, True) if c[3] or not cut
]  # no state: non-causal


@pytest.mark.parametrize("backend", ["torch", "generic"])
@pytest.mark.parametrize(
    ("name", "kind", "titans", "causal", "cut"), RUNS,
    ids=[f"{r[0]}-{'cut-state' if r[4] else 'fresh'}" for r in RUNS],
)  # fmt: skip
def test_checkpointed_gradients_equal_fp64(backend, name, kind, titans, causal, cut):
    x, w, ln, extra = make_inputs(kind, B=2, H=2, L=17, D=5, titans=titans, requires_grad=True)
    leaves = [*x.values(), *w.values(), *ln.values(), *extra.values()]
    results = []
    for group in (None, 1, 2):
        o, st = _run(kind, x, w, ln, extra, cut, causal=causal, backend=backend,
                     checkpoint_group_size=group)  # fmt: skip
        weight = torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)
        loss = (o * weight).sum() + (0 if st is None else sum(t.sum() for t in st.tensors()))
        results.append((o, st, torch.autograd.grad(loss, leaves)))
    o_ref, st_ref, g_ref = results[0]
    for o, st, g in results[1:]:
        torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
        if st_ref is not None:
            assert st.offset == st_ref.offset
            for a, b in zip(st.tensors(), st_ref.tensors()):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_group_bounds_finish_the_cut_mini_batch_first():
    state = TTTState(params={}, offset=2, mini_batch_size=4)
    assert group_bounds(17, state, 2) == [(0, 6), (6, 14), (14, 17)]
    assert group_bounds(5, TTTState(params={}, mini_batch_size=None), 3) == [(0, 5)]


def test_layer_option_composes_with_torch_checkpoint_around_the_layer():
    """A layer with checkpoint_group_size inside torch.utils.checkpoint (non-reentrant, around the
    whole layer) gives the plain layer's outputs and parameter gradients (fp64)."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=12, num_heads=2, mini_batch_size=4, titans=True)
    plain = TTTLayer(TTTConfig(**cfg)).double()
    grouped = TTTLayer(TTTConfig(**cfg, checkpoint_group_size=2)).double()
    grouped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 19, 12, dtype=torch.float64)
    y, _ = plain(x)
    want = torch.autograd.grad(y.square().sum(), list(plain.parameters()))
    y2 = checkpoint(lambda t: grouped(t)[0], x, use_reentrant=False)
    got = torch.autograd.grad(y2.square().sum(), list(grouped.parameters()))
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_bad_checkpoint_group_size():
    x, w, ln, _ = make_inputs("linear", L=5)
    with pytest.raises(ValueError, match="checkpoint_group_size must be >= 1"):
        call("linear", x, w, ln, checkpoint_group_size=0)
    with pytest.raises(
        ValueError, match=r"TTTConfig\.checkpoint_group_size must be a positive int"
    ):
        TTTConfig(hidden_size=8, num_heads=2, checkpoint_group_size=1.5)
