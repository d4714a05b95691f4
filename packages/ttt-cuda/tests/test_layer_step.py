"""The fused whole-layer streaming step (``ttt_layer_step``: ``csrc/ttt_step_cpu.cpp``'s
``ttt_layer_step_cpu`` through ``layer_step.py``), which ttt-core's ``TTTLayer.forward`` takes for
one streaming token under ``torch.no_grad()``. References: the same layer's ordinary road (its
projections in torch, the step through ttt-core's torch backend) token by token from the same
state, and the whole sequence in one call of the torch backend (the chunked form: another
algorithm), in fp64 at 1e-10 and in fp32 at float rounding. Streams start from nothing and from a
state cut inside a mini-batch, and cross mini-batch ends; odd sizes throughout."""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import pytest
import torch

import ttt_cuda.backend
from ttt_core import TTTConfig, TTTLayer, TTTState

C, H, D, b, L = 30, 3, 7, 4, 11
PREFIX = 3  # the cut stream starts at offset 3 and crosses the mini-batch ends at tokens 4 and 8
CASES = {
    "linear": dict(),
    "linear-sum-tanh": dict(token_scale="sum", gate="tanh_alpha", gate_init=0.4),
    "linear-learnable-bias": dict(token_scale="learnable", bias=True),
    "linear-titans": dict(titans=True, gate="tanh_alpha"),
    "linear-value-no-residual-no-postnorm": dict(reconstruction_target="value",
                                                 output_residual=False, post_norm=False),
    "mlp": dict(inner="mlp", mlp_ratio=3),
    "mlp-titans-bias": dict(inner="mlp", mlp_ratio=3, titans=True, bias=True),
}  # fmt: skip
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _layers(
    options: dict, dtype: torch.dtype, B: int = 2
) -> tuple[TTTLayer, TTTLayer, torch.Tensor]:
    """The layer under test (backend auto: cpp here), its twin on the torch backend with the same
    weights (every parameter perturbed off its init, so that no bias or gate is trivially 0 or 1),
    and x [B, L, C]."""
    torch.manual_seed(5)
    cfg = TTTConfig(hidden_size=C, num_heads=H, head_dim=D, mini_batch_size=b, base_lr=0.7,
                    **options)  # fmt: skip
    layer = TTTLayer(cfg).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    twin = TTTLayer(dataclasses.replace(cfg, backend="torch")).to(dtype)
    twin.load_state_dict(layer.state_dict())
    return layer, twin, torch.randn(B, L, C, dtype=dtype)


@pytest.fixture
def fused_calls(monkeypatch) -> list[int]:
    """Counts the calls of the fused layer step."""
    calls = [0]
    real = ttt_cuda.backend.layer_step

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(ttt_cuda.backend, "layer_step", counted)
    return calls


def _state_tensors(state: TTTState) -> dict[str, torch.Tensor]:
    return {f"{part}.{n}": t for part in ("params", "grad_sum", "momentum", "current")
            for n, t in (getattr(state, part) or {}).items()}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("start", ["fresh", "cut"])
@pytest.mark.parametrize("case", list(CASES), ids=[f"{c}-C{C}-H{H}-D{D}-b{b}" for c in CASES])
def test_layer_step_matches_ordinary_road_and_whole_sequence(case, start, dtype, fused_calls):
    layer, twin, x = _layers(CASES[case], dtype)
    with torch.no_grad():
        whole, whole_state = twin(x)  # the chunked torch backend over the whole sequence
        lo, st, st_ref = 0, None, None
        if start == "cut":  # a state cut inside a mini-batch by a whole-chunk call
            lo = PREFIX
            _, st = twin(x[:, :PREFIX])
            st_ref = st
        for i in range(lo, L):
            y, st = layer(x[:, i : i + 1], state=st)
            y_ref, st_ref = twin(x[:, i : i + 1], state=st_ref)
            torch.testing.assert_close(y, y_ref, **TOL[dtype], msg=f"token {i}")
            torch.testing.assert_close(y, whole[:, i : i + 1], **TOL[dtype], msg=f"token {i}")
    assert fused_calls[0] == L - lo
    assert (st.offset, st.mini_batch_size) == (st_ref.offset, st_ref.mini_batch_size)
    got, want, end = _state_tensors(st), _state_tensors(st_ref), _state_tensors(whole_state)
    assert got.keys() == want.keys() == end.keys()
    for name in got:
        assert got[name].dtype == want[name].dtype
        torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=name)
        torch.testing.assert_close(got[name], end[name], **TOL[dtype], msg=name)


