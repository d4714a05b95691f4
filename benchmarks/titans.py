"""ttt-titans CPU benchmark: seconds per training epoch per mode, and the memory workload vs
titans-pytorch's NeuralMemory, in one process.

1. Epoch time: ``baseline``, ``simple_ttt`` and ``meta_ttt`` forecasters (same data: the embedded
   Beijing PM2.5 set at its default size, same Titans backbone, same batches) train for ``--epochs`` timed
   epochs each (modes interleaved, one untimed warm-up epoch); median seconds per epoch and the
   ratio to the baseline. ``--backend`` (config ``memory.backend``, one or several: the memory
   modes run once per backend, all interleaved in one process; the baseline has no memory).
2. Memory workload: one forward + backward of a Titans neural memory on x (B, L, C) with an MLP
   memory (depth 2, expansion 4) or a linear one, ``heads`` heads, momentum and forgetting, chunk
   size ``chunk``, fp32:
   ``ttt_titans.NeuralMemory`` (ttt-core's chunk-parallel Titans form, rates from a MetaLearner)
   vs ``titans_pytorch.NeuralMemory`` (``pip install titans-pytorch``) in three configurations:
   its default (``chunk_size=chunk``: one surprise and one weight set per chunk, every surprise at
   the weights the call started from); ``batch_size=chunk`` as well (weights committed after every
   chunk, so each chunk's surprise is at that chunk's start weights, still one weight set per
   chunk); and ``chunk_size=1, batch_size=chunk``, which computes ttt-titans' rule (a surprise and a
   weight set per token, every surprise in a chunk at the chunk's start weights). One warm-up call
   each, then rounds that time each side once, in alternating order (a busy machine's load falls
   on both alike); medians. The first two are timed with ours over ``--repeats`` rounds, the
   same-rule one (about 0.2-2 s a call) with ours over ``--slow-repeats`` rounds.

Run (about 1-2 minutes on one core)::

    python benchmarks/titans.py                 # full run -> benchmarks/results/titans_cpu.json
    python benchmarks/titans.py --quick         # seconds, for checking the script
    python benchmarks/titans.py --epochs-only --backend torch cpp \
        --out benchmarks/results/titans_cpu_backends.json   # epochs, the memory on both backends

The memory workload runs every row, linear and MLP memory, on the first ``--backend`` (key
``ttt_titans``) and on each further one (``ttt_titans_<backend>``) in the same rounds.

``torch.set_num_threads(1)`` is used for stable figures (``--threads`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import machine_info, output_path

ROOT = Path(__file__).resolve().parent


def _git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def bench_epochs(epochs: int, max_batches: int | None, max_rows: int, backends: list[str]) -> dict:
    """Seconds per epoch of each mode; the memory modes once per ``memory.backend`` in
    ``backends`` (keys ``mode`` for one backend, ``mode[backend]`` for several)."""
    from ttt_titans.config import load_config
    from ttt_titans.train import Runner, build_splits

    over = [f"data.max_rows={max_rows}", "threads=0"]
    if max_batches is not None:
        over.append(f"train.max_batches_per_epoch={max_batches}")
    base = load_config("base.yaml", over)
    splits = build_splits(base)
    runners = {
        "baseline": Runner(load_config("base.yaml", [*over, "mode=baseline"]), splits, False)
    }
    for backend in backends:
        for mode in ("simple_ttt", "meta_ttt"):
            key = mode if len(backends) == 1 else f"{mode}[{backend}]"
            cfg = load_config("base.yaml", [*over, f"mode={mode}", f"memory.backend={backend}"])
            runners[key] = Runner(cfg, splits, False)
    for r in runners.values():  # warm-up epoch, untimed
        r.train_epoch()
        r.history.epoch_seconds.clear()
    cpu: dict[str, list[float]] = {key: [] for key in runners}  # process CPU seconds per epoch
    for _ in range(epochs):
        for key, r in runners.items():
            r.epoch += 1
            t = time.process_time()
            r.train_epoch()
            cpu[key].append(time.process_time() - t)
    out = {}
    base_all = runners["baseline"].history.epoch_seconds
    base_s, base_cpu = statistics.median(base_all), statistics.median(cpu["baseline"])
    for key, r in runners.items():
        s = statistics.median(r.history.epoch_seconds)
        per_round = [t / b for t, b in zip(r.history.epoch_seconds, base_all, strict=True)]
        out[key] = {
            "mode": r.cfg.mode,
            "memory_backend": None if r.cfg.mode == "baseline" else r.cfg.memory.backend,
            "seconds_per_epoch": s,
            "all_epoch_seconds": r.history.epoch_seconds,
            "ratio_to_baseline": s / base_s,
            "median_ratio_to_baseline_per_round": statistics.median(per_round),
            "cpu_seconds_per_epoch": statistics.median(cpu[key]),
            "all_epoch_cpu_seconds": cpu[key],
            "cpu_ratio_to_baseline": statistics.median(cpu[key]) / base_cpu,
            "batches_per_epoch": min(
                -(-len(r.train_ds) // r.cfg.train.batch_size),
                max_batches or 10**9,
            ),
            "batch_size": r.cfg.train.batch_size,
            "lookback": r.cfg.data.lookback,
            "backbone": r.cfg.model.backbone,
            "memory_chunk": r.cfg.memory.chunk,
        }
    return out


def time_rounds(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function in each round: one warm-up call each, then ``repeats``
    rounds that call every function once, the order alternating between rounds."""
    for fn in fns.values():
        fn()  # warm-up
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        for name in list(fns)[:: 1 if i % 2 == 0 else -1]:
            t = time.perf_counter()
            fns[name]()
            ts[name].append(time.perf_counter() - t)
    return ts


