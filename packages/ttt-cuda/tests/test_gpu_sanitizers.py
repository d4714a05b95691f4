"""compute-sanitizer runs of every fused op on small shapes (skipped without a GPU, and with the
reason where the sandbox refuses the sanitizer; TTT_REQUIRE_GPU=1 makes a missing GPU a failure).

memcheck covers all three ops, both scratch placements (shared memory; global: TTT-MLP always,
TTT-Linear forward at D=128 b=48) and the Titans forward whose scratch is exactly the opt-in
shared-memory limit (D=64, b=64). racecheck, synccheck and initcheck run the shared-memory kernels
(TTT-Linear and Titans, D=64, b=16: a full and a shorter mini-batch), where the barriers matter.
Each run is one Python process: forward + backward per case, then "OK".
"""

from __future__ import annotations

import pytest
from gpu_checks import assert_sanitizer_clean

pytestmark = pytest.mark.gpu

_SCRIPT = """
import torch
from ttt_core import ttt_linear, ttt_mlp

def run(op, D, b, L, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=dtype)
    q, k, v = (torch.randn(1, 2, L, D, generator=g, **kw).requires_grad_() for _ in range(3))
    eta = torch.full((1, 2, L), 0.1 / D**0.5, **kw)
    lnw, lnb = torch.ones(2, D, **kw), torch.zeros(2, D, **kw)
    extra = {}
    if op == "mlp":  # F = 4 D
        W1 = (torch.randn(2, D, 4 * D, generator=g, **kw) * D**-0.5)
        W2 = (torch.randn(2, 4 * D, D, generator=g, **kw) * (4 * D) ** -0.5)
        w = [W1, torch.zeros(2, 1, 4 * D, **kw), W2, torch.zeros(2, 1, D, **kw)]
        fn = ttt_mlp
    else:
        w = [torch.randn(2, D, D, generator=g, **kw) * D**-0.5, torch.zeros(2, 1, D, **kw)]
        fn = ttt_linear
        if op == "titans":
            extra = dict(momentum=torch.full((1, 2, L), 0.9, **kw),
                         decay=torch.full((1, 2, L), 0.01, **kw))
    o, _ = fn(q, k, v, eta, *w, lnw, lnb, mini_batch_size=b, backend="cuda", **extra)
    o.float().sum().backward()

for case in CASES:
    run(*case)
torch.cuda.synchronize()
print("OK")
"""

MEMCHECK_CASES = {
    # op: [(op, D, b, L, dtype), ...]
    "linear": [
        ("linear", 64, 16, 40, "torch.float32"),
        ("linear", 128, 32, 33, "torch.bfloat16"),
        ("linear", 64, 64, 70, "torch.float16"),
        ("linear", 128, 48, 50, "torch.float32"),  # forward scratch in global memory
    ],
    "titans": [
        ("titans", 64, 64, 70, "torch.float32"),  # forward scratch = the opt-in limit
        ("titans", 128, 16, 21, "torch.bfloat16"),
        ("titans", 64, 32, 35, "torch.float16"),
    ],
    "mlp": [("mlp", 64, 16, 21, "torch.float32"), ("mlp", 64, 8, 9, "torch.bfloat16")],
}
SHARED_CASES = [("linear", 64, 16, 20, "torch.float32"), ("titans", 64, 16, 20, "torch.bfloat16")]


def _script(cases) -> str:
    listed = ", ".join(f"({op!r}, {D}, {b}, {L}, {dt})" for op, D, b, L, dt in cases)
    return f"import torch\nCASES = [{listed}]\n" + _SCRIPT  # the dtypes name torch


@pytest.mark.parametrize("op", list(MEMCHECK_CASES))
def test_memcheck_clean(cuda_device, op):
    assert_sanitizer_clean(_script(MEMCHECK_CASES[op]), tool="memcheck")


@pytest.mark.parametrize("tool", ["racecheck", "synccheck", "initcheck"])
def test_shared_memory_kernels_clean(cuda_device, tool):
    assert_sanitizer_clean(_script(SHARED_CASES), tool=tool)
