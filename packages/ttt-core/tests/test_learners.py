"""InnerLearner: a new fast model by subclassing gets the generic path; built-ins route correctly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_inputs
from naive import naive_ttt
from torch import nn

from ttt_core import InnerLearner, LinearLearner, MLPLearner


class SwiGLULearner(InnerLearner):
    """f_W(x) = (silu(x Wg) * (x Wu)) Wd -- nothing else defined."""

    def __init__(self, num_heads, head_dim, hidden):
        super().__init__(num_heads, head_dim)
        self.Wg = nn.Parameter(torch.randn(num_heads, head_dim, hidden) * 0.3)
        self.Wu = nn.Parameter(torch.randn(num_heads, head_dim, hidden) * 0.3)
        self.Wd = nn.Parameter(torch.randn(num_heads, hidden, head_dim) * 0.3)

    def fast_model(self, p, x):
        return (F.silu(x @ p["Wg"]) * (x @ p["Wu"])) @ p["Wd"]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_swiglu_subclass_matches_naive_loop(causal):
    learner = SwiGLULearner(2, 6, 10).double()
    x, *_ = make_inputs("linear", B=2, H=2, L=11, D=6)
    o, _ = learner(x["q"], x["k"], x["v"], x["eta"], mini_batch_size=4, causal=causal)
    ref = naive_ttt(learner.fast_model, learner.fast_params(), x["q"], x["k"], x["v"], x["eta"],
                    learner.ln_weight, learner.ln_bias, b=4, causal=causal)  # fmt: skip
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)


def test_swiglu_subclass_trains_and_streams():
    learner = SwiGLULearner(2, 6, 10).double()
    x, *_ = make_inputs("linear", B=1, H=2, L=11, D=6)
    o, st = learner(x["q"], x["k"], x["v"], x["eta"], mini_batch_size=4, output_final_state=True)
    o.square().sum().backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    o1, s1 = learner(*(t[:, :, :6] for t in x.values()), mini_batch_size=4, output_final_state=True)
    o2, _ = learner(*(t[:, :, 6:] for t in x.values()), mini_batch_size=4, state=s1)
    torch.testing.assert_close(torch.cat([o1, o2], 2), o.detach())
    assert set(st.params) == {"Wg", "Wu", "Wd"}
    with pytest.raises(ValueError, match="only backend 'generic'"):
        learner(*x.values(), backend="torch")


@pytest.mark.parametrize("cls", [LinearLearner, MLPLearner])
def test_builtin_learner_generic_equals_closed_form(cls):
    learner = cls(3, 8).double()
    x, *_ = make_inputs("linear", B=2, H=3, L=13, D=8)
    o_torch, _ = learner(*x.values(), mini_batch_size=4, backend="torch")
    o_gen, _ = learner(*x.values(), mini_batch_size=4, backend="generic")
    o_base, _ = InnerLearner.forward(learner, *x.values(), mini_batch_size=4)  # the generic default
    torch.testing.assert_close(o_torch, o_gen)
    torch.testing.assert_close(o_torch, o_base)


def test_init_state_is_the_start_weights():
    learner = MLPLearner(2, 4)
    st = learner.init_state(3)
    assert st.params["W1"].shape == (3, 2, 4, 16) and st.offset == 0
    assert torch.equal(st.params["W2"][1], learner.W2.detach())
