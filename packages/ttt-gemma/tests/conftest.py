import sys
from pathlib import Path

import pytest
import torch

from ttt_gemma import ActionExpertConfig, PrefixEncoderConfig, StandInPrefixEncoder

# The device switch (TTT_TEST_DEVICE=cuda runs these tests on the GPU): tools/ttt_test_device.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from ttt_test_device import *  # noqa: F403

# Modules that only make sense on the CPU: skipped with this reason under TTT_TEST_DEVICE=cuda.
CPU_ONLY = {
    "test_reacher_demo.py": "the MuJoCo Reacher simulation and its scripted expert run on the CPU",
}


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


def make_prefix(cfg: ActionExpertConfig, batch: int = 2, length: int = 5, pad_last: bool = True):
    """A stand-in encoder, its features/pad mask, and the PrefixKV it produces."""
    enc = StandInPrefixEncoder(PrefixEncoderConfig.for_expert(cfg, width=48, mlp_dim=96))
    feats = torch.randn(batch, length, enc.config.feature_dim)
    pad = torch.ones(batch, length, dtype=torch.bool)
    if pad_last:
        pad[0, -2:] = False  # sample 0 has two padding tokens
    return enc, feats, pad, enc(feats, pad)
