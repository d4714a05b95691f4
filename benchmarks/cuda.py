"""Side-by-side GPU benchmark of fused TTT-Linear and TTT-MLP (ttt-cuda) against ttt-core's torch
backend (eager and torch.compile) and, for TTT-Linear, flash-linear-attention's
``chunk_ttt_linear`` where it is installed.

GPU-only: on a machine without CUDA (or a ttt-cuda built without nvcc) it prints why and exits 0.

    python benchmarks/cuda.py                 # B=8, H=12, D=64, b=16, bf16, L in 2048/8192
    python benchmarks/cuda.py --quick         # one small L, few iterations (a smoke run)
    python benchmarks/cuda.py --ops mlp       # only TTT-MLP (F = 4D = 256)
    python benchmarks/cuda.py --deadline-s 200 --out DIR/cuda.json   # what tools/gpu_check.sh runs

Writes ``benchmarks/results/cuda_<device>.json`` (with ``--quick``, a smoke run:
``benchmarks/results/quick/cuda_<device>.json``; or ``--out``): the machine, the exact command, the
GPU's peaks (measured in this run: device-to-device copy and an 8192^3 bf16 matmul; and the
datasheet's, by device name), and per (op, L, impl) forward and forward+backward milliseconds with
achieved GB/s and TFLOP/s and their share of both peaks. The file is rewritten after every row, and
the compiled torch backend (slow to compile) runs last, so a run stopped by its time limit keeps
what it measured; a row not started before ``--deadline-s`` says so. FLOP model per token and head
(D = head dim, b = mini-batch):
forward 6 D^2 + 4 b D (K W, Q W, K^T G and the two b x b x D products); TTT-MLP (F = 4D)
14 D F + 4 b (D + F) (K W1, X2 W2, G2 W2^T, Q W1, Xq2 W2, the two weight updates and the four
b x b products); forward+backward counted as 4x forward (the backward recomputes the forward, then
about twice its work). Bytes: inputs read and outputs written once (q, k, v, o, eta; plus dO, dq,
dk, dv, deta and the stored start weights).
flash-linear-attention's ``chunk_ttt_linear`` (inputs in its [B, L, H, D] layout, made outside the
timed region; ``scale=1``) computes a different TTT-Linear, so it is a speed reference only: query i
scales its whole row of the mini-batch by its own eta_i (ours: key j's eta_j times the token scale
s_i = 1/(i+1)), the end-of-mini-batch update uses the last token's eta for every key, and its output
is f_W(q) + LN(f_W(q)) (ours: q + LN(f_W(q))).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from machine import machine_info, output_path

# Datasheet peaks by device name (dense bf16 FLOP/s, HBM bytes/s); the run also measures its own.
SPEC_PEAKS = {
    "H200": {"bf16_flops": 989e12, "bytes_per_s": 4.8e12},
    "H100": {"bf16_flops": 989e12, "bytes_per_s": 3.35e12},
    "A100": {"bf16_flops": 312e12, "bytes_per_s": 2.0e12},
}


def _skip(msg: str) -> None:
    print(f"benchmarks/cuda.py: {msg}; nothing to measure (this benchmark needs a CUDA GPU).")
    sys.exit(0)


def _time_ms(fn, budget_s: float = 0.5, max_iters: int = 20) -> float:
    """Milliseconds per call of ``fn``: one warm-up call (compiles, fills caches), then as many
    calls as fit in about ``budget_s`` (1 to ``max_iters``), timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = start.elapsed_time(end) / 1e3
    iters = max(1, min(max_iters, int(budget_s / max(once, 1e-6))))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def measured_peaks(device: torch.device) -> dict:
    """This GPU's device-to-device copy bandwidth (bytes read + written per second) and bf16
    matmul rate (8192^3 on random data), the ceilings the rows are compared with."""
    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    copy_ms = _time_ms(lambda: y.copy_(x))
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm_ms = _time_ms(lambda: a @ b)
    return {
        "bytes_per_s": 2 * x.numel() / (copy_ms / 1e3),
        "bf16_flops": 2 * 8192**3 / (mm_ms / 1e3),
    }


