"""Moshi layer with vs without TTT on CPU: streaming step latency and training throughput.

For each width (dim 1024 / 16 heads, and the 7B layer's dim 4096 / 32 heads) one Moshi
`StreamingTransformerLayer` with the 7B recipe (rope, RMSNorm f32, SiLU gating, hidden 4.125 x dim,
local attention window) is timed side by side with the same layer converted by ttt-moshi
(attention -> TTT-Linear, mini-batch 16, tanh(alpha) gate -> feed-forward):

- streaming: batch 1, one token per call inside ``layer.streaming(1)`` (a KV ring cache for the
  attention, the fast weights + partial mini-batch for TTT), median ms per step over 160 steps
  (dim 1024) or 64 (dim 4096), and the median ratio of neighbouring steps (each TTT variant steps in
  strict alternation with the plain layer, one pair at a time: see `stream_step_ms`);
- training: one full sequence [1, T, C], forward + backward, tokens per second.

Variants: ``moshi`` (plain layer, window 100) and the TTT layer (window 50) per TTT width and
ttt-core backend, all with the attention's head dim: ``moshi+ttt-full/<backend>`` (TTT heads =
attention heads, inner width = dim), ``-half`` (heads / 2) and ``-quarter`` (heads / 4, ttt-moshi's
default width); backends ``auto`` (ttt-core's default, what a user gets: ``cpp`` where ttt-cuda is
installed, else ``torch``), ``torch`` (ttt-core's recurrent step) and ``cpp`` (ttt-cuda: under
no_grad the layer's whole token is one C++ call, projections and gate included; needs ttt-cuda). ``--widths`` (default ``quarter``) and ``--backends``
(default ``auto,torch,cpp``) choose them; ``--dims 1024`` or ``--dims 4096`` one width only, and
``--skip-train`` the streaming step only (the dim-4096 layers take ~1.1 GB each, and their
training gradients as much again).

Run: ``python benchmarks/moshi.py`` (full, ~1-3 min on 2 cores) or ``--quick`` (dim 256, seconds).
On a shared machine add ``--threads 1``: with 2 OpenMP threads and other processes on the cores, the
many small ops of a single-token step wait on descheduled threads and the timings become noise.
Writes ``benchmarks/results/moshi_cpu.json`` (machine, torch, threads and the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from machine import machine_info, output_path  # before the folder leaves sys.path (below)

# This file is named like the `moshi` package: keep its folder off sys.path so that `import moshi`
# finds the package, not this script.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import torch  # noqa: E402
from moshi.modules.rope import RotaryEmbedding  # noqa: E402
from moshi.modules.transformer import StreamingTransformerLayer  # noqa: E402
from moshi.utils.compile import no_compile  # noqa: E402

from ttt_core import TTTConfig, available_backends  # noqa: E402
from ttt_moshi import convert_layer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "moshi_cpu.json"


WIDTHS = {"full": 1, "half": 2, "quarter": 4}  # TTT heads = attention heads / this


def make_layer(dim: int, heads: int, variant: str) -> torch.nn.Module:
    """``moshi`` or ``moshi+ttt-<width>/<backend>``."""
    torch.manual_seed(0)
    context = 100 if variant == "moshi" else 50
    layer = StreamingTransformerLayer(
        d_model=dim, num_heads=heads, dim_feedforward=int(4.125 * dim), causal=True,
        context=context, rope=RotaryEmbedding(interleave=True, max_period=10000),
        norm="rms_norm_f32",
        layer_scale=None, gating="silu",
    )  # fmt: skip
    if variant != "moshi":
        # TTT width as a fraction of dim: fewer TTT heads of the attention's head dim
        width, backend = variant.removeprefix("moshi+ttt-").split("/")
        cfg = TTTConfig(hidden_size=dim, num_heads=heads // WIDTHS[width], head_dim=dim // heads,
                        inner="linear", mini_batch_size=16, gate="tanh_alpha", gate_init=0.1,
                        backend=backend)  # fmt: skip
        convert_layer(layer, cfg)
    return layer


@torch.no_grad()
def stream_step_ms(
    layers: dict[str, torch.nn.Module], dim: int, warmup: int, steps: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall time (ms) of each streaming step (batch 1, one token): for each TTT variant, the plain
    layer's steps and the variant's, taken in strict alternation (plain, TTT, plain, TTT, ...).

    Each pair of layers steps alone, on the same inputs, so every step reads its layer's weights
    cache-cold right after the other layer's step, and a load change on a shared machine hits both
    alike. (One round robin over all variants, even with the first one rotating, was biased by
    position: the variant listed right after the plain layer followed that layer in three turns of
    four and came out ~10 points slower whichever backend it ran, ``auto``, ``torch`` or ``cpp``.)

    Returns:
        ``{variant: (plain layer's step times, variant's step times)}``, ``steps`` each.
    """
    x = torch.randn(1, warmup + steps, dim)
    base = layers["moshi"]
    pairs = {}
    for name, layer in layers.items():
        if name == "moshi":
            continue
        times: tuple[list[float], list[float]] = ([], [])
        for each in (base, layer):
            each.eval()
            each.streaming_forever(1)
        for t in range(warmup + steps):
            for each, record in zip((base, layer), times):
                t0 = time.perf_counter()
                each(x[:, t : t + 1])
                if t >= warmup:
                    record.append(1e3 * (time.perf_counter() - t0))
        for each in (base, layer):
            each._stop_streaming()
        pairs[name] = times
    return pairs


