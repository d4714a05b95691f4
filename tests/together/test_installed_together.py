"""All five packages installed in one environment (``nox -s tests-together``): each imports and
computes, and the shared dependencies are the ones transformers 5.x needs.

A short smoke run, not the packages' own tests (their sessions run those, one venv each).
"""

from __future__ import annotations

import importlib.metadata as md
from unittest import mock

import pytest
import torch


def _major(dist: str) -> int:
    return int(md.version(dist).split(".")[0])


def test_transformers_imports_beside_moshi_pins():
    """ttt-moshi once pinned huggingface-hub<1.0 and safetensors<0.8: transformers 5.x then failed
    with ``cannot import name 'ResolvedRevision'``."""
    from transformers import GemmaConfig  # noqa: F401 - the import is the check

    assert _major("transformers") >= 5 and _major("huggingface-hub") >= 1
    import moshi.models.loaders  # noqa: F401 - moshi's own hub code imports with the new hub


def test_core_and_the_cuda_packages_cpu_backend_agree():
    import ttt_core

    assert "cuda" in ttt_core.available_backends()  # registered through the entry point
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 1, 2, 7, 8
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    eta = torch.full((B, H, L), 0.1)
    W1 = torch.randn(H, D, D, generator=g) * 0.1
    b1, ln_w, ln_b = torch.zeros(H, 1, D), torch.ones(H, D), torch.zeros(H, D)
    args = (q, k, v, eta, W1, b1, ln_w, ln_b)
    o_torch, _ = ttt_core.ttt_linear(*args, mini_batch_size=4, backend="torch")
    o_cuda, _ = ttt_core.ttt_linear(*args, mini_batch_size=4, backend="cuda")
    torch.testing.assert_close(o_cuda, o_torch, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("package", ["ttt_gemma", "ttt_titans"])
def test_integration_imports(package):
    module = __import__(package)
    assert module.__all__


def _small_moshi_lm():
    """A 2-layer Moshi text LM (dim 32, RMSNorm f32, attention window 16), seeded, in eval mode."""
    from moshi.models.lm import LMModel

    torch.manual_seed(0)
    return LMModel(
        delays=[0], n_q=0, dep_q=0, card=16, text_card=32, dim=32, num_heads=4, num_layers=2,
        hidden_scale=2, causal=True, context=16, gating="silu", norm="rms_norm_f32",
        positional_embedding="rope",
    ).eval()  # fmt: skip


def test_moshi_patch_and_forward():
    from moshi.utils.compile import no_compile

    from ttt_moshi import patch_lm, ttt_config_for

    lm = _small_moshi_lm()
    codes = torch.randint(0, 32, (1, 1, 9))
    with torch.no_grad(), no_compile():
        before = lm.forward_text(codes)[1]
        patch_lm(lm, [1], ttt_config_for(lm, mini_batch_size=4, gate_init=0.0))
        assert torch.equal(lm.forward_text(codes)[1], before)


def test_moshi_streaming_runs_the_fused_block_step():
    """ttt-moshi beside ttt-cuda: a patched Moshi LM streaming token by token under no_grad runs
    each TTT block's token (its RMS pre-norm, the TTT layer, the gate and the residual) as one C++
    call, and gives the logits of one whole-sequence forward (the chunked form)."""
    import ttt_cuda.backend
    from ttt_moshi import TTTStreamingTransformerLayer, patch_lm, ttt_config_for

    fused = mock.patch.object(ttt_cuda.backend, "layer_step", wraps=ttt_cuda.backend.layer_step)
    lm = _small_moshi_lm()
    patch_lm(lm, [0, 1], ttt_config_for(lm, mini_batch_size=4, gate_init=0.5))
    with torch.no_grad():
        for layer in lm.transformer.layers:  # a norm weight off 1, so that it is read
            layer.norm_ttt.alpha.mul_(1.0 + 0.3 * torch.randn_like(layer.norm_ttt.alpha))
    codes = torch.randint(0, 32, (2, 1, 11))
    with torch.no_grad():
        _, full = lm.forward_text(codes)  # (B, 1, T, Vt)
        outs = []
        with lm.streaming(2), fused as calls:
            for t in range(11):
                outs.append(lm.forward_text(codes[:, :, t : t + 1])[1])
    assert calls.call_count == 2 * 11  # two TTT layers, every token fused
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=2e-5, rtol=0)
    with torch.no_grad():  # the TTT blocks' share is far above that tolerance
        for layer in lm.transformer.layers:
            assert isinstance(layer, TTTStreamingTransformerLayer)
            layer.ttt.gate_alpha.zero_()
        _, no_ttt = lm.forward_text(codes)
    assert (no_ttt - full).abs().max() > 100 * 2e-5