def spec_peaks(name: str) -> dict | None:
    """The datasheet's peaks for a device name, or None when it is not in SPEC_PEAKS."""
    return next((v for k, v in SPEC_PEAKS.items() if k in name.upper()), None)


def _inputs(op, B, H, L, D, dtype, device):
    """ttt_linear / ttt_mlp positional arguments (TTT-MLP: F = 4D)."""
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    eta = torch.full((B, H, L), 1.0 / D, device=device, dtype=dtype)
    lnw, lnb = (
        torch.ones(H, D, device=device, dtype=dtype),
        torch.zeros(H, D, device=device, dtype=dtype),
    )
    if op == "mlp":
        F = 4 * D
        W1 = (torch.randn(H, D, F, device=device, generator=g) * D**-0.5).to(dtype)
        W2 = (torch.randn(H, F, D, device=device, generator=g) * F**-0.5).to(dtype)
        b1 = torch.zeros(H, 1, F, device=device, dtype=dtype)
        b2 = torch.zeros(H, 1, D, device=device, dtype=dtype)
        return [q, k, v, eta, W1, b1, W2, b2, lnw, lnb]
    W1 = (torch.randn(H, D, D, device=device, generator=g) * D**-0.5).to(dtype)
    b1 = torch.zeros(H, 1, D, device=device, dtype=dtype)
    return [q, k, v, eta, W1, b1, lnw, lnb]


