"""Per-position loss against a plain loop over Moshi's own outputs; slope against numpy.polyfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_lm, random_codes

from ttt_moshi import loss_slope, patch_lm, per_position_loss, ttt_config_for


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
