"""Bad input raises a clear ValueError/TypeError naming the argument (shape/metadata checks only)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import call, make_inputs
from ttt_test_device import DEVICE

from ttt_core import TTTConfig, TTTLayer, ttt_linear, ttt_mlp


@pytest.fixture
def lin():
    return make_inputs("linear", B=2, H=3, L=10, D=4, dtype=torch.float32)


def _args(x, w, ln):
    return [x["q"], x["k"], x["v"], x["eta"], *w.values(), ln["ln_weight"], ln["ln_bias"]]


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"q must be 4-D \[B, H, L, D\]"),
        (
            lambda a: a.__setitem__(1, a[1][:, :, :5]),
            ValueError,
            r"k must have shape \[B=2, H=3, L=10, D=4\]",
        ),
        (
            lambda a: a.__setitem__(2, a[2].double()),
            TypeError,
            "v has dtype torch.float64 but q has torch.float32",
        ),
        (
            lambda a: a.__setitem__(3, a[3][:, :2]),
            ValueError,
            r"eta must have shape \[B=2, H=3, L=10\]",
        ),
        (lambda a: a.__setitem__(4, a[4][:2]), ValueError, r"W1 must have shape \[H=3, D=4, F=4\]"),
        (lambda a: a.__setitem__(5, a[5][:, 0]), ValueError, r"b1 must be 3-D"),
        (
            lambda a: a.__setitem__(6, a[6][:, :3]),
            ValueError,
            r"ln_weight must have shape \[H=3, D=4\]",
        ),
        (lambda a: a.__setitem__(0, a[0].long()), TypeError, "q must be a floating-point tensor"),
        (lambda a: a.__setitem__(3, a[3].cpu().numpy()), TypeError, "eta must be a torch.Tensor"),
        (
            lambda a: a.__setitem__(1, a[1].to("meta")),
            ValueError,
            f"k is on meta but q is on {DEVICE}",  # cpu, or cuda(:0) under the switch
        ),
        (lambda a: a.__setitem__(0, a[0][:, :, :0]), ValueError, "at least one token"),
        (lambda a: a.__setitem__(0, a[0][..., :0]), ValueError, "head dim D >= 1"),
    ],
    ids=[
        "rank",
        "k-shape",
        "dtype-mix",
        "eta-shape",
        "W1-shape",
        "b1-rank",
        "ln-shape",
        "int-q",
        "numpy-eta",
        "device-mix",
        "empty",
        "no-head-dim",
    ],
)
def test_bad_tensors(lin, mutate, exc, match):
    args = _args(*lin[:3])
    mutate(args)
    with pytest.raises(exc, match=match):
        ttt_linear(*args)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        (dict(mini_batch_size=0), ValueError, "mini_batch_size must be >= 1"),
        (dict(mini_batch_size=2.0), TypeError, "mini_batch_size must be an int"),
        (dict(token_scale="median"), ValueError, "token_scale must be 'mean', 'sum'"),
        (
            dict(token_scale=torch.ones(3)),
            ValueError,
            r"token_scale must have shape \[mini_batch_size=16\]",
        ),
        (
            dict(token_scale=torch.ones(3), mini_batch_size=None),
            ValueError,
            "needs a finite mini_batch_size",
        ),
        (dict(causal=False, momentum="m"), ValueError, "need causal=True"),
        (dict(causal=False, output_final_state=True), ValueError, "non-causal TTT cannot stream"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(output_final_state="no"), TypeError, "output_final_state must be a bool"),
        (dict(eps=0.0), ValueError, "eps must be a positive number"),
        (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
        (dict(form="both"), ValueError, "form must be"),
        (dict(initial_state={"W1": 1}), TypeError, "initial_state must be a TTTState"),
    ],
)
def test_bad_options(lin, kw, exc, match):
    x, w, ln, _ = lin
    if kw.get("momentum") == "m":
        kw["momentum"] = torch.rand_like(x["eta"])
    with pytest.raises(exc, match=match):
        ttt_linear(*_args(x, w, ln), **kw)


def test_non_causal_streaming_state_raises(lin):
    x, w, ln, _ = lin
    _, state = call("linear", x, w, ln, output_final_state=True)
    with pytest.raises(ValueError, match="non-causal TTT cannot stream"):
        call("linear", x, w, ln, causal=False, initial_state=state)


def test_state_of_other_op_or_batch_raises(lin):
    x, w, ln, _ = lin
    _, state = call("linear", x, w, ln, output_final_state=True)
    xm, wm, lnm, _ = make_inputs("mlp", B=2, H=3, L=10, D=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"initial_state holds fast weights \['W1', 'b1'\]"):
        call("mlp", xm, wm, lnm, initial_state=state)
    x1 = {n: t[:1] for n, t in x.items()}
    with pytest.raises(
        ValueError, match=r"initial_state.params\['W1'\] must have shape \[1, 3, 4, 4\]"
    ):
        call("linear", x1, w, ln, initial_state=state)


def test_mlp_shapes_are_named(lin):
    x, _, ln, _ = lin
    _, wm, _, _ = make_inputs("mlp", B=2, H=3, L=10, D=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"W2 must have shape \[H=3, F=16, D=4\]"):
        ttt_mlp(x["q"], x["k"], x["v"], x["eta"], wm["W1"], wm["b1"], wm["W2"][:, :8], wm["b2"],
                ln["ln_weight"], ln["ln_bias"])  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(hidden_size=30, num_heads=4), "not divisible by num_heads=4"),
        (dict(hidden_size=32, num_heads=4, inner="rnn"), "TTTConfig.inner must be one of"),
        (dict(hidden_size=32, num_heads=4, gate="sigmoid"), "TTTConfig.gate must be one of"),
        (dict(hidden_size=32, num_heads=4, titans=True, causal=False), "titans=True"),
        (
            dict(hidden_size=32, num_heads=4, token_scale="learnable", mini_batch_size=None),
            "learnable",
        ),
        (dict(hidden_size=0, num_heads=4), "hidden_size must be a positive int"),
        # a YAML/CLI string would switch a feature on, whatever it says
        (dict(hidden_size=32, num_heads=4, titans="false"), "TTTConfig.titans must be a bool"),
        (dict(hidden_size=32, num_heads=4, causal=0), "TTTConfig.causal must be a bool"),
        (dict(hidden_size=32, num_heads=4, head_dim=True), "head_dim must be a positive int"),
        (dict(hidden_size=32, num_heads=4, head_dim=2.5), "head_dim must be a positive int"),
        (dict(hidden_size=32, num_heads=4, mini_batch_size="16"), "mini_batch_size must be a"),
        (dict(hidden_size=32, num_heads=4, base_lr=float("nan")), "base_lr must be a finite"),
        (dict(hidden_size=32, num_heads=4, ln_eps=0.0), r"ln_eps must be > 0"),
        (dict(hidden_size=32, num_heads=4, init_std=-1.0), r"init_std must be >= 0"),
    ],
)
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TTTConfig(**kw)


def test_layer_rejects_bad_x_and_state():
    layer = TTTLayer(TTTConfig(hidden_size=16, num_heads=2))
    with pytest.raises(ValueError, match=r"x must be \[B, L, C=16\]"):
        layer(torch.randn(2, 5, 8))
    nc = TTTLayer(TTTConfig(hidden_size=16, num_heads=2, causal=False))
    _, state = layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="only accepted by causal"):
        nc(torch.randn(2, 5, 16), state=state)


# ------------------------------------------------------------------------------------------------
# the carried state, checked by metadata (one test per defect)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def cut(lin):
    """A plain-form state cut inside a mini-batch (offset 3 of b=4) and the call's inputs."""
    x, w, ln, _ = lin
    head = {n: t[:, :, :7] for n, t in x.items()}
    _, state = call("linear", head, w, ln, mini_batch_size=4, output_final_state=True)
    assert state.offset == 3
    return x, w, ln, state


