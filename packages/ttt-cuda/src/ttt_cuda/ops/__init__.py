"""The fused ops as ``torch.library`` custom ops, one module per op (``linear``, ``mlp``,
``titans``, ``titans_mlp``), each with a fake implementation and autograd; ``launch`` fills the
params struct and runs the CPU or CUDA entry point for all of them."""

from ttt_cuda.ops.linear import linear_bwd, linear_fwd
from ttt_cuda.ops.mlp import mlp_bwd, mlp_fwd
from ttt_cuda.ops.titans import titans_bwd, titans_fwd
from ttt_cuda.ops.titans_mlp import titans_mlp_bwd, titans_mlp_fwd

__all__ = ["linear_bwd", "linear_fwd", "mlp_bwd", "mlp_fwd", "titans_bwd", "titans_fwd",
           "titans_mlp_bwd", "titans_mlp_fwd"]  # fmt: skip
