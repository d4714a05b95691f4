"""The fused C++ CPU step (``csrc/ttt_step_cpu.cpp``) through ttt-core's public step entry
(``ttt_linear_step`` / ``ttt_mlp_step`` with ``backend="cpp"``), token by token, against two
independent references: ttt-core's torch step (the recurrent form) on the same token from the same
state, and the generic torch.func path over the whole sequence in fp64. The stream starts from a
state cut inside a mini-batch and crosses mini-batch ends; odd sizes throughout."""

from __future__ import annotations

import pytest
import torch
from ttt_cuda_reference import make_inputs, make_mlp_inputs, make_titans

from ttt_core import TTTConfig, TTTLayer, ttt_linear, ttt_linear_step, ttt_mlp, ttt_mlp_step
from ttt_core.backends import get_backend

B, H, L, D, F, b = 2, 3, 11, 9, 21, 4
PREFIX = 3  # the stream starts at offset 3 and crosses the mini-batch ends at tokens 4 and 8
SCALE = torch.tensor([1.0, 0.7, 0.45, 0.3], dtype=torch.float64)  # a per-position token_scale
CASES = [("linear", "mean"), ("linear", "sum"), ("linear", "vector"), ("linear", "titans"),
         ("linear", "value-target"), ("mlp", "mean"), ("mlp", "titans"), ("mlp", "no-residual")]  # fmt: skip
# fp64: the same math in another order (1e-10); fp32: float rounding against the fp32 torch step
# and the fp32 error of the same math against the fp64 reference
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
TOL_REF = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}


def _case(kind: str, variant: str, dtype: torch.dtype):
    """(per-token inputs, weights, option keywords) of one case, requires_grad off."""
    if kind == "mlp":
        x = make_mlp_inputs(B, H, L, D, F=F, dtype=dtype, seed=31, requires_grad=False)
    else:
        x = make_inputs(B, H, L, D, dtype=dtype, seed=32, requires_grad=False)
    seq = {n: x.pop(n) for n in ("q", "k", "v", "eta")}
    opts = dict(mini_batch_size=b, token_scale="mean")
    if variant == "sum":
        opts["token_scale"] = "sum"
    if variant == "vector":
        opts["token_scale"] = SCALE.to(dtype)
    if variant == "titans":
        seq["momentum"], seq["decay"] = make_titans(B, H, L, dtype=dtype, seed=33,
                                                    requires_grad=False)  # fmt: skip
    if variant == "value-target":
        opts["reconstruction_target"] = "value"
    if variant == "no-residual":
        opts["output_residual"] = False
    return seq, x, opts


def _tokens(seq: dict, lo: int, hi: int) -> dict:
    return {n: t[:, :, lo:hi] for n, t in seq.items()}


