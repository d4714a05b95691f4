"""The C++ CPU path spreads the (batch, head) chains over torch's intra-op threads, one thread per
chain: outputs, end states and every gradient are bit-identical for 1, 2 and 3 threads."""

from __future__ import annotations

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


@pytest.mark.parametrize("op", list(OPS), ids=[f"{o}-B{B}-H{H}-L{L}-D{D}-b{b}" for o in OPS])
def test_results_do_not_depend_on_the_thread_count(op):
    fn, make = OPS[op]
    x = make()

    def run(threads):
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

    one = run(1)
    assert one[0].abs().sum() > 0
    for threads in (2, 3):
        for got, want in zip(run(threads), one):
            assert torch.equal(got, want)
