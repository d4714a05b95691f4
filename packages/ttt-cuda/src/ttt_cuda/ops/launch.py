"""The launcher every op shares: fills the params struct (``LinearParams`` / ``MLPParams`` /
``TitansParams``) with shapes, modes, strides and pointers, and runs the CPU or CUDA entry point.

Layers (flash-linear-attention style): kernel (csrc/) -> this launcher -> the custom ops
(``ops/linear.py``, ``ops/mlp.py``, ``ops/titans.py``) -> the public functions (``linear.py``,
``mlp.py``, ``titans.py``). One argument order for all ops: per-token inputs
``q, k, v, eta[, mom, dec]``, start weights, ``ln_weight, ln_bias[, scale]``, then
``mini_batch_size[, causal], eps[, end_unscaled], offset, unbounded``, the grad_sum tensors, then
the options ``reconstruction_target, output_residual`` (ttt-core's names and defaults). Every op
first calls ``check_contract``: the shapes, dtypes and devices the kernels read, before any pointer
is taken.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ttt_cuda._ext import extension
from ttt_cuda.common import acc_dtype

__all__ = ["check_contract", "first_order_only", "launch", "num_segments", "params", "rowmajor"]

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}

# Tests only: > 0 runs the CPU path with this many threads per chain and barriers, the way a CUDA
# block runs the kernel (a CPU check of the kernels' __syncthreads structure; slow).
CPU_BLOCK_THREADS = 0


def rowmajor(t: Tensor) -> Tensor:
    """Last dim contiguous (what the kernels index), copying only when needed."""
    return t if t.stride(-1) == 1 else t.contiguous()


def first_order_only(op: str) -> None:
    """Called first by every op's backward: under ``create_graph=True`` (grad mode on inside the
    backward) it raises instead of returning gradients whose own graph would be missing (the
    fused backward is a kernel, not a recorded chain of torch ops)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"ttt_cuda's fused {op} has a first-order backward only (no create_graph=True / double "
            "backward); call ttt-core with backend='torch' for higher-order gradients"
        )


def check_contract(
    op: str,
    q: Tensor,
    token: dict[str, Tensor],
    acc: dict[str, tuple[Tensor | None, str]],
    **dims: int,
) -> None:
    """The kernels' reading contract, checked first by every op (not by the fake impls) before
    any pointer is taken: ``q`` is [B, H, L, D] in a kernel dtype; the per-token tensors
    ``token`` ({name: tensor}: k, v, dO) have q's shape and dtype; each of ``acc`` ({name:
    (tensor, shape)}, the shape a string of dim names such as ``"B H nseg D D"``: B, H, L, D
    from q, the others from ``dims``) has that shape and the accumulation dtype (fp64 for fp64
    q, else fp32); all are on q's device. None (an optional tensor not given) is skipped.

    Raises ValueError (shape, device) or TypeError (dtype) naming ``ttt::<op>`` and the
    argument, expected vs got. The semantics (values, modes) are the public functions' to check.
    """
    where = f"ttt::{op}"
    if q.dim() != 4:
        raise ValueError(f"{where}: q must be 4-D [B, H, L, D], got shape {list(q.shape)}")
    if q.dtype not in _DTYPE_NAMES:
        raise TypeError(f"{where}: q must be one of {', '.join(_DTYPE_NAMES.values())}, got "
                        f"{q.dtype}")  # fmt: skip
    B, H, L, D = q.shape
    sizes = {"B": B, "H": H, "L": L, "D": D, **dims}
    acc_rule = "the accumulation dtype: fp64 for fp64 q, else fp32"
    expected = {name: (t, "B H L D", q.dtype, "q's dtype") for name, t in token.items()}
    expected.update({name: (t, shape, acc_dtype(q.dtype), acc_rule)
                     for name, (t, shape) in acc.items()})  # fmt: skip
    for name, (t, shape, dtype, rule) in expected.items():
        if t is None:
            continue
        want = [sizes[d] for d in shape.split()]
        if list(t.shape) != want:
            named = ", ".join(f"{d}={n}" for d, n in zip(shape.split(), want))
            raise ValueError(f"{where}: {name} must have shape [{named}], got {list(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{where}: {name} must be {dtype} ({rule}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{where}: {name} must be on q's device {q.device}, got {t.device}")


