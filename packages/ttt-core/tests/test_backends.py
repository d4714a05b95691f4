"""The backend registry: names, auto dispatch by device, one-time fallback warning, errors."""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint

import pytest
import torch
from conftest import call, make_inputs
from ttt_test_device import DEVICE

from ttt_core import available_backends, register_backend
from ttt_core.backends import resolve, unregister_backend


@pytest.fixture(autouse=True)
def only_the_tests_backends(monkeypatch):
    """Each test sees a registry holding only the backends it registers: an installed one (ttt-cuda's
    "cpp" serves CPU tensors under auto) would otherwise answer first."""
    import ttt_core.backends as registry

    available_backends()  # load the installed entry points once, then hide them
    monkeypatch.setattr(registry, "_registry", {})
    monkeypatch.setattr(registry, "_resolved", {})


class RecordingBackend:
    """A backend that serves the tests' device (CPU, or CUDA under the device switch) by delegating
    to the torch backend and counting calls."""

    name = "recording"
    device_types = (DEVICE,)

    def __init__(self, max_len):
        self.max_len, self.calls = max_len, 0

    def supports(self, op, q, **kwargs):
        return None if q.shape[2] <= self.max_len else f"L={q.shape[2]} > {self.max_len}"

    def _run(self, kind, q, k, v, eta, *rest, initial_state, output_final_state, **kw):
        from ttt_core.ops.chunked import ttt_chunked

        self.calls += 1
        *_, ln_w, ln_b = rest
        return ttt_chunked(q, k, v, eta, initial_state, ln_w, ln_b, kind=kind, **kw)

    def ttt_linear(self, *args, **kw):
        return self._run("linear", *args, **kw)

    def ttt_mlp(self, *args, **kw):
        return self._run("mlp", *args, **kw)


@pytest.fixture
def recording():
    backend = RecordingBackend(max_len=16)
    register_backend(backend)
    yield backend
    unregister_backend("recording")


class StepBackend(RecordingBackend):
    """A backend that also serves the single-token step (delegating to ttt-core's generic path, an
    independent algorithm), recording each step call's arguments."""

    name = "stepping"

    def __init__(self):
        super().__init__(max_len=10**9)
        self.steps = []

    def ttt_linear_step(self, q, k, v, eta, W1, b1, ln_w, ln_b, *, state, **kw):
        from ttt_core.fast_models import FAST_MODELS
        from ttt_core.ops.reference import ttt_generic

        self.steps.append({"shape": tuple(q.shape), "offset": state.offset, **kw})
        return ttt_generic(FAST_MODELS["linear"], q, k, v, eta, state, ln_w, ln_b, causal=True,
                           **kw)  # fmt: skip


def test_a_registered_backend_serves_the_layers_streaming_tokens():
    """A TTTLayer streaming one token per call reaches a registered backend's ``ttt_linear_step``
    (through the layer's inner learner and the public step entry), with the state and options
    the layer holds, and the tokens equal the whole sequence run by the torch backend (fp64)."""
    from ttt_core import TTTConfig, TTTLayer

    backend = StepBackend()
    register_backend(backend)
    try:
        cfg = TTTConfig(hidden_size=15, num_heads=3, mini_batch_size=4, output_residual=False)
        layer = TTTLayer(cfg).double()
        x = torch.randn(2, 7, 15, dtype=torch.float64)
        layer.config.backend = "torch"
        y, _ = layer(x)
        layer.config.backend = "auto"
        outs, state = [], None
        for t in range(7):
            yt, state = layer(x[:, t : t + 1], state=state)
            outs.append(yt)
    finally:
        unregister_backend("stepping")
    assert [s["offset"] for s in backend.steps] == [0, 1, 2, 3, 0, 1, 2]
    assert all(s["shape"] == (2, 3, 1, 5) and s["output_residual"] is False for s in backend.steps)
    assert backend.calls == 0  # no sequence call: every token took the step
    torch.testing.assert_close(torch.cat(outs, 1), y, rtol=1e-10, atol=1e-10)


def test_auto_skips_a_backend_without_the_step():
    """Under auto a registered backend that lacks ``ttt_linear_step`` is skipped for steps (the
    torch backend serves them, no warning); asked by name, it raises naming the missing op."""
    from ttt_core import ttt_linear_step

    backend = RecordingBackend(max_len=100)
    register_backend(backend)
    try:
        x, w, ln, _ = make_inputs("linear", L=1)
        args = [x["q"], x["k"], x["v"], x["eta"], *w.values(), *ln.values()]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            o, state = ttt_linear_step(*args)
        o_ref, _ = call("linear", x, w, ln, backend="generic")
        torch.testing.assert_close(o, o_ref)
        assert backend.calls == 0 and state.offset == 1
        with pytest.raises(ValueError, match="does not implement ttt_linear_step"):
            ttt_linear_step(*args, backend="recording")
    finally:
        unregister_backend("recording")


def test_builtins_are_listed():
    assert available_backends()[:2] == ["torch", "generic"]


