import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

from ttt_gemma import AdaRMSNorm, gated_residual


def test_plain_norm_matches_transformers_gemma_rmsnorm():
    ours = AdaRMSNorm(24, None, eps=1e-6)
    ref = GemmaRMSNorm(24, eps=1e-6)
    with torch.no_grad():
        w = torch.randn(24)
        ours.weight.copy_(w)
        ref.weight.copy_(w)
    x = torch.randn(3, 7, 24)
    y, gate = ours(x)
    assert gate is None
    torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("B,L,C,Cc", [(2, 5, 12, 8), (3, 1, 20, 20)])
def test_adarms_matches_fp64_formula(B, L, C, Cc):
    norm = AdaRMSNorm(C, Cc, eps=1e-6)
    with torch.no_grad():
        norm.dense.weight.normal_()
        norm.dense.bias.normal_()
    x, cond = torch.randn(B, L, C), torch.randn(B, Cc)
    y, gate = norm(x, cond)
    assert gate.shape == (B, 1, C)
    # reference: written out in float64
    xd = x.double()
    mod = cond.double() @ norm.dense.weight.double().T + norm.dense.bias.double()  # (B, 3C)
    scale, shift, g = mod[:, :C], mod[:, C : 2 * C], mod[:, 2 * C :]
    ref = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-6)
    ref = ref * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate.double(), g[:, None], rtol=1e-5, atol=1e-6)
    # gated residual: x + gate * y
    r = gated_residual(x, y, gate)
    torch.testing.assert_close(r, x + gate * y)


def test_zero_init_gives_zero_gate_and_plain_norm():
    norm = AdaRMSNorm(16, 8, zero_init=True)
    x, cond = torch.randn(2, 4, 16), torch.randn(2, 8)
    y, gate = norm(x, cond)
    assert torch.count_nonzero(gate) == 0
    torch.testing.assert_close(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_bad_condition_raises():
    with pytest.raises(ValueError, match="cond"):
        AdaRMSNorm(16, 8)(torch.randn(2, 3, 16), None)
    with pytest.raises(ValueError, match="cond"):
        AdaRMSNorm(16, 8)(torch.randn(2, 3, 16), torch.randn(2, 7))
    with pytest.raises(ValueError, match="cond"):
        AdaRMSNorm(16, None)(torch.randn(2, 3, 16), torch.randn(2, 8))
    with pytest.raises(ValueError, match="x"):
        AdaRMSNorm(16, None)(torch.randn(2, 3, 15))
