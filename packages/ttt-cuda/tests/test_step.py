"""The backend's single-token step (``ttt_linear_step`` / ``ttt_mlp_step``, the contract of
ttt-core's step entry) against ttt-core's torch backend run on the same one token from the same
state, token after token, starting inside a mini-batch: outputs and every state tensor."""

from __future__ import annotations

import pytest
import torch
from ttt_cuda_reference import make_inputs, make_mlp_inputs, make_titans

from ttt_core import TTTState, ttt_linear, ttt_mlp
from ttt_core.backends import get_backend

B, H, L, D, b = 2, 3, 13, 12, 4  # 13 tokens: the stream starts at offset 1 after a 5-token prefix
PREFIX = 5
CASES = ["linear", "linear-sum", "titans", "mlp"]


def _inputs(case):
    if case == "mlp":
        return make_mlp_inputs(B, H, L, D, F=2 * D, dtype=torch.float32, seed=21,
                               requires_grad=False)  # fmt: skip
    return make_inputs(B, H, L, D, dtype=torch.float32, seed=22, requires_grad=False)


def _tensors(state: TTTState) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("params", "grad_sum", "momentum", "current"):
        for name, t in (getattr(state, part) or {}).items():
            out[f"{part}.{name}"] = t
    return out


@pytest.mark.parametrize("case", CASES, ids=[f"{c}-B{B}-H{H}-L{L}-D{D}-b{b}" for c in CASES])
def test_step_matches_torch_one_token_call(case):
    x = _inputs(case)
    seq = {n: x[n] for n in ("q", "k", "v", "eta")}
    weights = {n: t for n, t in x.items() if n not in seq}
    kw = dict(mini_batch_size=b, token_scale="sum" if case == "linear-sum" else "mean",
              momentum=None, decay=None, eps=1e-6)  # fmt: skip
    if case == "titans":
        kw["momentum"], kw["decay"] = make_titans(B, H, L, dtype=torch.float32, seed=23,
                                                  requires_grad=False)  # fmt: skip
    core = ttt_mlp if case == "mlp" else ttt_linear
    backend = get_backend("cpp")
    step = backend.ttt_mlp_step if case == "mlp" else backend.ttt_linear_step

    def cut(t, lo, hi):  # tokens [lo, hi) of a [B, H, L(, D)] tensor, None stays None
        return None if t is None else t[:, :, lo:hi]

    def call(lo, hi, state):  # ttt-core's torch backend on tokens [lo, hi)
        return core(*(cut(seq[n], lo, hi) for n in ("q", "k", "v", "eta")), *weights.values(),
                    mini_batch_size=b, token_scale=kw["token_scale"],
                    momentum=cut(kw["momentum"], lo, hi), decay=cut(kw["decay"], lo, hi),
                    initial_state=state, output_final_state=True, backend="torch")  # fmt: skip

    _, state = call(0, PREFIX, None)
    assert state.offset == PREFIX % b
    state_cpp = state
    for t in range(PREFIX, L):
        o_ref, state = call(t, t + 1, state)
        token = [cut(seq[n], t, t + 1) for n in ("q", "k", "v", "eta")]
        step_kw = {**kw, "momentum": cut(kw["momentum"], t, t + 1),
                   "decay": cut(kw["decay"], t, t + 1)}  # fmt: skip
        assert (
            backend.supports(f"{core.__name__}_step", token[0], initial_state=state_cpp, **step_kw)
            is None
        )
        o, state_cpp = step(*token, *weights.values(), state=state_cpp, **step_kw,
                            reconstruction_target="residual", output_residual=True)  # fmt: skip
        assert o.shape == (B, H, 1, D) and state_cpp.offset == state.offset == (t + 1) % b
        torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
        got, want = _tensors(state_cpp), _tensors(state)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, n=name, t=t: f"{n} at token {t}: {m}")  # fmt: skip


def test_public_step_entry_serves_the_layer_stream_through_cpp():
    """ttt-core's public step (``ttt_linear_step``, what ``TTTLayer`` calls per streaming token)
    reaches the cpp backend's step once per token and equals the whole-sequence torch call."""
    from ttt_core import ttt_linear_step

    x = make_inputs(B, H, L, D, dtype=torch.float32, seed=24, requires_grad=False)
    seq = [x[n] for n in ("q", "k", "v", "eta")]
    weights = [x[n] for n in ("W1", "b1", "ln_weight", "ln_bias")]
    backend = get_backend("cpp")
    calls = []
    original = backend.ttt_linear_step

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    backend.ttt_linear_step = counted
    try:
        state, outs = None, []
        for t in range(L):
            o, state = ttt_linear_step(*(s[:, :, t : t + 1] for s in seq), *weights, state=state,
                                       mini_batch_size=b, backend="cpp")  # fmt: skip
            outs.append(o)
    finally:
        del backend.ttt_linear_step
    assert len(calls) == L
    ref, ref_state = ttt_linear(*seq, *weights, mini_batch_size=b, backend="torch",
                                output_final_state=True)  # fmt: skip
    torch.testing.assert_close(torch.cat(outs, dim=2), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.params["W1"], ref_state.params["W1"], rtol=1e-4, atol=1e-4)
