"""Random TTT inputs for the tests (odd sizes on purpose: L not a multiple of b, D = 12)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The device switch (TTT_TEST_DEVICE=cuda runs these tests on the GPU): tools/ttt_test_device.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))
from ttt_test_device import *  # noqa: F403

# Modules that only make sense on the CPU: skipped with this reason under TTT_TEST_DEVICE=cuda.
CPU_ONLY = {
    "test_ddp.py": "two gloo processes on the CPU (DDP/FSDP2 over CPU tensors)",
}


def make_inputs(kind="linear", B=2, H=3, L=23, D=12, F=None, dtype=torch.float64, titans=False,
                seed=0, requires_grad=False):  # fmt: skip
    """q, k, v [B, H, L, D], eta [B, H, L], fast weights and LN params, optional momentum/decay."""
    g = torch.Generator().manual_seed(seed)
    F = F or 4 * D

    def r(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)
        return t.requires_grad_(requires_grad)

    def u(*shape, lo, hi):
        t = (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)
        return t.requires_grad_(requires_grad)

    x = {
        "q": r(B, H, L, D),
        "k": r(B, H, L, D),
        "v": r(B, H, L, D),
        "eta": u(B, H, L, lo=0.05, hi=0.5),
    }
    if kind == "linear":
        w = {"W1": r(H, D, D, scale=0.3), "b1": r(H, 1, D, scale=0.1)}
    else:
        w = {"W1": r(H, D, F, scale=0.3), "b1": r(H, 1, F, scale=0.1),
             "W2": r(H, F, D, scale=0.15), "b2": r(H, 1, D, scale=0.1)}  # fmt: skip
    ln = {"ln_weight": r(H, D, scale=0.2, shift=1.0), "ln_bias": r(H, D, scale=0.1)}
    extra = {}
    if titans:
        extra = {"momentum": u(B, H, L, lo=0.3, hi=0.9), "decay": u(B, H, L, lo=0.0, hi=0.2)}
        x["eta"] = u(B, H, L, lo=0.02, hi=0.2)  # momentum accumulates steps: keep them small
    return x, w, ln, extra


def call(fn_kind, x, w, ln, extra=None, **kw):
    """ttt_linear / ttt_mlp with the dicts of make_inputs."""
    from ttt_core import ttt_linear, ttt_mlp

    fn = ttt_linear if fn_kind == "linear" else ttt_mlp
    args = [x["q"], x["k"], x["v"], x["eta"], *w.values(), ln["ln_weight"], ln["ln_bias"]]
    return fn(*args, **(extra or {}), **kw)


# the reconstruction-target / output-residual options, for tests that run every combination
OPTIONS = pytest.mark.parametrize(
    "options",
    [dict(reconstruction_target="value"), dict(output_residual=False),
     dict(reconstruction_target="value", output_residual=False)],
    ids=["value-target", "no-residual", "both"],
)  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