REFUSED = {  # options, dtype, the modes the stream runs under
    "grad-mode": (dict(), torch.float32, []),
    "gelu-gate": (dict(gate="gelu"), torch.float32, [torch.no_grad]),
    "qk-l2-norm": (dict(qk_l2_norm=True), torch.float32, [torch.no_grad]),
    "normalize-target": (dict(normalize_target=True), torch.float32, [torch.no_grad]),
    "bf16": (dict(), torch.bfloat16, [torch.no_grad]),
    "autocast": (dict(), torch.float32,
                 [torch.no_grad, lambda: torch.autocast("cpu", dtype=torch.bfloat16)]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_calls_take_the_ordinary_road(case, fused_calls):
    """What the fused step does not compute runs the layer's ordinary road: no fused call, and
    the same outputs as the torch-backend twin."""
    options, dtype, modes = REFUSED[case]
    layer, twin, x = _layers(options, dtype)
    low = dtype == torch.bfloat16 or case == "autocast"
    tol = dict(rtol=2e-2, atol=2e-2) if low else TOL[torch.float32]
    st = st_ref = None
    for i in range(6):
        with ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode())
            y, st = layer(x[:, i : i + 1], state=st)
            y_ref, st_ref = twin(x[:, i : i + 1], state=st_ref)
        torch.testing.assert_close(y, y_ref, **tol)
    assert fused_calls[0] == 0


def test_layer_step_bit_identical_across_threads(fused_calls):
    """Wide enough (C 1024, 8 heads of 64: 3.2 Mflop per sample in the input projection) that two
    threads split the projections; the result is the same bits."""
    torch.manual_seed(2)
    layer = TTTLayer(TTTConfig(hidden_size=1024, num_heads=8, head_dim=64, mini_batch_size=b,
                               gate="tanh_alpha"))  # fmt: skip
    x = torch.randn(2, 6, 1024)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            st, ys = None, []
            with torch.no_grad():
                for i in range(6):
                    y, st = layer(x[:, i : i + 1], state=st)
                    ys.append(y)
            runs.append((torch.cat(ys, 1), _state_tensors(st)))
    finally:
        torch.set_num_threads(threads)
    assert fused_calls[0] == 18
    for ys, states in runs[1:]:
        assert torch.equal(ys, runs[0][0])
        assert all(torch.equal(t, runs[0][1][n]) for n, t in states.items())


def test_a_bad_state_raises_as_on_the_ordinary_road(fused_calls):
    layer, _, x = _layers({}, torch.float32)
    with torch.no_grad():
        _, st = layer(x[:, :3])
        with pytest.raises(
            ValueError, match=r"state\.params\['W1'\] must have shape \[1, 3, 7, 7\]"
        ):
            layer(x[:1, 3:4], state=st)  # the state holds 2 samples
        bad = dataclasses.replace(st, offset=b)
        with pytest.raises(ValueError, match=r"state\.offset must be an int in \[0, 4\)"):
            layer(x[:, 3:4], state=bad)
    assert fused_calls[0] == 0


def test_check_finite_state_on_the_fused_road(fused_calls):
    layer, _, x = _layers({}, torch.float32)
    layer.config.check_finite_state = True
    with torch.no_grad():
        _, st = layer(x[:, :2])
        poisoned = dataclasses.replace(
            st, grad_sum={n: t * float("nan") for n, t in st.grad_sum.items()}
        )
        with pytest.raises(FloatingPointError, match="non-finite"):
            layer(x[:, 2:3], state=poisoned)
    assert fused_calls[0] == 1


class _AlphaRMSNorm(torch.nn.Module):
    """An RMS norm that states its weight and eps through ``rms_norm_params`` (the protocol
    ttt-moshi's TTTRMSNorm follows; its scale ``alpha`` is [1, 1, C] like Moshi's)."""

    def __init__(self, eps: float, declines: bool = False) -> None:
        super().__init__()
        self.alpha = torch.nn.Parameter(1.0 + 0.3 * torch.randn(1, 1, C))
        self.eps, self.declines = eps, declines

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.alpha * torch.rsqrt(torch.mean(x * x, dim=2, keepdim=True) + self.eps))

    def rms_norm_params(self, x: torch.Tensor):
        if self.declines or x.dtype != self.alpha.dtype:
            return None
        return self.alpha, self.eps  # [1, 1, C]: C elements


