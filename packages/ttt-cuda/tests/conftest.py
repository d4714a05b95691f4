"""Shared test settings: device tests need a CUDA GPU and a build with nvcc."""

from __future__ import annotations

import os

import pytest
import torch

REQUIRE_GPU = os.environ.get("TTT_REQUIRE_GPU", "0") == "1"


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