def _time_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function over :func:`time_rounds`."""
    return {name: statistics.median(v) for name, v in time_rounds(fns, repeats).items()}


def bench_memory(
    shapes: list[tuple[int, int, int, int, int, str]], repeats: int, slow_repeats: int,
    backends: list[str],
) -> list[dict]:  # fmt: skip
    """The memory workload per shape: ours on ``backends[0]`` (key ``ttt_titans``) and on each
    further backend (``ttt_titans_<backend>``) timed with titans-pytorch in the same rounds."""
    from ttt_titans.config import MemoryConfig, MetaConfig
    from ttt_titans.memory import NeuralMemory
    from ttt_titans.meta import MetaLearner

    try:
        import titans_pytorch
        from titans_pytorch import MemoryMLP
        from titans_pytorch import NeuralMemory as TPNeuralMemory
    except ImportError:
        titans_pytorch = None
    rows = []
    for b, n, c, h, chunk, inner in shapes:
        torch.manual_seed(0)
        x = torch.randn(b, n, c)
        mem_backend = backends[0]
        ours_by_backend = {}
        for be in backends:
            torch.manual_seed(1)  # the same weights on every backend
            cfg = MemoryConfig(inner=inner, num_heads=h, chunk=chunk, mlp_ratio=4, backend=be)
            mem = NeuralMemory(c, cfg)
            meta = MetaLearner(c, h, MetaConfig(hidden=c))

            def ours(meta=meta, mem=mem, x=x):
                th, et, al = meta(x)
                out, _ = mem(x, th, et, al)
                out.sum().backward()

            ours_by_backend[be] = ours
        ours = ours_by_backend[mem_backend]

        row = {
            "B": b,
            "L": n,
            "C": c,
            "heads": h,
            "head_dim": c // h,
            "chunk": chunk,
            "memory_backend": mem_backend,
            "memory_model": (
                "MLP depth 2, hidden 4*head_dim" if inner == "mlp" else "linear (one matrix)"
            ),
        }
        fns = {"ttt_titans": ours}
        fns.update((f"ttt_titans_{be}", fn) for be, fn in list(ours_by_backend.items())[1:])
        slow = {"ttt_titans": ours}
        if titans_pytorch is not None:
            for group, key, extra in (
                (fns, "titans_pytorch", {}),
                (fns, "titans_pytorch_chunk_start", {"batch_size": chunk}),
                (slow, "titans_pytorch_same_rule", {"chunk_size": 1, "batch_size": chunk}),
            ):
                # linear: titans-pytorch's MemoryMLP with depth 1 is one (D, D) matrix
                model = None if inner == "mlp" else MemoryMLP(c // h, depth=1)
                kw = {"chunk_size": chunk, "heads": h, "dim_head": c // h, "model": model, **extra}
                tp = TPNeuralMemory(dim=c, **kw)

                def theirs(tp=tp, x=x):
                    out, _ = tp(x)
                    out.sum().backward()

                group[key] = theirs
        load = os.getloadavg()[0]
        for key, sec in _time_interleaved(fns, repeats).items():
            row[f"{key}_ms"] = 1e3 * sec
        if titans_pytorch is not None:
            ms = _time_interleaved(slow, slow_repeats)
            row["titans_pytorch_same_rule_ms"] = 1e3 * ms["titans_pytorch_same_rule"]
            row["ttt_titans_ms_beside_same_rule"] = 1e3 * ms["ttt_titans"]
            for key in ("titans_pytorch", "titans_pytorch_chunk_start"):
                row[f"speedup_vs_{key}"] = row[f"{key}_ms"] / row["ttt_titans_ms"]
                for be in backends[1:]:
                    row[f"{be}_speedup_vs_{key}"] = row[f"{key}_ms"] / row[f"ttt_titans_{be}_ms"]
            row["speedup_vs_titans_pytorch_same_rule"] = (
                row["titans_pytorch_same_rule_ms"] / row["ttt_titans_ms_beside_same_rule"]
            )
        row["load_average_1min"] = [load, os.getloadavg()[0]]  # before, after
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, to check the script")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--slow-repeats", type=int, default=3, help="rounds beside the same rule")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", nargs="+", default=["auto"],
                   choices=("auto", "torch", "generic", "cpp", "cuda"),
                   help="memory.backend (several: the memory modes run once per backend, "
                   "interleaved; the memory workload times ours on each in the same rounds, the "
                   "first as ttt_titans)")  # fmt: skip
    p.add_argument("--epochs-only", action="store_true", help="skip the memory workload")
    p.add_argument("--memory-only", action="store_true", help="skip the training epochs")
    p.add_argument("--out", default=None, help="JSON path (default: see output_path)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        epochs, max_batches, max_rows, repeats, slow = 1, 4, 3000, 2, 1
        shapes = [(16, 48, 32, 2, 16, "mlp"), (16, 48, 32, 2, 16, "linear")]
    else:
        # max_rows 17520: base.yaml default
        epochs, max_batches, max_rows, repeats = a.epochs, None, 17520, a.repeats
        slow = a.slow_repeats
        shapes = [
            (64, 48, 32, 2, 16, "linear"),  # the forecaster's default memory workload
            (64, 48, 32, 2, 16, "mlp"),
            (64, 48, 32, 2, 8, "mlp"),
            (8, 256, 64, 4, 16, "mlp"),
            (8, 256, 64, 4, 64, "mlp"),
        ]
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    epochs_res = {} if a.memory_only else bench_epochs(epochs, max_batches, max_rows, a.backend)
    for key, r in epochs_res.items():
        print(
            f"{key:>17}: {r['seconds_per_epoch']:.3f} s/epoch ({r['ratio_to_baseline']:.2f}x), "
            f"CPU {r['cpu_seconds_per_epoch']:.3f} s ({r['cpu_ratio_to_baseline']:.2f}x)"
        )
    mem_res = [] if a.epochs_only else bench_memory(shapes, repeats, slow, a.backend)
    try:
        import titans_pytorch

        tp_version = getattr(titans_pytorch, "__version__", None)
        if tp_version is None:
            from importlib.metadata import version

            tp_version = version("titans-pytorch")
    except ImportError:
        tp_version = None
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": a.quick,
        "memory_backends": a.backend,
        "machine": machine_info(titans_pytorch=tp_version, git=_git_rev()),
        "epoch_time": epochs_res,
        "memory_workload": mem_res,
        "load_average": {"start": load_start, "end": (load_end := os.getloadavg())},
        "busy_machine": max(load_start[0], load_end[0]) > (os.cpu_count() or 1),
        "notes": (
            "Same shapes; titans-pytorch in three configurations. ttt_titans takes each "
            "token's surprise at its own chunk's start weights (chunks are sequential, exact "
            "per-step at chunk 1) and gives every token its own weights (per-token momentum and "
            "forgetting). titans_pytorch (default, chunk_size=chunk) takes one surprise per chunk, "
            "all at the weights the call started from, with per-chunk averaged momentum/decay, "
            "scans them over chunks (fully parallel over the sequence) and retrieves with one "
            "weight set per chunk: a coarser, cheaper rule. titans_pytorch_chunk_start "
            "(batch_size=chunk) commits its weights after every chunk, so each chunk's surprise "
            "is at that chunk's start weights, still one weight set per chunk. "
            "titans_pytorch_same_rule (chunk_size=1, batch_size=chunk) computes the ttt_titans "
            "rule: a surprise and a weight set per token, committed after every chunk; it is "
            "timed beside ttt_titans over fewer rounds (ttt_titans_ms_beside_same_rule). "
            "Memory workload: ours and theirs timed in alternating rounds after one warm-up "
            "call each; medians; with several backends, ours on each further backend in the "
            "same rounds (ttt_titans_<backend>_ms, <backend>_speedup_vs_*). Epoch times: one untimed warm-up epoch per mode, median of the "
            "timed epochs, modes interleaved (and memory backends, when several: the keys "
            "mode[backend]); median_ratio_to_baseline_per_round is the median over the rounds "
            "of each epoch's time over the baseline's epoch of the same round; cpu_*: the "
            "process CPU time of each epoch (time.process_time, one torch thread: steadier than "
            "wall time when other processes share the cores). load_average: os.getloadavg() (the machine has "
            f"{os.cpu_count()} CPUs and is shared; a 1-minute load above that means other "
            "processes competed for the cores during the run)."
        ),
        "total_seconds": time.perf_counter() - t0,
    }
    out = output_path(a.out, a.quick, "titans_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
