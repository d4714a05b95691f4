"""torch.autograd.gradcheck in fp64 on small shapes (the torch backend's graph end to end)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

from ttt_core import ttt_linear, ttt_mlp


@pytest.mark.parametrize(
    ("kind", "kw", "titans"),
    [
        ("linear", dict(mini_batch_size=3), False),
        ("linear", dict(mini_batch_size=None, causal=False), False),
        ("linear", dict(mini_batch_size=3), True),
        ("mlp", dict(mini_batch_size=3), False),
        ("mlp", dict(mini_batch_size=2), True),
    ],
    ids=["linear-causal", "linear-noncausal", "linear-titans", "mlp-causal", "mlp-titans"],
)
def test_gradcheck(kind, kw, titans):
    x, w, ln, extra = make_inputs(kind, B=1, H=2, L=5, D=3, F=4, titans=titans, requires_grad=True)
    names = [*x, *w, *ln, *extra]
    fn = ttt_linear if kind == "linear" else ttt_mlp

    def f(*tensors):
        a = dict(zip(names, tensors))
        args = [a["q"], a["k"], a["v"], a["eta"], *(a[n] for n in w), a["ln_weight"], a["ln_bias"]]
        return fn(*args, **{n: a[n] for n in extra}, **kw)[0]

    assert torch.autograd.gradcheck(
        f, tuple({**x, **w, **ln, **extra}.values()), eps=1e-6, atol=1e-5
    )