def _resume(x, w, ln, state, **kw):
    return call("linear", x, w, ln, mini_batch_size=4, initial_state=state, **kw)


@pytest.mark.parametrize(
    ("edit", "exc", "match"),
    [
        (lambda s: s.map(torch.Tensor.double), TypeError, r"params\['W1'\] has dtype torch.float64"),
        (lambda s: s.map(torch.Tensor.half), TypeError, "fp32 for fp32/bf16/fp16 inputs"),
        (lambda s: replace(s, offset=4), ValueError, r"offset must be an int in \[0, 4\)"),
        (lambda s: replace(s, offset=-1), ValueError, r"offset must be an int in \[0, 4\)"),
        (lambda s: replace(s, offset=3.0), ValueError, r"offset must be an int in \[0, 4\)"),
        (lambda s: replace(s, offset=0), ValueError, "at offset 0 carries grad_sum"),
        (lambda s: replace(s, grad_sum=None), ValueError, "has no grad_sum"),
        (
            lambda s: replace(s, grad_sum={"W1": s.grad_sum["W1"][:, :, :2], "b1": s.grad_sum["b1"]}),
            ValueError,
            r"grad_sum\['W1'\] must have shape \[2, 3, 4, 4\]",
        ),
        (lambda s: replace(s, grad_sum={"W1": s.grad_sum["W1"]}), ValueError, "grad_sum must hold"),
        (lambda s: replace(s, mini_batch_size=0), ValueError, "mini_batch_size must be an int >= 1"),
    ],
    ids=["fp64-state", "fp16-state", "offset-b", "offset-negative", "offset-float", "stale-grad-sum",
         "missing-grad-sum", "grad-sum-shape", "grad-sum-names", "state-b-zero"],
)  # fmt: skip
def test_bad_state(cut, edit, exc, match):
    x, w, ln, state = cut
    _resume(x, w, ln, state)  # the state itself resumes
    with pytest.raises(exc, match=match):
        _resume(x, w, ln, edit(state))


