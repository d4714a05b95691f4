"""Benchmark: the pi0.5 action expert (gemma_300m) with and without TTT in all 18 layers, on CPU.

Measures the training step (flow-matching loss forward + backward + AdamW step) and 10-step Euler
sampling of a batch of 2 chunks of 50 actions that attend to prefix keys/values from the
package's stand-in encoder (computed once, outside the timings).

- timings: one model with TTT in every layer; the "without TTT" runs switch its branches off
  (exactly the computation of an expert built with ``use_ttt=False``, same base weights), and the
  two variants alternate rep by rep so both see the same machine load. Best (min) and median.
- memory: for each variant a fresh model; the peak resident memory above the level before
  (Linux VmHWM, reset per phase) of one sampling, and of the first training step (which
  allocates the gradients and the AdamW state).

    python benchmarks/gemma.py            # full run (a few minutes on 2 cores): results/gemma_cpu.json
    python benchmarks/gemma.py --quick    # depth 2, one repetition, for development

On a machine shared with other jobs, ``--threads 1`` gives far steadier numbers (two threads on
two busy cores stall each other).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import machine_info
from tqdm.auto import tqdm

from ttt_gemma import (
    ActionExpertConfig,
    FlowMatchingPolicy,
    PrefixEncoderConfig,
    StandInPrefixEncoder,
)


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux); NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS deltas are tight."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _timed(fn, warmup: int, reps: int, desc: str) -> tuple[list[float], float]:
    """Run fn warmup + reps times; return the timed durations and the peak RSS increase (MiB)
    over the level before the first call (so a training step's peak includes the gradients and
    the AdamW state that the first step allocates, and the activations)."""
    _trim()
    base = _rss_mb("VmRSS")
    _reset_peak()
    for _ in range(warmup):
        fn()
    times = []
    for _ in tqdm(range(reps), desc=desc, leave=False):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, _rss_mb("VmHWM") - base


def make_steps(policy: FlowMatchingPolicy, prefix, actions, noise):
    """The two timed operations: an AdamW training step and a 10-step Euler sampling."""
    # fused AdamW (CPU support since torch 2.4): the for-loop version costs ~12 ns per parameter
    # here, which would make the step time mostly optimiser; its state is allocated by step 1
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=True)
    t = torch.full((actions.shape[0],), 0.5)

    def train_step():
        loss = policy.loss(actions, prefix, noise=noise, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # parameters without a gradient (skipped TTT branches) are skipped

    def sample():
        with torch.no_grad():
            policy.sample(prefix, noise=noise, num_steps=10)

    return train_step, sample


@contextlib.contextmanager
def ttt_off(policy: FlowMatchingPolicy):
    """Skip every TTT branch: the same computation as an expert built with use_ttt=False."""
    saved = [(layer, layer.ttt) for layer in policy.expert.layers]
    try:
        for layer, _ in saved:
            layer.ttt = None
        yield
    finally:
        for layer, branch in saved:
            layer.ttt = branch


def memory_phase(cfg, prefix, actions, noise) -> dict:
    """Peak RSS increase of one sampling (bare model) and of the first training step (gradients +
    AdamW state + activations) for a freshly built model of this config."""
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(cfg)
    train_step, sample = make_steps(policy, prefix, actions, noise)
    label = "ttt" if cfg.use_ttt else "base"
    _, sample_mem = _timed(sample, 0, 1, f"memory {label} sample")
    _, train_mem = _timed(train_step, 0, 1, f"memory {label} train")
    n_params = sum(p.numel() for p in policy.parameters())
    return {
        "use_ttt": cfg.use_ttt,
        "ttt_layers": list(cfg.ttt_layers()),
        "parameters": n_params,
        "ttt_parameters": sum(p.numel() for n, p in policy.named_parameters() if ".ttt." in n),
        "param_mib": n_params * 4 / 2**20,
        "sample_peak_rss_increase_mib": sample_mem,
        "train_peak_rss_increase_mib": train_mem,
    }


def timing_phase(ttt_cfg, prefix, actions, noise, args) -> dict:
    """Interleaved timings on one model with TTT in every layer, its branches switched off for
    the base runs (same base weights), so both variants see the same machine load."""
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(ttt_cfg)
    train_step, sample = make_steps(policy, prefix, actions, noise)
    variants = {
        "without_ttt": lambda: ttt_off(policy),
        "with_ttt_all_layers": contextlib.nullcontext,
    }
    times = {name: {"train": [], "sample": []} for name in variants}
    for _ in range(args.warmup):
        for ctx in variants.values():
            with ctx():
                train_step()
    for what, fn, reps in (("train", train_step, args.reps), ("sample", sample, args.sample_reps)):
        for _ in tqdm(range(reps), desc=f"timing {what} (both variants)", leave=False):
            for name, ctx in variants.items():
                with ctx():
                    t0 = time.perf_counter()
                    fn()
                    times[name][what].append(time.perf_counter() - t0)
    return {
        name: {
            "train_step_s_min": min(t["train"]),
            "train_step_s_median": statistics.median(t["train"]),
            "train_step_s_all": t["train"],
            "sample_10_steps_s_min": min(t["sample"]),
            "sample_10_steps_s_median": statistics.median(t["sample"]),
            "sample_10_steps_s_all": t["sample"],
        }
        for name, t in times.items()
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="depth 2, one repetition (development)")
    p.add_argument("--depth", type=int, default=18, help="expert layers (gemma_300m: 18)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--horizon", type=int, default=50)
    p.add_argument(
        "--prefix-len", type=int, default=816, help="prefix tokens (pi0.5: 3 x 256 image + text)"
    )
    p.add_argument("--reps", type=int, default=3, help="timed training steps per variant")
    p.add_argument("--sample-reps", type=int, default=2, help="timed 10-step samplings")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gemma_cpu.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.sample_reps = 1, 1
    depth = 2 if args.quick else args.depth
    base_cfg = ActionExpertConfig.gemma_300m(depth=depth, action_horizon=args.horizon)
    ttt_cfg = base_cfg.replace(use_ttt=True)  # TTT in all layers, linear, dual form, AdaRMS gate

    torch.manual_seed(0)
    encoder = StandInPrefixEncoder(
        PrefixEncoderConfig.for_expert(base_cfg, feature_dim=32, width=256, mlp_dim=512)
    )
    with torch.no_grad():
        prefix = encoder(torch.randn(args.batch, args.prefix_len, 32)).detach()
    del encoder
    actions = torch.randn(args.batch, args.horizon, base_cfg.action_dim)
    noise = torch.randn_like(actions)

    t0 = time.perf_counter()
    results = {}
    for name, cfg in (("without_ttt", base_cfg), ("with_ttt_all_layers", ttt_cfg)):
        results[name] = memory_phase(cfg, prefix, actions, noise)
        _trim()  # the variant's model and optimiser are gone before the next one
    for name, timings in timing_phase(ttt_cfg, prefix, actions, noise, args).items():
        results[name].update(timings)
    b, w = results["without_ttt"], results["with_ttt_all_layers"]
    summary = {
        "benchmark": "ttt-gemma: pi0.5 action expert, flow-matching train step and 10-step sampling",
        "config": {
            "preset": "gemma_300m" if depth == 18 else f"gemma_300m sizes, depth {depth}",
            "width": base_cfg.width,
            "depth": base_cfg.depth,
            "mlp_dim": base_cfg.mlp_dim,
            "num_heads": base_cfg.num_heads,
            "num_kv_heads": base_cfg.num_kv_heads,
            "head_dim": base_cfg.head_dim,
            "batch": args.batch,
            "horizon": args.horizon,
            "action_dim": base_cfg.action_dim,
            "prefix_len": args.prefix_len,
            "ttt": {
                "layer_type": ttt_cfg.ttt.layer_type,
                "num_heads": ttt_cfg.ttt.num_heads or ttt_cfg.num_heads,
                "use_dual_form": ttt_cfg.ttt.use_dual_form,
                "gating": ttt_cfg.ttt.gating,
                "mini_batch_size": None,
                "causal": False,
            },
            "optimizer": "AdamW(fused=True)",
            "reps": args.reps,
            "sample_reps": args.sample_reps,
            "warmup": args.warmup,
        },
        "results": results,
        # overheads from the best time of each (least disturbed by other load), and medians
        "train_step_overhead": w["train_step_s_min"] / b["train_step_s_min"] - 1.0,
        "sample_overhead": w["sample_10_steps_s_min"] / b["sample_10_steps_s_min"] - 1.0,
        "train_step_overhead_median": w["train_step_s_median"] / b["train_step_s_median"] - 1.0,
        "sample_overhead_median": (
            w["sample_10_steps_s_median"] / b["sample_10_steps_s_median"] - 1.0
        ),
        "target": "TTT in all 18 layers adds at most 30% to the training step time",
        "machine": machine_info(),
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
        "wall_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out)
    print(
        f"train step (best): {b['train_step_s_min']:.3f}s -> {w['train_step_s_min']:.3f}s "
        f"({100 * summary['train_step_overhead']:+.1f}%); 10-step sampling: "
        f"{b['sample_10_steps_s_min']:.3f}s -> {w['sample_10_steps_s_min']:.3f}s "
        f"({100 * summary['sample_overhead']:+.1f}%); wrote {out}"
    )
    return summary


if __name__ == "__main__":
    main()