def train_ms(
    layers: dict[str, torch.nn.Module], dim: int, seq_len: int, reps: int
) -> dict[str, float]:
    """Forward + backward of one sequence [1, T, C]: best ms per iteration, per variant."""
    x = torch.randn(1, seq_len, dim)
    best = dict.fromkeys(layers, float("inf"))
    for layer in layers.values():  # warm-up on a short sequence
        layer.train()
        layer(x[:, :16]).square().mean().backward()
    for _ in range(reps):
        for name, layer in layers.items():
            layer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            layer(x).square().mean().backward()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="dim 256 only, few steps (pipeline check)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: see output_path)")
    p.add_argument("--widths", default="quarter", help="TTT widths: full,half,quarter")
    p.add_argument("--backends", default="auto,torch,cpp",
                   help="ttt-core backends of the TTT block (auto: what a user gets)")  # fmt: skip
    p.add_argument("--dims", default="1024,4096", help="layer widths (full run)")
    p.add_argument("--skip-train", action="store_true", help="the streaming step only")
    args = p.parse_args()
    args.out = output_path(args.out, args.quick, RESULTS.name)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        sizes = [(256, 4, 64, 2, 16)]  # (dim, heads, train seq_len, reps, stream steps)
        warmup = 4
    else:
        dims = [int(d) for d in args.dims.split(",")]
        sizes = [s for s in [(1024, 16, 256, 3, 160), (4096, 32, 128, 1, 64)] if s[0] in dims]
        warmup = 16
    backends = [b for b in args.backends.split(",") if b in ("auto", *available_backends())]
    if len(backends) < len(args.backends.split(",")):
        print(f"backends not installed, left out: {set(args.backends.split(',')) - set(backends)}")
    variants = ["moshi"] + [f"moshi+ttt-{w}/{b}" for w in args.widths.split(",")
                            for b in backends]  # fmt: skip
    rows = []
    all_steps: dict[int, dict[str, tuple[list[float], list[float]]]] = {}
    t_start = time.perf_counter()
    with no_compile():
        for dim, heads, seq_len, reps, steps in sizes:
            layers = {v: make_layer(dim, heads, v) for v in variants}
            pairs = stream_step_ms(layers, dim, warmup, steps)
            all_steps[dim] = pairs
            # the plain layer's row: its steps of every pair together
            step_times = {"moshi": [t for plain, _ in pairs.values() for t in plain]}
            step_times.update((name, ttt) for name, (_, ttt) in pairs.items())
            iter_ms = None if args.skip_train else train_ms(layers, dim, seq_len, reps)
            for variant, layer in layers.items():
                st = step_times[variant]
                row = {
                    "dim": dim, "heads": heads, "variant": variant,
                    "params": sum(p.numel() for p in layer.parameters()),
                    "attention_context": layer.self_attn.context,
                    "stream_step_ms_median": round(statistics.median(st), 3),
                    "stream_step_ms_min": round(min(st), 3), "stream_steps": len(st),
                }  # fmt: skip
                if iter_ms is not None:
                    row.update(train_seq_len=seq_len, train_ms_per_iter=round(iter_ms[variant], 1),
                               train_tokens_per_s=round(1e3 * seq_len / iter_ms[variant], 1))  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            del layers
    overhead = {}
    for dim, *_ in sizes:
        base = next(r for r in rows if r["dim"] == dim and r["variant"] == "moshi")
        for r in rows:
            if r["dim"] == dim and r["variant"] != "moshi":
                plain, ttt = all_steps[dim][r["variant"]]  # the pair's steps, in alternation
                overhead[f"{dim}/{r['variant']}"] = {
                    "stream_step_added_pct_median": round(
                        100 * (statistics.median(ttt) / statistics.median(plain) - 1), 1),
                    "stream_step_added_pct_min": round(100 * (min(ttt) / min(plain) - 1), 1),
                    # the ratio of neighbouring steps (TTT step / the plain step before it)
                    "stream_step_added_pct_median_of_ratios": round(
                        100 * (statistics.median(a / b for a, b in zip(ttt, plain)) - 1), 1),
                }  # fmt: skip
                if "train_tokens_per_s" in r:
                    overhead[f"{dim}/{r['variant']}"]["train_throughput_ratio"] = round(
                        r["train_tokens_per_s"] / base["train_tokens_per_s"], 3)  # fmt: skip
    out = {
        "benchmark": "ttt-moshi layer: streaming step latency and training throughput (CPU)",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "quick": args.quick,
        "machine": machine_info(),
        "target": "TTT (default quarter block, dim 1024) adds at most 8% to a streaming step (issue 16)",
        # what backend="auto" (ttt-core's default) runs on CPU tensors here
        "auto_on_cpu": "cpp" if "cpp" in available_backends() else "torch",
        "results": rows,
        "overhead_vs_moshi": overhead,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, args.out)
    print(json.dumps(overhead, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
