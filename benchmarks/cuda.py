"""Side-by-side GPU benchmark of fused TTT-Linear and TTT-MLP (ttt-cuda) against ttt-core's torch
backend (eager and torch.compile) and, for TTT-Linear, flash-linear-attention's
``chunk_ttt_linear`` where it is installed.

GPU-only: on a machine without CUDA (or a ttt-cuda built without nvcc) it prints why and exits 0.

    python benchmarks/cuda.py                 # B=8, H=12, D=64, b=16, bf16, L in 2048/8192/32768
    python benchmarks/cuda.py --quick         # one small L, few iterations (a smoke run)
    python benchmarks/cuda.py --ops mlp       # only TTT-MLP (F = 4D = 256)

Writes ``benchmarks/results/cuda_<device>.json``: the machine, the exact command, and per (L, impl)
forward and forward+backward milliseconds with achieved GB/s and TFLOP/s against the H100 SXM's
3.35 TB/s and 989 TFLOP/s (bf16 dense). FLOP model per token and head (D = head dim,
b = mini-batch):
forward 6 D^2 + 4 b D (K W, Q W, K^T G and the two b x b x D products); TTT-MLP (F = 4D)
14 D F + 4 b (D + F) (K W1, X2 W2, G2 W2^T, Q W1, Xq2 W2, the two weight updates and the four
b x b products); forward+backward counted as 4x forward (the backward recomputes the forward, then
about twice its work). Bytes: inputs read and outputs written once (q, k, v, o, eta; plus dO, dq,
dk, dv, deta and the stored start weights).
flash-linear-attention's TTT-Linear uses one learning rate per query row, so its math differs; it is
timed as a speed reference only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from machine import machine_info, output_path

H100_BW = 3.35e12  # bytes/s
H100_BF16 = 989e12  # FLOP/s dense


def _skip(msg: str) -> None:
    print(f"benchmarks/cuda.py: {msg}; nothing to measure (this benchmark needs a CUDA GPU).")
    sys.exit(0)


def _time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


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


def _impls(op: str, b: int):
    from ttt_core import ttt_linear, ttt_mlp

    if op == "mlp":
        impls = {
            "ttt-cuda": lambda *a: ttt_mlp(*a, mini_batch_size=b, backend="cuda")[0],
            "torch-eager": lambda *a: ttt_mlp(*a, mini_batch_size=b, backend="torch")[0],
        }
        impls["torch-compile"] = torch.compile(impls["torch-eager"])
        return impls
    impls = {
        "ttt-cuda": lambda *a: ttt_linear(*a, mini_batch_size=b, backend="cuda")[0],
        "torch-eager": lambda *a: ttt_linear(*a, mini_batch_size=b, backend="torch")[0],
    }
    eager = impls["torch-eager"]
    impls["torch-compile"] = torch.compile(eager)
    try:
        from fla.ops.ttt import chunk_ttt_linear  # type: ignore[import-not-found]

        def fla(q, k, v, eta, W1, b1, lnw, lnb):
            # fla layout [B, L, H, D]; eta per token -> its per-row learning rate (math differs)
            out = chunk_ttt_linear(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lnw, lnb,
                W1.unsqueeze(0).expand(q.shape[0], -1, -1, -1).contiguous(),
                b1.unsqueeze(0).expand(q.shape[0], -1, -1, -1).contiguous(),
                eta=eta.transpose(1, 2).unsqueeze(-1), chunk_size=b, head_first=False,
            )  # fmt: skip
            return out[0].transpose(1, 2)

        impls["fla-chunk_ttt_linear"] = fla
    except Exception as err:  # not installed, or an API that moved
        print(f"flash-linear-attention not timed: {err}")
    return impls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L=2048 only, 3 iterations")
    ap.add_argument("--lengths", type=int, nargs="*", default=[2048, 8192, 32768])
    ap.add_argument("--ops", nargs="*", default=["linear", "mlp"], choices=["linear", "mlp"])
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default results/cuda_<device>.json)"
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        _skip("no CUDA device (torch.cuda.is_available() is False)")
    import ttt_cuda

    if not ttt_cuda.built_with_cuda():
        _skip("ttt-cuda was built without nvcc (reinstall with TTT_ENABLE_CUDA=ON)")
    from tqdm import tqdm

    B, H, D, b, dtype = 8, 12, 64, 16, torch.bfloat16
    lengths = [2048] if args.quick else args.lengths
    iters, warmup = (3, 1) if args.quick else (10, 3)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    rows = []
    for op, L in tqdm([(op, L) for op in args.ops for L in lengths], desc="op x length"):
        x = _inputs(op, B, H, L, D, dtype, dev)
        flops_fwd, bytes_fwd, bytes_bwd = _cost(op, B, H, L, D, b, x[0].element_size())
        for impl_name, fn in _impls(op, b).items():
            row = {"op": op, "L": L, "impl": impl_name}
            try:
                with torch.no_grad():
                    row["fwd_ms"] = _time_ms(lambda fn=fn, x=x: fn(*x), iters, warmup)
                xg = [t.clone().requires_grad_() for t in x]

                def fwd_bwd(fn=fn, xg=xg):
                    fn(*xg).float().sum().backward()

                row["fwd_bwd_ms"] = _time_ms(fwd_bwd, iters, warmup)
                for key, flops, nbytes in (
                    ("fwd", flops_fwd, bytes_fwd),
                    ("fwd_bwd", 4 * flops_fwd, bytes_bwd),
                ):
                    s = row[f"{key}_ms"] / 1e3
                    row[f"{key}_TFLOPs"] = flops / s / 1e12
                    row[f"{key}_GBs"] = nbytes / s / 1e9
                    row[f"{key}_pct_peak_flops"] = 100 * flops / s / H100_BF16
                    row[f"{key}_pct_peak_bw"] = 100 * nbytes / s / H100_BW
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as err:  # record and go on: one failing impl must not hide the others
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row))
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
        "peaks": {"bytes_per_s": H100_BW, "bf16_flops": H100_BF16},
        "results": rows,
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
