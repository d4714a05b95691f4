"""Small random Moshi LMs (no weights download) for the tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from moshi.models.lm import LMModel
from moshi.utils.compile import no_compile

# The device switch (TTT_TEST_DEVICE=cuda runs these tests on the GPU): tools/ttt_test_device.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from ttt_test_device import *  # noqa: F403

# Modules that only make sense on the CPU: skipped with this reason under TTT_TEST_DEVICE=cuda.
CPU_ONLY = {
    "test_data.py": "the shard loader reads numpy files into CPU tensors",
}

# The models here are tiny: one intra-op thread avoids thread-pool overhead on shared CPUs.
torch.set_num_threads(1)

# A Moshi-7B-shaped config scaled down: rope, RMSNorm f32, SiLU gating, delays, a depformer with
# weights per step and multi-linear inputs.
TINY_KWARGS = dict(
    delays=[0, 0, 1],
    n_q=2,
    dep_q=2,
    card=32,
    text_card=40,
    dim=32,
    num_heads=4,
    num_layers=3,
    hidden_scale=2,
    causal=True,
    layer_scale=None,
    context=20,
    gating="silu",
    norm="rms_norm_f32",
    positional_embedding="rope",
    depformer_dim=16,
    depformer_num_heads=2,
    depformer_num_layers=1,
    depformer_multi_linear=True,
    depformer_pos_emb="none",
    depformer_weights_per_step=True,
    depformer_context=2,
    depformer_gating="silu",
    existing_text_padding_id=3,
)


def make_lm(seed: int = 0, **overrides) -> LMModel:
    torch.manual_seed(seed)
    return LMModel(**{**TINY_KWARGS, **overrides})


def random_codes(B: int, T: int, seed: int = 1, lm: LMModel | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    card = TINY_KWARGS["card"] if lm is None else lm.card
    text_card = TINY_KWARGS["text_card"] if lm is None else lm.text_card
    K = 1 + (TINY_KWARGS["n_q"] if lm is None else lm.n_q)
    codes = torch.randint(0, card, (B, K, T), generator=g)
    codes[:, 0] = torch.randint(0, text_card, (B, T), generator=g)
    return codes


@pytest.fixture(autouse=True)
def _no_torch_compile():
    """Moshi compiles its RMSNorm lazily outside of its layers; on CPU that only costs time."""
    with no_compile():
        yield


@pytest.fixture
def tiny_lm() -> LMModel:
    return make_lm()