def _state_tensors(state) -> dict[str, torch.Tensor]:
    return {f"{part}.{n}": t for part in ("params", "grad_sum", "momentum", "current")
            for n, t in (getattr(state, part) or {}).items()}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    ("kind", "variant"), CASES, ids=[f"{k}-{v}-B{B}-H{H}-L{L}-D{D}-b{b}" for k, v in CASES]
)
def test_cpp_step_matches_torch_step_and_fp64_reference(kind, variant, dtype):
    seq, weights, opts = _case(kind, variant, dtype)
    op, step = (ttt_mlp, ttt_mlp_step) if kind == "mlp" else (ttt_linear, ttt_linear_step)
    ln = (weights.pop("ln_weight"), weights.pop("ln_bias"))
    w = list(weights.values())

    def token_call(t, state, backend):
        x = _tokens(seq, t, t + 1)
        return step(x.pop("q"), x.pop("k"), x.pop("v"), x.pop("eta"), *w, *ln, state=state,
                    backend=backend, **x, **opts)  # fmt: skip

    # the reference: the generic torch.func path over the whole sequence, in fp64
    f64 = {n: t.double() for n, t in seq.items()}
    ref_opts = {**opts, "token_scale": SCALE} if variant == "vector" else opts
    o_ref, _ = op(f64.pop("q"), f64.pop("k"), f64.pop("v"), f64.pop("eta"),
                  *(t.double() for t in w), *(t.double() for t in ln), **f64, **ref_opts,
                  backend="generic")  # fmt: skip

    prefix = _tokens(seq, 0, PREFIX)
    _, state = op(prefix.pop("q"), prefix.pop("k"), prefix.pop("v"), prefix.pop("eta"), *w, *ln,
                  **prefix, **opts, initial_state=None, output_final_state=True,
                  backend="torch")  # fmt: skip
    assert state.offset == PREFIX
    state_cpp = state
    with torch.no_grad():
        for t in range(PREFIX, L):
            o_torch, state = token_call(t, state, "torch")
            o, state_cpp = token_call(t, state_cpp, "cpp")
            assert o.dtype == dtype and o.shape == (B, H, 1, D)
            assert state_cpp.offset == state.offset == (t + 1) % b
            torch.testing.assert_close(o, o_torch, **TOL[dtype])
            torch.testing.assert_close(o.double(), o_ref[:, :, t : t + 1], **TOL_REF[dtype])
            got, want = _state_tensors(state_cpp), _state_tensors(state)
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], **TOL[dtype],
                                           msg=lambda m, n=name, t=t: f"{n} at token {t}: {m}")  # fmt: skip


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_layer_stream_through_cpp_equals_whole_sequence(inner):
    """TTTLayer with backend "cpp", one token per call, equals the layer's whole-sequence forward
    (torch backend); the cpp backend receives every token's step. Grad mode stays on with frozen
    parameters: the step (nothing requires grad) is fused, the whole-layer step (inference under
    no_grad only, test_layer_step.py) is not."""
    torch.manual_seed(0)
    cfg = TTTConfig(hidden_size=30, num_heads=2, head_dim=15, inner=inner, mini_batch_size=5,
                    backend="cpp")  # fmt: skip
    layer = TTTLayer(cfg).eval().requires_grad_(False)
    whole = TTTLayer(TTTConfig(**{**cfg.__dict__, "backend": "torch"})).eval()
    whole.load_state_dict(layer.state_dict())
    x = torch.randn(2, 13, 30)
    backend = get_backend("cpp")
    op = f"ttt_{inner}_step"
    calls = []
    original = getattr(backend, op)
    setattr(backend, op, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    try:
        with torch.no_grad():
            y_ref, _ = whole(x)
        state, ys = None, []
        for t in range(x.shape[1]):
            y, state = layer(x[:, t : t + 1], state)
            ys.append(y)
    finally:
        delattr(backend, op)
    assert len(calls) == x.shape[1]
    torch.testing.assert_close(torch.cat(ys, dim=1), y_ref, rtol=1e-5, atol=1e-5)


def _third_token(kind: str, B: int, H: int, D: int, seed: int):
    """(the op's step, the third token's q, k, v, eta [B, H, 1, .], the fast weights and LN params,
    the torch backend's state after the first two tokens) for TTT-Linear or TTT-MLP, fp32."""
    if kind == "mlp":
        x = make_mlp_inputs(B, H, 3, D, dtype=torch.float32, seed=seed, requires_grad=False)
    else:
        x = make_inputs(B, H, 3, D, dtype=torch.float32, seed=seed, requires_grad=False)
    op, step = (ttt_mlp, ttt_mlp_step) if kind == "mlp" else (ttt_linear, ttt_linear_step)
    seq = [x.pop(n) for n in ("q", "k", "v", "eta")]
    w = list(x.values())
    _, state = op(*(t[:, :, :2] for t in seq), *w, mini_batch_size=4, output_final_state=True,
                  backend="torch")  # fmt: skip
    return step, [t[:, :, 2:3] for t in seq], w, state


@pytest.mark.parametrize(
    ("kind", "Bt", "Ht", "Dt"),
    [("linear", 11, 15, 64), ("mlp", 9, 8, 32)],
    ids=["linear-B11-H15-D64", "mlp-B9-H8-D32-F128"],
)
def test_cpp_step_bit_identical_for_1_and_2_threads(kind, Bt, Ht, Dt):
    """Shapes with enough work per call that the step runs its chains on two threads (the runner
    keeps calls under ~2 MFLOP per thread on the calling thread)."""
    step, token, w, state = _third_token(kind, Bt, Ht, Dt, seed=34 if kind == "mlp" else 35)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(step(*token, *w, state=state, mini_batch_size=4, backend="cpp"))
    finally:
        torch.set_num_threads(before)
    (o1, s1), (o2, s2) = results
    assert torch.equal(o1, o2)
    for name, t in _state_tensors(s1).items():
        assert torch.equal(t, _state_tensors(s2)[name]), name


def _one_token(requires_grad=False, dtype=torch.float32):
    x = make_inputs(1, 2, 1, 7, dtype=dtype, seed=36, requires_grad=requires_grad)
    return [x[n] for n in ("q", "k", "v", "eta")], [x[n] for n in ("W1", "b1")], x


def test_cpp_step_refuses_grad_with_the_reason():
    seq, w, x = _one_token(requires_grad=True)
    ln = (x["ln_weight"], x["ln_bias"])
    with pytest.raises(ValueError, match=r"no autograd.*torch.no_grad"):
        ttt_linear_step(*seq, *w, *ln, backend="cpp")
    with torch.no_grad():  # the same call for inference runs
        o, _ = ttt_linear_step(*seq, *w, *ln, backend="cpp")
    o_ref, _ = ttt_linear_step(*(t.detach() for t in seq), *(t.detach() for t in w),
                               *(t.detach() for t in ln), backend="torch")  # fmt: skip
    torch.testing.assert_close(o, o_ref, rtol=1e-6, atol=1e-6)
    # inputs without grad but a LayerNorm that requires it: refused when the step runs
    plain = [t.detach() for t in seq]
    with pytest.raises(ValueError, match="ln_weight/ln_bias require grad"):
        ttt_linear_step(*plain, *(t.detach() for t in w), *ln, backend="cpp")


@pytest.mark.parametrize("grad_input", ["k", "ln_weight"])
def test_auto_leaves_a_step_needing_any_grad_to_torch(grad_input):
    """Under auto in grad mode a step whose q does not require grad but another input does (here k,
    or the inner LayerNorm's weight) runs on the torch step, which gives that input its gradient
    (the C++ step has no autograd: taking it would drop the gradient, or raise)."""
    seq, w, x = _one_token()
    ln = {"ln_weight": x["ln_weight"], "ln_bias": x["ln_bias"]}
    given = {**dict(zip(("q", "k", "v", "eta"), seq)), **ln}
    leaf = given[grad_input].clone().requires_grad_()
    args = {**given, grad_input: leaf}
    o, _ = ttt_linear_step(*(args[n] for n in ("q", "k", "v", "eta")), *w, args["ln_weight"],
                           args["ln_bias"])  # fmt: skip
    (g,) = torch.autograd.grad(o.square().sum(), leaf)
    ref = {**given, grad_input: leaf.detach().clone().requires_grad_()}
    o_ref, _ = ttt_linear_step(*(ref[n] for n in ("q", "k", "v", "eta")), *w, ref["ln_weight"],
                               ref["ln_bias"], backend="generic")  # fmt: skip
    (g_ref,) = torch.autograd.grad(o_ref.square().sum(), ref[grad_input])
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_cpp_step_takes_bf16_tokens_in_fp32():
    """bf16 token inputs: the fused step computes the fp32 step of the rounded inputs (o in bf16,
    the next state fp32), as close to the fp32 step as ttt-core's torch step on the same inputs."""
    seq, w, x = _one_token()
    ln = (x["ln_weight"], x["ln_bias"])
    low = [t.bfloat16() for t in seq]
    ref, _ = ttt_linear_step(*seq, *w, *ln, backend="torch")
    o, state = ttt_linear_step(*low, *w, *ln, backend="cpp")
    o_torch, _ = ttt_linear_step(*low, *w, *ln, backend="torch")
    assert o.dtype == torch.bfloat16 and state.grad_sum["W1"].dtype == torch.float32
    err, err_torch = (o.float() - ref).abs().max(), (o_torch.float() - ref).abs().max()
    assert err <= 1.5 * err_torch + torch.finfo(torch.bfloat16).eps * ref.abs().max()


def test_cpp_step_fields_by_name_refuse_a_misspelt_one():
    """The step's C++ entry reads its fields from a dict by name: a key naming no field raises
    (it would otherwise leave that field at its default), as does a weights tuple over 4."""
    from ttt_cuda._ext import extension

    C = extension()
    with pytest.raises(ValueError, match="StepParams: a key that names no field"):
        C.ttt_step_cpu({"B": 0, "ouput_residual": True}, 1)
    with pytest.raises(ValueError, match="LayerStepParams: a key that names no field"):
        C.ttt_layer_step_cpu({"C": 0, "in_weight": 0}, {"B": 0}, 1)
    with pytest.raises(ValueError, match="params: > 4 weights"):
        C.ttt_step_cpu({"B": 0, "params": (0, 0, 0, 0, 0)}, 1)
    C.ttt_step_cpu({"B": 0, "H": 0}, 1)  # known fields only, no chains: runs and returns


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cpp_step_ignores_the_default_device(kind):
    """The step's output is made beside its inputs, not on torch's default device ("meta" stands
    in for a user's CUDA default): the C++ code writes through its pointer."""
    step, token, w, state = _third_token(kind, 2, 2, 8, seed=37)
    want, _ = step(*token, *w, state=state, mini_batch_size=4, backend="cpp")
    with torch.device("meta"):
        got, _ = step(*token, *w, state=state, mini_batch_size=4, backend="cpp")
    assert got.device.type == "cpu" and torch.equal(got, want)