PRE_NORMS = {
    "rmsnorm-affine": lambda: torch.nn.RMSNorm(C, eps=1e-5),
    "rmsnorm-default-eps": lambda: torch.nn.RMSNorm(C),
    "rmsnorm-no-weight": lambda: torch.nn.RMSNorm(C, eps=1e-3, elementwise_affine=False),
    "rms-norm-params": lambda: _AlphaRMSNorm(1e-6),
    "none": lambda: None,
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("norm", list(PRE_NORMS))
@pytest.mark.parametrize("case", ["linear-sum-tanh", "mlp-titans-bias"])
def test_layer_step_with_the_block_matches_the_ordinary_road(case, norm, residual, dtype,
                                                            fused_calls):  # fmt: skip
    """``TTTLayer.forward(pre_norm=..., residual=...)``: the fused step computes the RMS pre-norm
    and the residual in its C++ call; the torch-backend twin applies the norm module and adds x
    (its ordinary road), token by token from a state cut inside a mini-batch; and the block equals
    ``x + TTT(pre_norm(x))`` composed by hand over the whole sequence."""
    layer, twin, x = _layers(CASES[case], dtype)
    torch.manual_seed(11)
    pre_norm = PRE_NORMS[norm]()
    if pre_norm is not None:
        pre_norm = pre_norm.to(dtype)
        with torch.no_grad():
            for p in pre_norm.parameters():
                p.add_(0.2 * torch.randn_like(p))
    block = dict(pre_norm=pre_norm, residual=residual)
    with torch.no_grad():
        h = x if pre_norm is None else pre_norm(x)
        whole, _ = twin(h)
        whole = x + whole if residual else whole
        _, st = twin(x[:, :PREFIX], **block)
        st_ref = st
        for i in range(PREFIX, L):
            y, st = layer(x[:, i : i + 1], state=st, **block)
            y_ref, st_ref = twin(x[:, i : i + 1], state=st_ref, **block)
            torch.testing.assert_close(y, y_ref, **TOL[dtype], msg=f"token {i}")
            torch.testing.assert_close(y, whole[:, i : i + 1], **TOL[dtype], msg=f"token {i}")
    assert fused_calls[0] == L - PREFIX
    got, want = _state_tensors(st), _state_tensors(st_ref)
    for name in got:
        torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=name)


REFUSED_NORMS = {  # a pre-norm the fused step does not compute: the ordinary road runs it
    "layernorm": lambda: torch.nn.LayerNorm(C),
    "rmsnorm-over-two-dims": lambda: torch.nn.RMSNorm((1, C)),
    "rms-norm-params-declines": lambda: _AlphaRMSNorm(1e-6, declines=True),
    "rmsnorm-other-dtype": lambda: torch.nn.RMSNorm(C).double(),
}


@pytest.mark.parametrize("norm", list(REFUSED_NORMS))
def test_unfused_pre_norms_take_the_ordinary_road(norm, fused_calls):
    layer, twin, x = _layers(CASES["linear-sum-tanh"], torch.float32)
    pre_norm = REFUSED_NORMS[norm]()
    with torch.no_grad():
        reason = ttt_cuda.backend.cpp_backend.supports("ttt_layer_step", x[:, :1], layer=layer,
                                                       pre_norm=pre_norm, residual=True)  # fmt: skip
    assert reason is not None and "pre_norm" in reason
    if norm in ("rmsnorm-over-two-dims", "rmsnorm-other-dtype"):
        return  # the ordinary road: what the norm module does with them (torch's checks)
    st = st_ref = None
    with torch.no_grad():
        for i in range(6):
            y, st = layer(x[:, i : i + 1], state=st, pre_norm=pre_norm, residual=True)
            y_ref, st_ref = twin(x[:, i : i + 1], state=st_ref, pre_norm=pre_norm, residual=True)
            torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    assert fused_calls[0] == 0