def num_segments(L: int, mini_batch_size: int, offset: int = 0) -> int:
    """Segments of a call of L tokens starting at in-mini-batch position ``offset``."""
    if mini_batch_size < 1 or not 0 <= offset < mini_batch_size:
        raise ValueError(
            "ttt: mini_batch_size must be >= 1 and offset in [0, mini_batch_size), got "
            f"mini_batch_size={mini_batch_size}, offset={offset}"
        )
    first = min(mini_batch_size - offset, L)
    return 1 + (L - first + mini_batch_size - 1) // mini_batch_size


def params(
    kind: str, q, k, v, eta, ln_weight, ln_bias, scale, mini_batch_size, causal, eps,
    end_unscaled=False, offset=0, unbounded=False, reconstruction_target="residual",
    output_residual=True,
):  # fmt: skip
    """The params struct of ``kind`` ("linear" | "mlp" | "titans" | "titans_mlp") with the fields the ops share:
    shapes, modes, the options (target v - k for "residual", v for "value"; o = q + LN(f(q)) or
    LN(f(q))), q/k/v strides and the pointers of the per-token inputs."""
    C = extension()
    kinds = {"linear": C.LinearParams, "mlp": C.MLPParams, "titans": C.TitansParams,
             "titans_mlp": C.TitansMLPParams}  # fmt: skip
    p = kinds[kind]()
    p.B, p.H, p.L, p.D = q.shape
    p.mini_batch_size, p.causal, p.eps = int(mini_batch_size), int(bool(causal)), float(eps)
    p.end_unscaled = int(bool(end_unscaled))
    p.offset, p.unbounded = int(offset), int(bool(unbounded))
    p.value_target = int(reconstruction_target == "value")
    p.output_residual = int(bool(output_residual))
    p.dtype = getattr(C.DType, _DTYPE_NAMES[q.dtype])
    p.q_sb, p.q_sh, p.q_sl = q.stride()[:3]
    p.k_sb, p.k_sh, p.k_sl = k.stride()[:3]
    p.v_sb, p.v_sh, p.v_sl = v.stride()[:3]
    p.q, p.k, p.v, p.eta = q.data_ptr(), k.data_ptr(), v.data_ptr(), eta.data_ptr()
    p.ln_w, p.ln_b, p.scale = ln_weight.data_ptr(), ln_bias.data_ptr(), scale.data_ptr()
    return p


def launch(kind: str, p, device: torch.device, backward: bool) -> None:
    """Runs the CPU or CUDA entry point of ``kind`` ("linear" | "mlp" | "titans" | "titans_mlp",
    the last on the CPU only) on the current
    stream (no host synchronisation). On the CPU the (batch, head) chains are spread over
    ``torch.get_num_threads()`` threads, one thread per chain (the result does not depend on it)."""
    C = extension()
    if device.type == "cpu":
        if CPU_BLOCK_THREADS > 0:
            getattr(C, f"{kind}_cpu_block")(p, backward, CPU_BLOCK_THREADS)
        else:
            getattr(C, f"{kind}_{'bwd' if backward else 'fwd'}_cpu")(p, torch.get_num_threads())
        return
    if device.type != "cuda":
        raise ValueError(f"ttt_cuda: tensors must be on CPU or CUDA, got {device}")
    if kind == "titans_mlp":  # the backends refuse it on CUDA tensors (supports says so)
        raise ValueError("ttt_cuda: the Titans-form TTT-MLP runs on CPU tensors only")
    if not C.WITH_CUDA:
        raise RuntimeError(
            "ttt_cuda was built without CUDA (TTT_ENABLE_CUDA=OFF or no nvcc): reinstall it with "
            "TTT_ENABLE_CUDA=ON on a machine with nvcc to run on CUDA tensors"
        )
    if kind == "mlp":
        elems = C.mlp_workspace_elems(p.D, p.F, p.mini_batch_size, backward)
    else:
        elems = getattr(C, f"{kind}_workspace_elems")(p.D, p.mini_batch_size, backward)
    props = torch.cuda.get_device_properties(device)
    p.max_smem = int(props.shared_memory_per_block_optin)
    workspace = None
    with torch.cuda.device(device):
        if not getattr(C, f"{kind}_scratch_in_shared")(p, backward):  # the launcher's fit check
            # scratch in global memory (L2-resident), one slice per chain
            workspace = torch.empty(p.B * p.H * elems, device=device, dtype=torch.float32)
            p.workspace = workspace.data_ptr()
        p.stream = torch.cuda.current_stream(device).cuda_stream
        getattr(C, f"{kind}_{'bwd' if backward else 'fwd'}_cuda")(p)
