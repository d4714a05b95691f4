"""Per-position loss against a plain loop over Moshi's own outputs; slope against numpy.polyfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_lm, random_codes

from ttt_moshi import (
    loss_slope,
    patch_lm,
    per_position_loss,
    streaming_per_position_loss,
    token_losses,
    ttt_config_for,
)


def test_per_position_loss_matches_a_plain_loop():
    lm = make_lm().eval()
    patch_lm(lm, layers=[1], ttt=ttt_config_for(lm, mini_batch_size=4))
    windows = random_codes(5, 12)
    curve = per_position_loss(lm, windows, batch_size=2)
    with torch.no_grad():
        out = lm(windows)  # logits [N, dep_q, T, card], text [N, 1, T, Vt]
    ref = np.zeros(12)
    for t in range(12):
        vals = []
        for n in range(5):
            vals.append(F.cross_entropy(out.text_logits[n, 0, t][None], windows[n, 0, t][None]))
            for q in range(2):
                if out.mask[n, q, t]:
                    vals.append(
                        F.cross_entropy(out.logits[n, q, t][None], windows[n, 1 + q, t][None])
                    )
        ref[t] = torch.stack(vals).mean().item()
    np.testing.assert_allclose(curve, ref, rtol=1e-5)


def test_loss_slope_recovers_a_log_law():
    t = np.arange(200)
    curve = 3.0 - 0.25 * np.log2(t + 1) + 0.01 * np.sin(t)
    ref = np.polyfit(np.log2(t[10:] + 1), curve[10:], 1)[0]
    assert loss_slope(curve, start=10) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="start < end"):
        loss_slope(curve, start=150, end=100)


def test_streaming_evaluation_equals_the_full_sequence():
    """Windows (5 and 3 steps) far shorter than the sequence (37), TTT state carried across
    mini-batches of 4: streaming gives the whole-sequence per-position losses."""
    lm = make_lm(3)
    patch_lm(lm, [0, 2], ttt_config_for(lm, mini_batch_size=4), 5, ttt_attention_context=3)
    codes = random_codes(2, 37, seed=7)
    codes[0, 1, 4] = lm.zero_token_id  # a "no input" audio token has no loss
    with torch.no_grad():
        ref_sums, ref_n = token_losses(lm.eval(), codes).per_position()
    sums, n = streaming_per_position_loss(lm, codes)
    np.testing.assert_array_equal(n, ref_n.cpu().numpy())
    np.testing.assert_allclose(sums, ref_sums.double().cpu().numpy(), rtol=1e-5, atol=1e-6)


def _state_bytes(lm) -> int:
    total = 0
    for m in lm.transformer.modules():
        st = getattr(m, "_streaming_state", None)
        for v in vars(st).values() if st is not None else ():
            for t in [v] if torch.is_tensor(v) else getattr(v, "__dict__", {}).values():
                if torch.is_tensor(t):
                    total += t.numel() * t.element_size()
                elif isinstance(t, dict):
                    total += sum(x.numel() * x.element_size() for x in t.values())
    return total


def test_streaming_state_does_not_grow_with_length():
    """What the stream keeps between steps (KV ring caches, TTT fast weights and partial
    mini-batch) has the same size after 20 steps as after 8 x 20."""
    lm = make_lm(4).eval()
    patch_lm(lm, [1], ttt_config_for(lm, mini_batch_size=4), 5, ttt_attention_context=3)
    sizes = []
    for T in (20, 160):
        codes = random_codes(1, T, seed=T)
        initial = lm._get_initial_token()
        with torch.no_grad(), lm.transformer.streaming(1):
            for t in range(T):
                step = codes[:, :, t : t + 1] if t else initial
                lm.forward_text(step)
            sizes.append(_state_bytes(lm))
    assert sizes[0] > 0 and sizes[0] == sizes[1]