class _OffsetRMSNorm(torch.nn.RMSNorm):
    """Gemma's RMS norm, ``* (1 + weight)``: an RMSNorm subclass whose forward is not RMSNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, self.normalized_shape, None, self.eps) * (
            1.0 + self.weight
        )


class _LoRALinear(torch.nn.Linear):
    """A Linear subclass with a low-rank term added in its forward (what LoRA wrappers do)."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.a = torch.nn.Parameter(0.3 * torch.randn(2, base.in_features))
        self.b = torch.nn.Parameter(0.3 * torch.randn(base.out_features, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x @ self.a.T @ self.b.T


def _double_output(module, args, out):
    return 2 * out


def _lora_o_proj(layer):
    torch.manual_seed(9)  # the same low-rank term on both layers
    layer.o_proj = _LoRALinear(layer.o_proj)


UNPLAIN = {  # (what is changed on both layers, the pre-norm): the layer step must decline
    "o-proj-subclass": (_lora_o_proj, None),
    "o-proj-hook": (lambda layer: layer.o_proj.register_forward_hook(_double_output), None),
    "post-norm-hook": (lambda layer: layer.post_norm.register_forward_hook(_double_output), None),
    "pre-norm-subclass": (lambda layer: None, lambda: _OffsetRMSNorm(C)),
    "pre-norm-hook": (lambda layer: None, lambda: _hooked(torch.nn.RMSNorm(C))),
    "rms-norm-params-hook": (lambda layer: None, lambda: _hooked(_AlphaRMSNorm(1e-6))),
}


def _hooked(module):
    module.register_forward_hook(_double_output)
    return module


@pytest.mark.parametrize("case", list(UNPLAIN))
def test_modules_the_step_would_not_call_take_the_ordinary_road(case, fused_calls):
    """The layer step computes o_proj, post_norm and the pre-norm from their tensors: a subclass
    (LoRA, Gemma's ``1 + w`` norm) or a forward hook would be skipped without a word. Such a
    call is declined with the reason and runs the ordinary road: the same outputs as the
    torch-backend twin changed alike."""
    change, make_norm = UNPLAIN[case]
    layer, twin, x = _layers(CASES["linear-sum-tanh"], torch.float32)
    change(layer)
    change(twin)
    pre_norm = None if make_norm is None else make_norm()
    with torch.no_grad():
        reason = ttt_cuda.backend.cpp_backend.supports("ttt_layer_step", x[:, :1], layer=layer,
                                                       pre_norm=pre_norm, residual=True)  # fmt: skip
        assert reason is not None
        st = st_ref = None
        for i in range(6):
            y, st = layer(x[:, i : i + 1], state=st, pre_norm=pre_norm, residual=True)
            y_ref, st_ref = twin(x[:, i : i + 1], state=st_ref, pre_norm=pre_norm, residual=True)
            torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    assert fused_calls[0] == 0


def test_a_global_forward_hook_takes_the_ordinary_road(fused_calls):
    """A global forward hook runs around every module call of the ordinary road: declined."""
    layer, _, x = _layers(CASES["linear"], torch.float32)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__)
    )
    try:
        with torch.no_grad():
            layer(x[:, :1])
    finally:
        handle.remove()
    assert fused_calls[0] == 0 and "Linear" in seen  # o_proj ran as a module


def test_layer_step_ignores_the_default_device(fused_calls):
    """The fused step's outputs live beside its inputs, not on torch's default device: a user who
    made another device the default ("meta" stands in for CUDA) still gets the CPU step's numbers
    (the C++ code writes through the outputs' pointers)."""
    layer, _, x = _layers(CASES["linear-titans"], torch.float32)
    runs = []
    for default in ("cpu", "meta"):
        st, ys = None, []
        with torch.no_grad(), torch.device(default):
            for i in range(5):
                y, st = layer(x[:, i : i + 1], state=st)
                ys.append(y)
        runs.append((torch.cat(ys, 1), _state_tensors(st)))
    assert fused_calls[0] == 10
    (want, want_state), (got, got_state) = runs
    assert got.device.type == "cpu" and torch.equal(got, want)
    assert all(torch.equal(t, want_state[n]) for n, t in got_state.items())
