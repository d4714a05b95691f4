"""Streaming equivalence, reset independence, zero-gate start of a patched Moshi LM."""

from __future__ import annotations

import pytest
import torch
from conftest import make_lm, random_codes
from moshi.models.lm import LMGen
from moshi.utils.compile import no_cuda_graph

from ttt_moshi import TTTStreamingTransformerLayer, patch_lm, ttt_config_for

ATOL = 2e-5  # fp32: plain Moshi itself differs by ~3e-6 between streaming and one pass


def _patched(inner="linear", mbs=4, gate=0.5, titans=False, seed=0, contexts=(12, 6)):
    lm = make_lm(seed).eval()
    extra = {"titans": True} if titans else {}
    cfg = ttt_config_for(lm, inner=inner, mini_batch_size=mbs, gate_init=gate, **extra)
    patch_lm(
        lm, layers=[0, 2], ttt=cfg, attention_context=contexts[0], ttt_attention_context=contexts[1]
    )
    return lm


def _stream_text_logits(lm, codes, chunks):
    """forward_text over codes [B, K, T] in streaming mode, cut into the given chunk lengths."""
    B, _, T = codes.shape
    assert sum(chunks) == T
    outs, s = [], 0
    with lm.streaming(B):
        for n in chunks:
            outs.append(lm.forward_text(codes[:, :, s : s + n])[1])
            s += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize(
    ("inner", "titans"),
    [("linear", False), ("mlp", False), ("linear", True)],
    ids=["linear", "mlp", "linear-titans"],
)
@pytest.mark.parametrize("chunks", [[1] * 29, [3, 1, 6, 2, 9, 5, 3]], ids=["step1", "uneven"])
def test_streaming_equals_one_forward(inner, titans, chunks):
    """B2-T29, mini-batch 4: 7 boundaries crossed, the last mini-batch partial.

    Moshi's ring KV cache only supports chunks longer than one step when the attention window
    covers the chunk and its past, so the uneven cut uses windows of 64 (plain Moshi is the same).
    """
    contexts = (12, 6) if max(chunks) == 1 else (64, 64)
    lm = _patched(inner=inner, titans=titans, contexts=contexts)
    codes = random_codes(2, 29)
    with torch.no_grad():
        _, full = lm.forward_text(codes)  # (B, 1, T, Vt)
        streamed = _stream_text_logits(lm, codes, chunks)
    assert streamed.shape == full.shape
    torch.testing.assert_close(streamed, full, atol=ATOL, rtol=0)
    # the TTT contribution is not negligible: without it the logits differ by far more than ATOL
    with torch.no_grad():
        for layer in lm.transformer.layers:
            if isinstance(layer, TTTStreamingTransformerLayer):
                layer.ttt.gate_alpha.zero_()
        _, no_ttt = lm.forward_text(codes)
    assert (no_ttt - full).abs().max() > 100 * ATOL


def test_streaming_state_holds_partial_mini_batch():
    lm = _patched(mbs=4)
    codes = random_codes(1, 6)
    with torch.no_grad(), lm.streaming(1):
        lm.forward_text(codes)
        st = lm.transformer.layers[0]._streaming_state.ttt_state
        assert st.offset == 6 % 4  # 2 tokens into the second mini-batch
        assert st.grad_sum is not None
        assert st.params["W1"].shape == (1, 1, 8, 8)  # (B, H, D, D): default 4 heads // 4


def test_lmgen_steps_match_one_transformer_pass():
    """LMGen (greedy) drives the main transformer token by token; the inputs it fed, run in one
    non-streaming pass, give the same outputs."""
    lm = _patched(mbs=4)
    inputs, outputs = [], []

    def record(_module, args, out):
        inputs.append(args[0].clone())
        outputs.append(out.clone())

    h = lm.transformer.register_forward_hook(record)
    gen = LMGen(lm, use_sampling=False)
    with torch.no_grad(), gen.streaming(2), no_cuda_graph():  # graphs: see the next test
        for _ in range(13):
            gen.step(torch.zeros(2, 0, 1, dtype=torch.long))
    h.remove()
    x = torch.cat(inputs, dim=1)  # (B, 13, C)
    with torch.no_grad():
        full = lm.transformer(x)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="LMGen captures CUDA graphs on CUDA only")