def test_auto_uses_a_registered_backend_and_falls_back_with_one_warning(recording):
    assert "recording" in available_backends()
    x, w, ln, _ = make_inputs("linear", L=10)
    o_auto, _ = call("linear", x, w, ln)
    assert recording.calls == 1
    o_torch, _ = call("linear", x, w, ln, backend="torch")
    torch.testing.assert_close(o_auto, o_torch)
    xl, *_ = make_inputs("linear", L=20)
    with pytest.warns(UserWarning, match="'recording' cannot run this ttt_linear call"):
        call("linear", xl, w, ln)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call("linear", xl, w, ln)  # the same reason warns only once
    assert recording.calls == 1


def test_named_backend_that_cannot_run_raises(recording):
    x, w, ln, _ = make_inputs("linear", L=20)
    with pytest.raises(
        ValueError, match="backend 'recording' cannot run this ttt_linear call: L=20 > 16"
    ):
        call("linear", x, w, ln, backend="recording")


def test_register_rejects_bad_objects(recording):
    with pytest.raises(TypeError, match="backend must define"):
        register_backend(object())
    with pytest.raises(ValueError, match="already registered"):
        register_backend(RecordingBackend(1))


def test_a_backend_may_fall_back_without_warning(recording):
    """``warn_on_fallback = False``: auto runs the calls the backend refuses on the torch backend
    without a warning; asked for by name, it still raises with its reason."""
    recording.warn_on_fallback = False
    x, w, ln, _ = make_inputs("linear", L=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, _ = call("linear", x, w, ln)
    o_torch, _ = call("linear", x, w, ln, backend="torch")
    torch.testing.assert_close(o, o_torch, rtol=0, atol=0)
    assert recording.calls == 0
    with pytest.raises(ValueError, match="L=20 > 16"):
        call("linear", x, w, ln, backend="recording")


def test_auto_ignores_backends_for_other_devices(recording):
    recording.device_types = ("cuda",) if DEVICE == "cpu" else ("cpu",)
    x, *_ = make_inputs("linear", L=4)
    assert resolve("auto", "ttt_linear", x["q"]) == "torch"


def make_recording_backend():
    """Entry-point target: a zero-argument callable returning the backend."""
    return RecordingBackend(max_len=1000)


def test_entry_point_group_registers_a_backend(monkeypatch):
    """A package declaring `ttt_core.backends` entry point is picked up lazily and used by auto."""
    import ttt_core.backends as registry

    ep = EntryPoint(
        name="recording",
        value="test_backends:make_recording_backend",
        group=registry.ENTRY_POINT_GROUP,
    )
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == ep.group else [])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert "recording" in available_backends()
        backend = registry.get_backend("recording")
        x, w, ln, _ = make_inputs("linear", L=6)
        call("linear", x, w, ln)
        assert backend.calls == 1
    finally:
        unregister_backend("recording")


def test_broken_entry_point_warns_and_is_skipped(monkeypatch):
    import ttt_core.backends as registry

    ep = EntryPoint(
        name="broken", value="no_such_module_xyz:backend", group=registry.ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep])
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    with pytest.warns(UserWarning, match="could not load backend 'broken'"):
        names = available_backends()
    assert "broken" not in names


def test_streaming_asks_supports_once_per_metadata_and_registering_asks_again():
    """A token-by-token stream asks a backend's supports() once per call metadata (here the first
    token without a state, then the state's offsets 0, 1, 2: one question each, not one per token;
    the dispatcher keys the answer by the call's arguments as validated), and registering or
    replacing a backend
    forgets the answers: the next token goes to the new one."""
    from ttt_core import ttt_linear_step

    class Counting(StepBackend):
        def __init__(self, refuse):
            super().__init__()
            self.refuse, self.asked = refuse, 0

        def supports(self, op, q, **kwargs):
            self.asked += 1
            return "refused on purpose" if self.refuse else None

    x, w, ln, _ = make_inputs("linear", B=2, H=3, L=9, D=5)
    first = Counting(refuse=False)
    register_backend(first)
    try:
        state = None
        for t in range(7):
            tok = [x[n][:, :, t : t + 1] for n in ("q", "k", "v", "eta")]
            _, state = ttt_linear_step(*tok, *w.values(), *ln.values(), state=state,
                                       mini_batch_size=3)  # fmt: skip
        assert (first.asked, len(first.steps)) == (4, 7)
        second = Counting(refuse=True)
        second.name = "stepping"
        register_backend(second, replace=True)
        tok = [x[n][:, :, 7:8] for n in ("q", "k", "v", "eta")]
        with pytest.warns(UserWarning, match="refused on purpose"):
            o, _ = ttt_linear_step(*tok, *w.values(), *ln.values(), state=state, mini_batch_size=3)
        assert (second.asked, len(second.steps), len(first.steps)) == (1, 0, 7)
        o_ref, _ = ttt_linear_step(*tok, *w.values(), *ln.values(), state=state, mini_batch_size=3,
                                   backend="generic")  # fmt: skip
        torch.testing.assert_close(o, o_ref)
    finally:
        unregister_backend("stepping")
