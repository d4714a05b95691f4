"""The demo's memory measurements: name categories against positions worked out by hand, per-token
losses against `per_position_loss`, the gate report against the gate's linearity, and the inner
loss per mini-batch against identities of a window that repeats one mini-batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ttt_moshi import memory_probe as probe
from ttt_moshi import patch_lm, per_position_loss, ttt_config_for
from ttt_moshi.demo import lm_kwargs


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)


def test_name_recurrence_categories_by_hand():
    # reach 8. "abcd"@0 first; "abcd"@5 (previous at 0: all of it within reach of byte 8);
    # "abcd"@22 (previous at 5, ends at 9 <= 22 - 8); "wxyz"@27 first; "wxyz"@36 (previous at
    # 27: straddles the edge, left out); "ab" is too short to be a name
    text = b"abcd abcd " + b"-" * 12 + b"abcd wxyz ab -wxyz"
    assert [text.find(b"abcd", i) for i in (0, 1, 6)] == [0, 5, 22]
    assert [text.find(b"wxyz"), text.rfind(b"wxyz")] == [27, 36]
    second = _bytes(b"qrst" + b"." * 20 + b"qrst")  # a second window: "qrst"@24 beyond reach
    masks = probe.name_recurrence(np.stack([_bytes(text[:28]), second]), reach=8)
    full = probe.name_recurrence(_bytes(text)[None], reach=8)
    expected = {
        "first occurrence": [1, 2, 3, 28, 29, 30],
        "recurring within reach": [6, 7, 8],
        "recurring beyond reach": [23, 24, 25],
    }
    for category, positions in expected.items():
        assert np.flatnonzero(full[category][0]).tolist() == positions, category
    assert np.flatnonzero(masks["recurring beyond reach"][1]).tolist() == [25, 26, 27]
    assert np.flatnonzero(masks["first occurrence"][1]).tolist() == [1, 2, 3]
    # window 0 is cut at 28: "abcd"@22 is whole, "wxyz"@27 is one byte and not a name
    assert np.flatnonzero(masks["recurring beyond reach"][0]).tolist() == [23, 24, 25]
    assert not masks["first occurrence"][0, 26:].any()


def _text_lm(seed: int = 0):
    torch.manual_seed(seed)
    from moshi.models.lm import LMModel

    return LMModel(**lm_kwargs(dim=16, layers=3, heads=2)).eval()


def test_token_losses_average_to_the_per_position_loss():
    lm = _text_lm()
    patch_lm(lm, layers=[1], ttt=ttt_config_for(lm, mini_batch_size=4))
    windows = torch.randint(0, 256, (5, 1, 13), generator=torch.Generator().manual_seed(3))
    losses = probe.text_token_losses(lm, windows, batch_size=2)  # (5, 13)
    assert losses.shape == (5, 13) and np.isfinite(losses).all()
    np.testing.assert_allclose(losses.mean(0), per_position_loss(lm, windows), rtol=1e-6)
    mask = np.zeros((5, 13), dtype=bool)
    mask[1, 2:5] = True
    cats = probe.category_losses(losses, {"some": mask})
    assert cats["some"] == {"loss": pytest.approx(losses[1, 2:5].mean()), "tokens": 3}
    diff = probe.category_differences(losses + 0.5, losses, {"some": mask})
    assert diff["all tokens"]["mean"] == pytest.approx(0.5)
    assert diff["some"]["stderr"] == pytest.approx(0.0, abs=1e-12)
    other = losses.copy()
    other[1, 2:5] += [0.0, 0.3, 0.6]  # mean 0.3, std sqrt(0.06)
    d = probe.category_differences(other, losses, {"some": mask})["some"]
    assert d == {"mean": pytest.approx(0.3), "stderr": pytest.approx(np.sqrt(0.06 / 3))}
    masked = losses.copy()
    masked[1, 2] = np.nan  # a masked token counts nowhere
    cats = probe.category_losses(masked, {"some": mask})
    assert cats["all tokens"]["tokens"] == 64 and cats["some"]["tokens"] == 2
    assert cats["some"]["loss"] == pytest.approx(losses[1, 3:5].mean())
    none = np.zeros_like(mask)  # a category without tokens (short windows)
    assert probe.category_losses(losses, {"none": none})["none"] == {"loss": None, "tokens": 0}
    empty = probe.category_differences(other, losses, {"none": none})["none"]
    assert empty == {"mean": None, "stderr": None}


def test_gate_report_scales_with_tanh_alpha():
    """One TTT layer: its residual input does not depend on its gate, and its output is
    ``tanh(alpha) * o``, so the output ratio is proportional to tanh(alpha)."""
    windows = torch.randint(0, 256, (3, 1, 11), generator=torch.Generator().manual_seed(4))
    reports = {}
    for gate in (0.0, 0.15, 0.3):
        lm = _text_lm()
        patch_lm(lm, layers=[1], ttt=ttt_config_for(lm, mini_batch_size=4, gate_init=gate))
        reports[gate] = probe.gate_report(lm, probe.ttt_inputs(lm, windows))["layer1"]
    assert reports[0.0]["gate_abs_mean"] == 0.0
    assert reports[0.0]["output_rms_over_residual_rms"] == 0.0
    assert reports[0.3]["gate_abs_mean"] == pytest.approx(math.tanh(0.3))
    ratio = (
        reports[0.3]["output_rms_over_residual_rms"] / reports[0.15]["output_rms_over_residual_rms"]
    )
    assert ratio == pytest.approx(math.tanh(0.3) / math.tanh(0.15), rel=1e-6)


def test_inner_loss_by_mini_batch_on_a_repeated_mini_batch():
    """Each window repeats one mini-batch (4 tokens) 3 times: the weights before mini-batch j are
    those after j - 1, which read the same tokens, so ``before[j] == after[j - 1]``; ``fresh`` is
    the same for every copy and equals ``before[0]`` (both at W0). The control reads another
    window's past: different from the own past's loss, the same when all windows are equal."""
    lm = _text_lm()
    patch_lm(lm, layers=[1], ttt=ttt_config_for(lm, mini_batch_size=4))
    layer = lm.transformer.layers[1]
    chunk = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(5))  # (N, b, C)
    out = probe.inner_loss_by_mini_batch(layer, chunk.repeat(1, 3, 1))  # (N, 12, C)
    assert out["start"] == [0, 4, 8]
    for j in (1, 2):
        assert out["before"][j] == pytest.approx(out["after"][j - 1], rel=1e-5)
        assert out["fresh"][j] == pytest.approx(out["fresh"][0], rel=1e-6)
        assert abs(out["before_other_window"][j] - out["before"][j]) > 1e-3
    assert out["before"][0] == pytest.approx(out["fresh"][0], rel=1e-6)
    assert out["before_other_window"][0] == pytest.approx(out["fresh"][0], rel=1e-6)
    same = probe.inner_loss_by_mini_batch(layer, chunk[:1].repeat(3, 3, 1))  # 3 equal windows
    assert same["before_other_window"] == pytest.approx(same["before"], rel=1e-6)


def test_fast_weights_reset_every_mini_batch_reads_each_mini_batch_alone():
    """Under the context manager the TTT block's output over T = 11 (mini-batches of 4, the last
    partial) is its output on each mini-batch read as a separate sequence; outside it is not."""
    lm = _text_lm()
    patch_lm(lm, layers=[1], ttt=ttt_config_for(lm, mini_batch_size=4))
    ttt = lm.transformer.layers[1].ttt
    h = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(6))  # (B, T, C)
    with torch.no_grad():
        alone = torch.cat([ttt(h[:, s : s + 4])[0] for s in (0, 4, 8)], dim=1)  # (B, T, C)
        with probe.fast_weights_reset_every_mini_batch(lm):
            reset = ttt(h)[0]
        carried = ttt(h)[0]
    torch.testing.assert_close(reset, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(carried[:, :4], alone[:, :4], atol=1e-6, rtol=0)
    assert (carried[:, 4:] - alone[:, 4:]).abs().max() > 1e-3  # the carried memory matters
    assert not ttt._forward_hooks  # removed on exit