def test_lmgen_cuda_graph_capture_is_refused_with_the_way_out():
    """On CUDA, LMGen captures its step in a CUDA graph, which would replay one token's TTT update
    for every later token: the capture is refused, naming the switch that turns graphs off."""
    lm = _patched(mbs=4).cuda()
    gen = LMGen(lm, use_sampling=False)
    with torch.no_grad(), gen.streaming(1), pytest.raises(RuntimeError, match="NO_CUDA_GRAPH=1"):
        for _ in range(3):  # the first step runs eagerly (warm-up), the second is captured
            gen.step(torch.zeros(1, 0, 1, dtype=torch.long, device="cuda"))


def test_reset_streaming_makes_sequences_independent():
    lm = _patched(mbs=4)
    a, b = random_codes(2, 11, seed=5), random_codes(2, 9, seed=6)
    with torch.no_grad():
        fresh_b = _stream_text_logits(lm, b, [1] * 9)
        outs = []
        with lm.streaming(2):
            for t in range(11):
                lm.forward_text(a[:, :, t : t + 1])
            lm.reset_streaming()
            for layer in lm.transformer.layers:
                if isinstance(layer, TTTStreamingTransformerLayer):
                    assert layer._streaming_state.ttt_state is None
            for t in range(9):
                outs.append(lm.forward_text(b[:, :, t : t + 1])[1])
    torch.testing.assert_close(torch.cat(outs, 2), fresh_b, atol=ATOL, rtol=0)


def test_partial_reset_at_boundary_restarts_only_masked_samples():
    lm = _patched(mbs=4)
    a, b = random_codes(2, 8, seed=5), random_codes(2, 5, seed=6)
    with torch.no_grad():
        ref = _stream_text_logits(lm, torch.cat([a, b], 2), [1] * 13)  # sample 1 never reset
        outs = []
        with lm.streaming(2):
            for t in range(8):
                lm.forward_text(a[:, :, t : t + 1])
            # attention keeps its own cache semantics; TTT restarts sample 0 only
            for layer in lm.transformer.layers:
                if isinstance(layer, TTTStreamingTransformerLayer):
                    layer._streaming_state.reset(torch.tensor([True, False]))
            for t in range(5):
                outs.append(lm.forward_text(b[:, :, t : t + 1])[1])
    got = torch.cat(outs, 2)
    torch.testing.assert_close(got[1], ref[1, :, 8:], atol=ATOL, rtol=0)
    assert not torch.allclose(got[0], ref[0, :, 8:], atol=1e-3)  # sample 0 forgot a


def test_partial_reset_inside_mini_batch_is_refused():
    lm = _patched(mbs=4)
    with torch.no_grad(), lm.streaming(2):
        lm.forward_text(random_codes(2, 3))
        with pytest.raises(ValueError, match="mini-batch boundary"):
            lm.reset_streaming(torch.tensor([True, False]))


def test_exec_mask_with_false_entries_is_refused():
    lm = _patched()
    with lm.streaming(2), pytest.raises(ValueError, match="exec_mask"):
        lm.set_exec_mask(torch.tensor([True, False]))


def test_zero_gate_gives_exactly_the_unpatched_logits():
    plain = make_lm(3).eval()
    patched = make_lm(3).eval()
    cfg = ttt_config_for(patched, mini_batch_size=4, gate_init=0.0)
    patch_lm(patched, layers=[0, 1, 2], ttt=cfg)
    codes = random_codes(2, 21)
    with torch.no_grad():
        out_p, out_q = plain(codes), patched(codes)
    assert torch.equal(out_p.text_logits.nan_to_num(), out_q.text_logits.nan_to_num())
    assert torch.equal(out_p.logits.nan_to_num(), out_q.logits.nan_to_num())
    # ... and not by accident: a non-zero gate changes them
    with torch.no_grad():
        patched.transformer.layers[1].ttt.gate_alpha.fill_(0.1)
        out_r = patched(codes)
    assert not torch.equal(out_p.text_logits.nan_to_num(), out_r.text_logits.nan_to_num())