def _cost(op, B, H, L, D, b, esize):
    """(forward FLOPs, forward bytes, forward+backward bytes) of one call (see the docstring)."""
    nmb = -(-L // b)
    if op == "mlp":
        F = 4 * D
        flops = B * H * L * (14 * D * F + 4 * b * (D + F))
        state = nmb * (2 * D * F + F + D) * 4
    else:
        flops = B * H * L * (6 * D * D + 4 * b * D)
        state = nmb * D * (D + 1) * 4
    bytes_fwd = B * H * (4 * L * D * esize + L * esize + state)
    return flops, bytes_fwd, bytes_fwd + B * H * (4 * L * D * esize + L * 4)


def _impls(op: str, b: int) -> dict:
    """name -> callable(*inputs) returning o [B, H, L, D]; the compiled torch backend last."""
    from ttt_core import ttt_linear, ttt_mlp

    fn = ttt_mlp if op == "mlp" else ttt_linear
    impls = {
        "ttt-cuda": lambda *a: fn(*a, mini_batch_size=b, backend="cuda")[0],
        "torch-eager": lambda *a: fn(*a, mini_batch_size=b, backend="torch")[0],
    }
    if op == "linear":
        fla = _fla_impl(b)
        if fla is not None:
            impls["fla-chunk_ttt_linear"] = fla
    impls["torch-compile"] = torch.compile(impls["torch-eager"], dynamic=False)
    return impls


def _fla_impl(b: int):
    """flash-linear-attention's chunk_ttt_linear on inputs already in its [B, L, H, D] layout
    (see ``_fla_inputs``), or None when it is not installed."""
    try:
        from fla.ops.ttt import chunk_ttt_linear  # type: ignore[import-not-found]
    except Exception as err:  # not installed, or an API that moved
        print(f"flash-linear-attention not timed: {err}")
        return None

    def fla(q, k, v, eta, W0, b0, lnw, lnb):
        o, _, _ = chunk_ttt_linear(q, k, v, lnw, lnb, eta, scale=1.0, chunk_size=b,
                                   initial_state=W0, initial_state_bias=b0)  # fmt: skip
        return o

    fla.layout = "fla"
    return fla


def _fla_inputs(x: list) -> list:
    """Our linear inputs in fla's layout: q, k, v [B, L, H, D], eta [B, L, H, 1], fp32 start
    weights W0 [B, H, D, D] / b0 [B, H, 1, D], LN [H, D] (contiguous, made once, untimed)."""
    q, k, v, eta, W1, b1, lnw, lnb = x
    B = q.shape[0]
    qkv = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    eta = eta.transpose(1, 2).unsqueeze(-1).contiguous()
    W0 = W1.float().unsqueeze(0).expand(B, -1, -1, -1).contiguous()
    b0 = b1.float().unsqueeze(0).expand(B, -1, -1, -1).contiguous()
    return [*qkv, eta, W0, b0, lnw, lnb]


def _measure(row: dict, fn, x: list, cost: tuple, peaks: dict) -> None:
    """Forward and forward+backward times of ``fn(*x)`` with GB/s, TFLOP/s and shares of the peaks
    (``peaks``: name -> {"bytes_per_s", "bf16_flops"}) into ``row``."""
    flops_fwd, bytes_fwd, bytes_bwd = cost
    with torch.no_grad():
        row["fwd_ms"] = _time_ms(lambda: fn(*x))
    xg = [t.clone().requires_grad_(t.is_floating_point()) for t in x]
    row["fwd_bwd_ms"] = _time_ms(lambda: fn(*xg).float().sum().backward())
    for key, flops, nbytes in (
        ("fwd", flops_fwd, bytes_fwd),
        ("fwd_bwd", 4 * flops_fwd, bytes_bwd),
    ):
        s = row[f"{key}_ms"] / 1e3
        row[f"{key}_TFLOPs"] = flops / s / 1e12
        row[f"{key}_GBs"] = nbytes / s / 1e9
        for which, peak in peaks.items():
            row[f"{key}_pct_{which}_flops"] = 100 * flops / s / peak["bf16_flops"]
            row[f"{key}_pct_{which}_bw"] = 100 * nbytes / s / peak["bytes_per_s"]


def _write(out: Path, doc: dict) -> None:
    """Atomic JSON write (a run killed mid-write leaves the previous file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L=2048 only, short timings")
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192])
    ap.add_argument("--ops", nargs="*", default=["linear", "mlp"], choices=["linear", "mlp"])
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="start no new row after this many seconds (rows not run say so)")  # fmt: skip
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/cuda_<device>.json)"
    )
    args = ap.parse_args()
    t0 = time.monotonic()
    if not torch.cuda.is_available():
        _skip("no CUDA device (torch.cuda.is_available() is False)")
    import ttt_cuda

    if not ttt_cuda.built_with_cuda():
        _skip("ttt-cuda was built without nvcc (reinstall with TTT_ENABLE_CUDA=ON)")

    B, H, D, b, dtype = 8, 12, 64, 16, torch.bfloat16
    lengths = [2048] if args.quick else args.lengths
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peaks = {"measured": measured_peaks(dev)}
    spec = spec_peaks(name)
    if spec is not None:
        peaks["spec"] = spec
    print(f"{name}: peaks {json.dumps(peaks)}", flush=True)
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    out = output_path(args.out, args.quick, f"cuda_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": machine_info(device=name, cuda=torch.version.cuda),
        "shape": {
            "B": B,
            "H": H,
            "D": D,
            "F_mlp": 4 * D,
            "mini_batch_size": b,
            "dtype": str(dtype),
        },
        "peaks": peaks,
        "results": [],
    }
    # every (op, L, impl), the compiled torch backend last: its compile time is the least bounded
    impls = {op: _impls(op, b) for op in args.ops}
    plan = [
        (op, L, n) for op in args.ops for L in lengths for n in impls[op] if n != "torch-compile"
    ]
    plan += [(op, L, "torch-compile") for L in lengths for op in args.ops]  # the short L first
    for op, L, impl_name in plan:
        row = {"op": op, "L": L, "impl": impl_name}
        elapsed = time.monotonic() - t0
        if args.deadline_s is not None and elapsed > args.deadline_s:
            row["error"] = f"not run: the {args.deadline_s:.0f} s deadline had passed"
        else:
            fn = impls[op][impl_name]
            x = _inputs(op, B, H, L, D, dtype, dev)
            cost = _cost(op, B, H, L, D, b, x[0].element_size())
            if getattr(fn, "layout", None) == "fla":
                x = _fla_inputs(x)
            try:
                _measure(row, fn, x, cost, peaks)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as err:  # record and go on: one failing impl must not hide the others
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            del x
            torch.cuda.empty_cache()
        row["started_at_s"] = round(elapsed, 1)
        doc["results"].append(row)
        _write(out, doc)
        print(json.dumps(row), flush=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