def test_titans_state_fields_are_checked_and_never_dropped(lin):
    """A Titans state's momentum/current have their shapes checked; passed to a plain call (which
    would silently drop the momentum) it is an error, at a boundary too."""
    x, w, ln, _ = lin
    m = {"momentum": torch.full_like(x["eta"], 0.5), "decay": torch.full_like(x["eta"], 0.1)}
    head = {n: t[:, :, :6] for n, t in x.items()}
    mh = {n: t[:, :, :6] for n, t in m.items()}
    _, cut = call("linear", head, w, ln, mh, mini_batch_size=4, output_final_state=True)
    _, edge = call("linear", head, w, ln, mh, mini_batch_size=3, output_final_state=True)
    assert cut.offset == 2 and edge.offset == 0 and edge.momentum is not None
    for st in (cut, edge):
        with pytest.raises(ValueError, match="comes from a Titans"):
            call("linear", x, w, ln, mini_batch_size=st.mini_batch_size, initial_state=st)
    bad_m = replace(cut, momentum={**cut.momentum, "W1": cut.momentum["W1"][:1]})
    with pytest.raises(ValueError, match=r"momentum\['W1'\] must have shape \[2, 3, 4, 4\]"):
        call("linear", x, w, ln, m, mini_batch_size=4, initial_state=bad_m)
    bad_c = replace(cut, current={**cut.current, "b1": cut.current["b1"][..., :2]})
    with pytest.raises(ValueError, match=r"current\['b1'\] must have shape \[2, 3, 1, 4\]"):
        call("linear", x, w, ln, m, mini_batch_size=4, initial_state=bad_c)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-6, True], ids=str)
def test_eps_must_be_finite_and_positive(lin, eps):
    with pytest.raises(ValueError, match="eps must be a positive number"):
        ttt_linear(*_args(*lin[:3]), eps=eps)


def test_state_is_finite_per_sample_and_the_layer_option_raises():
    layer = TTTLayer(TTTConfig(hidden_size=16, num_heads=2, mini_batch_size=4))
    _, state = layer(torch.randn(3, 6, 16))
    assert state.is_finite().tolist() == [True, True, True]
    bad = state.map(lambda t: t.clone())
    bad.grad_sum["b1"][1, 0, 0, 2] = float("nan")
    assert bad.is_finite().tolist() == [True, False, True]
    layer(torch.randn(3, 1, 16), state=bad)  # off by default: no value read
    checked = TTTLayer(TTTConfig(hidden_size=16, num_heads=2, mini_batch_size=4,
                                 check_finite_state=True))  # fmt: skip
    checked.load_state_dict(layer.state_dict())
    with pytest.raises(FloatingPointError, match="non-finite"):
        checked(torch.randn(3, 1, 16), state=bad)


def test_checks_run_once_per_metadata_and_still_reject_a_changed_call(lin, monkeypatch):
    """Streaming steps with one metadata are checked once (the verdict is remembered by shapes,
    dtypes, devices, option values and the state's offset, never by values); a call that changes
    any of them is checked again and rejected."""
    from ttt_core import ttt_linear_step, validation

    runs = []
    real = validation.check_call
    monkeypatch.setattr(validation, "check_call", lambda **a: runs.append(1) or real(**a))
    x, w, ln, _ = make_inputs("linear", B=2, H=3, L=1, D=5, dtype=torch.float32, seed=11)
    args = _args(x, w, ln)
    _, state = ttt_linear_step(*args, mini_batch_size=3)  # a fresh state at offset 0
    for _ in range(4):  # the same metadata every time: the state after one token, offset 1
        ttt_linear_step(*args, state=state, mini_batch_size=3)
    assert len(runs) == 2
    bad = [
        (dict(args={1: args[1][:, :2]}), ValueError, r"k must have shape \[B=2, H=3, L=1, D=5\]"),
        (dict(args={2: args[2].double()}), TypeError, "v has dtype torch.float64"),
        (dict(state=state.to(torch.float64)), TypeError, r"state.params\['W1'\] has dtype"),
        (dict(state=replace(state, offset=3)), ValueError, r"state.offset must be an int in \[0, 3\)"),
        (dict(state=replace(state, offset=True)), ValueError, r"state\.offset must be an int"),
        (dict(mini_batch_size=4), ValueError, "resume it with mini_batch_size=3"),
        (dict(eps=-1e-6), ValueError, "eps must be a positive number"),
        (dict(eps=True), ValueError, "eps must be a positive number"),
    ]  # fmt: skip
    for change, exc, match in bad:
        call_args = [change.get("args", {}).get(i, a) for i, a in enumerate(args)]
        kw = {"state": change.get("state", state), "mini_batch_size": change.get("mini_batch_size", 3),
              "eps": change.get("eps", 1e-6)}  # fmt: skip
        with pytest.raises(exc, match=match):
            ttt_linear_step(*call_args, **kw)
    assert len(runs) == 2 + len(bad)
    # a rejected call is not remembered: the same call is rejected again
    with pytest.raises(ValueError, match=r"state\.offset must be an int"):
        ttt_linear_step(*args, state=replace(state, offset=True), mini_batch_size=3)
