"""ttt-cuda's fused C++ CPU backend ("cpp") beside ttt-core's torch backend, in one run.

Measured, forward + backward unless stated, 1 thread unless stated, at the issue's shape
B=2, H=4, L=2048, D=64, b=16 (TTT-MLP: F = 4D):

- TTT-Linear, TTT-MLP and TTT-Linear in the Titans form (momentum + decay): torch vs cpp;
- TTT-Linear forward only;
- TTT-Linear with 2 threads vs 1 (cpp: (batch, head) chains over threads);
- the single-token streaming step (TTT-Linear, B=1, H=16, D=64, the Moshi dim-1024 layer's
  shape): ttt-core's torch step vs the cpp step, per token.

Rounds are interleaved (torch, cpp, torch, cpp, ...) and each figure is the median over
``--repeats`` rounds after one warm-up; the machine is shared, so both the wall time and the
process CPU time (which another process's load does not inflate for a 1-thread call) are kept.

FLOPs: the matmul FLOPs of the same call in ttt-core's torch backend, counted by
``torch.utils.flop_counter.FlopCounterMode`` (an independent count of the dual form's work; the
fused path does the same products). Peak: one core's fp32 FLOP/s as reached by a large GEMM
(``torch.mm`` of 2048 x 2048 fp32, 512 x 512 with ``--quick``; 1 thread, best of 5 by process CPU
time; the JSON's ``peak_method`` says what was run), so "fraction of peak" is against what the
machine's BLAS reaches on one core.

Run: ``python benchmarks/cpu_backend.py`` (writes benchmarks/results/cpu_backend.json; ``--quick``
for a smoke run, written under benchmarks/results/quick/).
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
from machine import machine_info, output_path
from torch.utils.flop_counter import FlopCounterMode

from ttt_core import ttt_linear, ttt_linear_step, ttt_mlp


def gemm_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of one fp32 n x n GEMM on one thread, by process CPU time (best of ``reps``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        torch.mm(a, b)
        best = min(best, time.process_time() - t)
    return 2 * n**3 / best


def make(op: str, B: int, H: int, L: int, D: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    x = {n: rnd(B, H, L, D, scale=0.5) for n in ("q", "k", "v")}
    x["eta"] = (torch.rand(B, H, L, generator=g) * 0.1).requires_grad_()
    F = 4 * D if op == "mlp" else D
    x["W1"], x["b1"] = rnd(H, D, F, scale=D**-0.5), rnd(H, 1, F, scale=0.0)
    if op == "mlp":
        x["W2"], x["b2"] = rnd(H, F, D, scale=F**-0.5), rnd(H, 1, D, scale=0.0)
    x["ln_weight"], x["ln_bias"] = rnd(H, D, scale=0.0), rnd(H, D, scale=0.0)
    with torch.no_grad():
        x["ln_weight"].fill_(1.0)
    kw = {}
    if op == "titans":
        kw["momentum"] = torch.rand(B, H, L, generator=g) * 0.9
        kw["decay"] = torch.rand(B, H, L, generator=g) * 0.1
    return {"inputs": x, "kw": kw, "fn": ttt_mlp if op == "mlp" else ttt_linear}


def run_call(case: dict, backend: str, b: int, backward: bool) -> None:
    x = case["inputs"]
    if backward:
        o, _ = case["fn"](*x.values(), mini_batch_size=b, backend=backend, **case["kw"])
        o.square().sum().backward()
        for t in x.values():
            t.grad = None
    else:
        with torch.no_grad():
            case["fn"](*x.values(), mini_batch_size=b, backend=backend, **case["kw"])


def flops(case: dict, b: int, backward: bool) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        run_call(case, "torch", b, backward)
    return counter.get_total_flops()


def timed(fn) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def side_by_side(runs: dict, repeats: int, threads: dict | None = None) -> dict:
    """Interleaved rounds of every entry of ``runs`` (name -> callable); medians in ms, and per
    entry the per-round wall and CPU times (``rounds``) for medians of ratios."""
    times = {n: ([], []) for n in runs}
    for fn in runs.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            if threads is not None:
                torch.set_num_threads(threads[name])
            wall, cpu = timed(fn)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    torch.set_num_threads(1)
    return {
        n: {"wall_ms": 1e3 * statistics.median(w), "cpu_ms": 1e3 * statistics.median(c),
            "rounds": {"wall": w, "cpu": c}}
        for n, (w, c) in times.items()
    }  # fmt: skip


def ratio(r: dict, a: str, b: str, clock: str) -> float:
    """Median over rounds of a's time / b's time (the rounds ran interleaved)."""
    return statistics.median(x / y for x, y in zip(r[a]["rounds"][clock], r[b]["rounds"][clock]))


def drop_rounds(r: dict) -> dict:
    for v in r.values():
        if isinstance(v, dict):
            v.pop("rounds", None)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: see output_path)")
    p.add_argument("--only", nargs="*", default=None, help="run only these (e.g. linear-fwd+bwd)")
    args = p.parse_args()
    args.out = output_path(args.out, args.quick, "cpu_backend.json")
    from ttt_cuda._ext import extension

    torch.set_num_threads(1)
    B, H, L, D, b = (2, 4, 256, 32, 16) if args.quick else (2, 4, 2048, 64, 16)
    repeats = 2 if args.quick else args.repeats
    load_start = os.getloadavg()  # the shared machine's load (1, 5, 15 min), kept in the JSON
    peak_n, peak_reps = (512 if args.quick else 2048), 5
    peak = gemm_peak(peak_n, peak_reps)
    print(f"one-core fp32 GEMM peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    results: dict = {}
    for op, backward in (("linear", True), ("linear", False), ("mlp", True), ("titans", True)):
        case = make(op, B, H, L, D)
        name = f"{op}-{'fwd+bwd' if backward else 'fwd'}"
        if args.only is not None and name not in args.only:
            continue
        n_flops = flops(case, b, backward)
        runs = {
            be: (lambda be=be, case=case, bwd=backward: run_call(case, be, b, bwd))
            for be in ("torch", "cpp")
        }
        r = side_by_side(runs, repeats)
        for be in r:
            r[be]["gflop_per_s_cpu"] = n_flops / (r[be]["cpu_ms"] * 1e-3) / 1e9
            r[be]["fraction_of_peak_cpu"] = n_flops / (r[be]["cpu_ms"] * 1e-3) / peak
        r["speedup_wall"] = ratio(r, "torch", "cpp", "wall")  # medians of per-round ratios
        r["speedup_cpu"] = ratio(r, "torch", "cpp", "cpu")
        r["gflop"] = n_flops / 1e9
        results[name] = drop_rounds(r)
        print(name, json.dumps(r), flush=True)
    if args.only is not None:
        print(json.dumps(results, indent=1))
        return
    # 2 threads vs 1 on the same call (cpp)
    case = make("linear", B, H, L, D)

    def call():
        run_call(case, "cpp", b, True)

    r = side_by_side({"cpp-1thread": call, "cpp-2threads": call}, repeats,
                     threads={"cpp-1thread": 1, "cpp-2threads": 2})  # fmt: skip
    r["speedup_wall"] = ratio(r, "cpp-1thread", "cpp-2threads", "wall")
    results["linear-fwd+bwd-threads"] = drop_rounds(r)
    print("threads", json.dumps(r), flush=True)
    # the single-token step (no grad), per token
    Bs, Hs, Ds = 1, 16, 64
    x = make("linear", Bs, Hs, 1, Ds)["inputs"]
    tok = [x[n].detach() for n in ("q", "k", "v", "eta")]
    wts = [x[n].detach() for n in ("W1", "b1", "ln_weight", "ln_bias")]
    _, st = ttt_linear(*(torch.randn(Bs, Hs, 5, Ds) for _ in range(3)), torch.rand(Bs, Hs, 5) * 0.1,
                       *wts, mini_batch_size=b, backend="torch", output_final_state=True)  # fmt: skip

    def step(be, n=50):
        def f():
            s = st
            with torch.no_grad():
                for _ in range(n):
                    _, s = ttt_linear_step(*tok, *wts, state=s, mini_batch_size=b, backend=be)

        return f

    r = side_by_side({"torch": step("torch"), "cpp": step("cpp")}, repeats)
    for be in ("torch", "cpp"):
        rounds = r[be].pop("rounds")
        r[be] = {k: v / 50 * 1e3 for k, v in r[be].items()}  # per token, us
        r[be]["rounds"] = rounds
        r[be] = {k.replace("_ms", "_us"): v for k, v in r[be].items()}
    r["speedup_wall"] = ratio(r, "torch", "cpp", "wall")
    results[f"linear-step-B{Bs}-H{Hs}-D{Ds}"] = drop_rounds(r)
    print("step", json.dumps(r), flush=True)
    out = {
        "machine": machine_info(
            cpu_uses_avx2=bool(extension().cpu_uses_avx2()),
            load_average_start=load_start,
            load_average_end=os.getloadavg(),
        ),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "shape": {"B": B, "H": H, "L": L, "D": D, "mini_batch_size": b, "mlp_F": 4 * D},
        "peak_gflop_per_s": peak / 1e9,
        "peak_method": f"torch.mm fp32 {peak_n}x{peak_n}, 1 thread, best of {peak_reps} by process"
        " CPU time",
        "flop_method": "torch.utils.flop_counter on ttt-core's torch backend, same call",
        "repeats": repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
