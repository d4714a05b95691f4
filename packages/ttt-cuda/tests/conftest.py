"""Shared test settings: device tests need a CUDA GPU and a build with nvcc.

ttt-cuda's tests name their device: the C++ CPU path's tests run on the CPU and the device tests
(``test_gpu*.py``) on CUDA through the ``cuda_device`` fixture, so ``TTT_TEST_DEVICE`` (the other
packages' switch, tools/ttt_test_device.py) changes nothing here; TF32 is pinned off all the same.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from ttt_test_device import pin_full_fp32

REQUIRE_GPU = os.environ.get("TTT_REQUIRE_GPU", "0") == "1"


def pytest_configure(config: pytest.Config) -> None:
    pin_full_fp32()  # the torch-backend references run fp32 matmuls without TF32


def gpu_skip_reason() -> str | None:
    """None when the device tests can run, else why they are skipped."""
    import ttt_cuda

    if not torch.cuda.is_available():
        return (
            "no CUDA device (torch.cuda.is_available() is False): device tests run on GPU machines"
        )
    if not ttt_cuda.built_with_cuda():
        return "ttt-cuda was built without nvcc (TTT_ENABLE_CUDA=OFF): reinstall with =ON"
    return None


@pytest.fixture
def cuda_device():
    reason = gpu_skip_reason()
    if reason is not None:
        if REQUIRE_GPU:
            pytest.fail(f"TTT_REQUIRE_GPU=1 but {reason}")
        pytest.skip(reason)
    return torch.device("cuda")
