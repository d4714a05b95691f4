"""ttt-cuda: fused TTT-Linear and TTT-MLP forward/backward for ttt-core (CUDA kernels + a
multi-threaded C++ CPU path).

Installing it registers two backends with ttt-core (entry point ``ttt_core.backends``):
``"cuda"`` (the kernels, CUDA tensors) and ``"cpp"`` (the C++ path, CPU tensors), so
``ttt_core.ttt_linear(..., backend="auto")`` (and ``ttt_mlp``) runs the fused path on either.
Direct use: :func:`fused_ttt_linear` / :func:`fused_ttt_mlp` (ttt-core's signatures) and the
custom ops ``torch.ops.ttt.linear_fwd`` / ``linear_bwd`` / ``mlp_*`` / ``titans_*``
(``ttt_cuda.ops``).
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
