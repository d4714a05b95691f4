"""bf16/fp16 end to end, by the 2x-of-rounding rule (STYLE.md): the error against an fp64 reference
is at most twice that of the same computation written in plain PyTorch in the low dtype (the
naive per-token loop of tests/naive.py run in that dtype). The fast-weight state stays fp32."""

from __future__ import annotations

import pytest
import torch
from conftest import call, make_inputs
from naive import naive_ttt

from ttt_core import TTTConfig, TTTLayer
from ttt_core.fast_models import FAST_MODELS


def _err(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_op_within_twice_the_rounding_of_plain_pytorch(kind, dtype):
    x, w, ln, _ = make_inputs(kind, B=1, H=2, L=9, D=8, dtype=torch.float64, requires_grad=True)
    low = {n: t.detach().to(dtype).requires_grad_() for n, t in {**x, **w, **ln}.items()}
    lx, lw, lln = ({n: low[n] for n in d} for d in (x, w, ln))
    kw = dict(mini_batch_size=4)
    ref, _ = call(kind, x, w, ln, **kw)
    got, state = call(kind, lx, lw, lln, output_final_state=True, **kw)
    plain = naive_ttt(FAST_MODELS[kind], lw, lx["q"], lx["k"], lx["v"], lx["eta"],
                      lln["ln_weight"], lln["ln_bias"], b=4)  # fmt: skip
    assert got.dtype == dtype and all(t.dtype == torch.float32 for t in state.tensors())
    assert _err(got, ref) <= 2 * _err(plain, ref), (_err(got, ref), _err(plain, ref))
    g_ref = torch.autograd.grad(ref.square().sum(), [x["q"], w["W1"]])
    g_got = torch.autograd.grad(got.float().square().sum(), [lx["q"], lw["W1"]])
    for a, b in zip(g_got, g_ref):
        assert a.dtype == dtype and _err(a, b) < 0.05, _err(a, b)


def test_bf16_layer_trains_streams_and_autocast_works():
    """A TTTLayer converted with .to(bfloat16): forward, backward (bf16 gradients, finite) and
    token-by-token streaming (fp32 state) close to the same bf16 layer's one call; an fp32 layer
    under CPU autocast is at least as close to fp64 as the pure-bf16 layer (x2 rule)."""
    torch.manual_seed(0)
    layer = TTTLayer(TTTConfig(hidden_size=24, num_heads=3, mini_batch_size=4, titans=True))
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    ref, _ = layer.double()(x)
    bf = layer.to(torch.bfloat16)
    y, _ = bf(x.bfloat16())
    grads = torch.autograd.grad(y.float().square().sum(), list(bf.parameters()))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    outs, state = [], None
    for t in range(9):
        yt, state = bf(x[:, t : t + 1].bfloat16(), state=state)
        outs.append(yt)
    assert all(t.dtype == torch.float32 for t in state.tensors())
    err_bf16 = _err(y, ref)
    assert _err(torch.cat(outs, 1), ref) <= 2 * err_bf16
    fp32 = layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, sa = fp32(x.float())
    assert all(t.dtype == torch.float32 for t in sa.tensors())
    assert _err(ya, ref) <= 2 * err_bf16, (_err(ya, ref), err_bf16)
