"""ttt-cuda: fused TTT-Linear and TTT-MLP forward/backward for ttt-core (CUDA kernels + a C++ CPU
path).

Installing it registers backend ``"cuda"`` with ttt-core (entry point ``ttt_core.backends``), so
``ttt_core.ttt_linear(..., backend="auto")`` (and ``ttt_mlp``) on CUDA tensors runs the fused
kernels. Direct use: :func:`fused_ttt_linear` / :func:`fused_ttt_mlp` (ttt-core's signatures) and
the custom ops ``torch.ops.ttt.linear_fwd`` / ``linear_bwd`` / ``mlp_fwd`` / ``mlp_bwd``.
"""

from ttt_cuda._ext import extension_error
from ttt_cuda.linear import fused_ttt_linear, linear_unsupported_reason
from ttt_cuda.mlp import fused_ttt_mlp, mlp_unsupported_reason

__all__ = [
    "built_with_cuda",
    "extension_error",
    "fused_ttt_linear",
    "fused_ttt_mlp",
    "linear_unsupported_reason",
    "mlp_unsupported_reason",
]
__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """True when the extension was compiled with nvcc (TTT_ENABLE_CUDA=ON/AUTO with nvcc)."""
    from ttt_cuda._ext import extension

    return bool(extension().WITH_CUDA)
