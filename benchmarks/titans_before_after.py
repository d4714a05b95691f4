"""ttt-titans' memory workload on another ttt-core source tree (before) and on this checkout
(after), beside titans-pytorch's default, interleaved in one process.

The workload is ``benchmarks/titans.py``'s: one forward + backward of ``ttt_titans.NeuralMemory``
(rates from a ``MetaLearner``) on x (B, L, C), fp32, at the same shapes. The same module (same
weights, same input) runs its Titans form through the ``ttt_mlp`` / ``ttt_linear`` of each tree in
turn, so only ttt-core's code differs; ``titans_pytorch.NeuralMemory`` at its default
(``chunk_size=chunk``) runs in the same rounds when installed. One warm-up call each, then
``--repeats`` rounds that call every variant once, the order alternating; the JSON gives each
variant's median ms and the medians, over rounds, of the ratios before/after and
titans_pytorch/after (a busy machine's load falls on the variants of one round alike). The outputs
and input gradients of the two trees are compared once per shape.

Run (1 thread)::

    git archive b4ac81b packages/ttt-core/src | tar -x -C /tmp/before
    python benchmarks/titans_before_after.py --before /tmp/before/packages/ttt-core/src \\
        --label b4ac81b            # -> benchmarks/results/titans_cpu_before_after.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from core_step import NOW, load_ttt_core
from machine import machine_info, output_path, write_json
from titans import time_rounds

SHAPES = [  # (B, L, C, heads, chunk, inner): benchmarks/titans.py's memory workload
    (64, 48, 32, 2, 16, "linear"),
    (64, 48, 32, 2, 16, "mlp"),
    (64, 48, 32, 2, 8, "mlp"),
    (8, 256, 64, 4, 16, "mlp"),
    (8, 256, 64, 4, 64, "mlp"),
]


def make_call(memory_module, tc, mem, meta, x):
    """One forward + backward of ``mem`` with its Titans form from the ttt_core package ``tc``;
    returns (output, grad of x)."""

    def call():
        memory_module.ttt_linear, memory_module.ttt_mlp = tc.ttt_linear, tc.ttt_mlp
        xg = x.detach().requires_grad_(True)
        th, et, al = meta(xg)
        out, _ = mem(xg, th, et, al)
        out.sum().backward()
        return out.detach(), xg.grad

    return call


def bench_shape(shape, trees, repeats: int) -> dict:
    from ttt_titans import memory as memory_module
    from ttt_titans.config import MemoryConfig, MetaConfig
    from ttt_titans.meta import MetaLearner

    b, n, c, h, chunk, inner = shape
    torch.manual_seed(0)
    x = torch.randn(b, n, c)
    mem = memory_module.NeuralMemory(c, MemoryConfig(inner=inner, num_heads=h, chunk=chunk,
                                                     mlp_ratio=4))  # fmt: skip
    meta = MetaLearner(c, h, MetaConfig(hidden=c))
    fns = {label: make_call(memory_module, tc, mem, meta, x) for label, tc in trees.items()}
    (o_before, g_before), (o_after, g_after) = (fn() for fn in fns.values())
    agree = {
        "output_max_abs_diff": (o_before - o_after).abs().max().item(),
        "x_grad_max_abs_diff": (g_before - g_after).abs().max().item(),
    }
    try:
        from titans_pytorch import MemoryMLP
        from titans_pytorch import NeuralMemory as TPNeuralMemory

        model = None if inner == "mlp" else MemoryMLP(c // h, depth=1)
        tp = TPNeuralMemory(dim=c, chunk_size=chunk, heads=h, dim_head=c // h, model=model)

        def theirs():
            out, _ = tp(x)
            out.sum().backward()

        fns["titans_pytorch"] = theirs
    except ImportError:
        pass
    ts = time_rounds(fns, repeats)
    before, after = trees
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(ts[a], ts[b]))
    row = {
        "B": b, "L": n, "C": c, "heads": h, "head_dim": c // h, "chunk": chunk,
        "memory_model": "MLP depth 2, hidden 4*head_dim" if inner == "mlp" else "linear",
        **{f"{name}_ms": 1e3 * statistics.median(v) for name, v in ts.items()},
        "speedup_after_vs_before": ratio(before, after),
        **agree,
    }  # fmt: skip
    if "titans_pytorch" in ts:
        row["speedup_before_vs_titans_pytorch"] = ratio("titans_pytorch", before)
        row["speedup_after_vs_titans_pytorch"] = ratio("titans_pytorch", after)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="another tree's ttt-core src dir")
    p.add_argument("--label", default="before", help="the other tree's name in the JSON")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", type=int, default=None, help="run only SHAPES[ONLY]")
    p.add_argument("--quick", action="store_true", help="3 rounds, to check the script")
    p.add_argument("--out", default=None, help="JSON path (default: see output_path)")
    a = p.parse_args()
    if a.label in ("after", "titans_pytorch"):
        p.error(f"--label {a.label!r}: that name is taken by another variant; choose another")
    torch.set_num_threads(a.threads)
    before = load_ttt_core(a.before)
    after = load_ttt_core(NOW)  # ttt_titans (imported below) binds this checkout's ttt_core
    trees = {a.label: before, "after": after}
    shapes = SHAPES if a.only is None else [SHAPES[a.only]]
    t0, load_start = time.perf_counter(), os.getloadavg()
    rows = []
    for shape in shapes:
        rows.append(bench_shape(shape, trees, 3 if a.quick else a.repeats))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "memory_workload": rows,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "notes": "speedup_X_vs_Y: median over rounds of Y's time / X's time in the same round.",
        "total_seconds": time.perf_counter() - t0,
    }
    write_json(output_path(a.out, a.quick, "titans_cpu_before_after.json"), result)


if __name__ == "__main__":
    main()
