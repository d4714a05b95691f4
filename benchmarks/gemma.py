"""Benchmark: the pi0.5 action expert (gemma_300m) with and without TTT in all 18 layers, on CPU.

Measures the training step (flow-matching loss forward + backward + AdamW step) and 10-step Euler
sampling of a batch of 2 chunks of 50 actions that attend to prefix keys/values from the
package's stand-in encoder (computed once, outside the timings). Three variants, side by side:

- ``without_ttt``: the base expert;
- ``with_ttt_all_layers``: the ``gemma_300m`` preset's TTT branch (8 heads of 64, width 512);
- ``with_ttt_all_layers_full_width``: a full-width branch (8 heads of 128, width 1024); only with
  ``--full-width`` (its branches, gradients and AdamW state add ~3 GB at depth 18).

- timings: one base model; each variant attaches its own TTT branches (or none: exactly the
  computation of an expert built with ``use_ttt=False``, same base weights) and the variants
  alternate rep by rep, in a rotating order, so all see the same machine load. Per rep: wall and
  CPU (process) time, split into forward / backward / optimizer, and the 1-minute load average.
  Overheads: best of each, median of each, and the median of the per-rep ratios.
- memory: for each variant a fresh model; the peak resident memory above the level before
  (Linux VmHWM, reset per phase) of one sampling, and of the first training step (which
  allocates the gradients and the AdamW state).

    python benchmarks/gemma.py --threads 1 --reps 10 --sample-reps 2  # ~10 min on 2 busy cores
    python benchmarks/gemma.py --threads 1 --depth 12                 # peak RSS ~7 GB
    python benchmarks/gemma.py --quick                                # depth 2, one repetition

Memory: the timing phase holds the base expert, every variant's branches, and the gradients and
AdamW state of all of them (16 bytes per parameter): ~10 GB at depth 18 (gemma_300m) with the
preset branch, ~13 GB with ``--full-width``; the peak resident memory is in the JSON.

On a machine shared with other jobs, ``--threads 1`` gives far steadier numbers (two threads on
two busy cores stall each other); the CPU times are less disturbed by other load than the wall
times, and the JSON says whether the machine was busy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
from machine import machine_info, output_path, reset_peak_rss, rss_mib, trim_heap
from tqdm.auto import tqdm

from ttt_core.runfiles import atomic_write_text
from ttt_gemma import (
    ActionExpertConfig,
    FlowMatchingPolicy,
    PrefixEncoderConfig,
    StandInPrefixEncoder,
)


def _timed(fn, warmup: int, reps: int, desc: str) -> tuple[list[float], float]:
    """Run fn warmup + reps times; return the timed durations and the peak RSS increase (MiB)
    over the level before the first call (so a training step's peak includes the gradients and
    the AdamW state that the first step allocates, and the activations)."""
    trim_heap()
    base = rss_mib("VmRSS")
    reset_peak_rss()
    for _ in range(warmup):
        fn()
    times = []
    for _ in tqdm(range(reps), desc=desc, leave=False):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, rss_mib("VmHWM") - base


# the TTT branches timed against the base expert: name -> TTTOptions changes (None: no TTT)
VARIANTS: dict[str, dict | None] = {
    "without_ttt": None,
    "with_ttt_all_layers": {},  # the gemma_300m preset's branch: 8 heads x 64 (width 512)
    "with_ttt_all_layers_full_width": {"layer": {"num_heads": 8, "head_dim": 128}},  # width 1024
}


def variant_config(base_cfg: ActionExpertConfig, changes: dict | None) -> ActionExpertConfig:
    """The expert config of one variant: TTT in all layers with these TTTOptions changes."""
    return base_cfg if changes is None else base_cfg.replace(use_ttt=True, ttt=changes)


def make_steps(policy: FlowMatchingPolicy, prefix, actions, noise, params=None):
    """The two timed operations: an AdamW training step and a 10-step Euler sampling.

    ``train_step()`` returns its (forward, backward, optimizer) wall and CPU times."""
    # fused AdamW (CPU support since torch 2.4): the for-loop version costs ~12 ns per parameter
    # here, which would make the step time mostly optimiser; its state is allocated by step 1
    params = list(policy.parameters()) if params is None else params
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    t = torch.full((actions.shape[0],), 0.5)

    def train_step() -> dict[str, tuple[float, float]]:
        clock = [(time.perf_counter(), time.process_time())]
        loss = policy.loss(actions, prefix, noise=noise, t=t)
        clock.append((time.perf_counter(), time.process_time()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clock.append((time.perf_counter(), time.process_time()))
        opt.step()  # parameters without a gradient (detached TTT branches) are skipped
        clock.append((time.perf_counter(), time.process_time()))
        return {
            phase: (clock[i + 1][0] - clock[i][0], clock[i + 1][1] - clock[i][1])
            for i, phase in enumerate(("forward", "backward", "optimizer"))
        }

    def sample():
        with torch.no_grad():
            policy.sample(prefix, noise=noise, num_steps=10)

    return train_step, sample


@contextlib.contextmanager
def attached(policy: FlowMatchingPolicy, branches: list | None):
    """Give every layer of the policy's expert these TTT branches (None: no TTT branch, the same
    computation as an expert built with use_ttt=False)."""
    layers = policy.expert.layers
    saved = [layer.ttt for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.ttt = None if branches is None else branches[i]
        yield
    finally:
        for layer, branch in zip(layers, saved):
            layer.ttt = branch


def parameter_counts(policy: FlowMatchingPolicy) -> dict:
    """Parameters of the policy, of its TTT branches, and of the branches' parts."""
    parts = {"projections_and_post_norm": 0, "inner_fast_weights_and_ln": 0, "adarms_dense": 0}
    for layer in policy.expert.layers:
        if layer.ttt is None:
            continue
        for name, p in layer.ttt.named_parameters():
            part = (
                "adarms_dense"
                if name.startswith("norm.")
                else "inner_fast_weights_and_ln"
                if name.startswith("layer.inner.")
                else "projections_and_post_norm"
            )
            parts[part] += p.numel()
    n_params = sum(p.numel() for p in policy.parameters())
    return {
        "parameters": n_params,
        "ttt_parameters": sum(parts.values()),
        "ttt_parameters_by_part": parts,
        "param_mib": n_params * 4 / 2**20,
    }


def memory_phase(cfg, prefix, actions, noise) -> dict:
    """Peak RSS increase of one sampling (bare model) and of the first training step (gradients +
    AdamW state + activations) for a freshly built model of this config."""
    torch.manual_seed(0)
    policy = FlowMatchingPolicy(cfg)
    train_step, sample = make_steps(policy, prefix, actions, noise)
    layer = cfg.ttt_layer_config()
    heads, head_dim = layer.num_heads, layer.head_dim
    label = f"TTT {heads}x{head_dim}" if cfg.use_ttt else "base"
    _, sample_mem = _timed(sample, 0, 1, f"memory {label} sample")
    _, train_mem = _timed(train_step, 0, 1, f"memory {label} train")
    return {
        "use_ttt": cfg.use_ttt,
        "ttt_layers": list(cfg.ttt_layers()),
        "ttt_num_heads": heads if cfg.use_ttt else None,
        "ttt_head_dim": head_dim if cfg.use_ttt else None,
        **parameter_counts(policy),
        "sample_peak_rss_increase_mib": sample_mem,
        "train_peak_rss_increase_mib": train_mem,
    }


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def timing_phase(cfgs: dict, prefix, actions, noise, args) -> tuple[dict, list[float]]:
    """Interleaved timings of all variants on one base model (same base weights): each variant
    attaches its own TTT branches; the order rotates rep by rep so that no variant always runs
    first or last. Returns the per-variant timings and the load averages seen."""
    names = list(cfgs)
    torch.manual_seed(0)
    host = FlowMatchingPolicy(cfgs["without_ttt"])  # the base weights all variants share
    branches = {}
    for name, cfg in cfgs.items():
        if cfg.use_ttt:  # the branches of a model of this config (its base part is dropped)
            torch.manual_seed(0)
            donor = FlowMatchingPolicy(cfg)
            branches[name] = [layer.ttt for layer in donor.expert.layers]
            del donor
            trim_heap()
        else:
            branches[name] = None
    params = list(host.parameters())
    for bs in branches.values():
        params += [p for branch in bs or [] for p in branch.parameters()]
    train_step, sample = make_steps(host, prefix, actions, noise, params)
    times = {n: {"train": [], "train_cpu": [], "phases": [], "sample": [], "sample_cpu": []}
             for n in names}  # fmt: skip
    loads = []
    for _ in range(args.warmup):
        for name in names:
            with attached(host, branches[name]):
                train_step()
    for what, reps in (("train", args.reps), ("sample", args.sample_reps)):
        for r in tqdm(range(reps), desc=f"timing {what} (all variants)", leave=False):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                loads.append(_loadavg())
                with attached(host, branches[name]):
                    t0, c0 = time.perf_counter(), time.process_time()
                    if what == "train":
                        times[name]["phases"].append(train_step())
                    else:
                        sample()
                    times[name][what].append(time.perf_counter() - t0)
                    times[name][what + "_cpu"].append(time.process_time() - c0)
    out = {}
    for name, t in times.items():
        phases = {
            f"{phase}_{kind}_median": statistics.median(p[phase][i] for p in t["phases"])
            for phase in ("forward", "backward", "optimizer")
            for i, kind in enumerate(("s", "cpu_s"))
        }
        out[name] = {
            "train_step_s_min": min(t["train"]),
            "train_step_s_median": statistics.median(t["train"]),
            "train_step_s_all": t["train"],
            "train_step_cpu_s_min": min(t["train_cpu"]),
            "train_step_cpu_s_median": statistics.median(t["train_cpu"]),
            "train_step_cpu_s_all": t["train_cpu"],
            "train_step_phases": phases,
            "sample_10_steps_s_min": min(t["sample"]),
            "sample_10_steps_s_median": statistics.median(t["sample"]),
            "sample_10_steps_s_all": t["sample"],
            "sample_10_steps_cpu_s_all": t["sample_cpu"],
        }
    return out, loads


def overheads(b: dict, w: dict) -> dict:
    """TTT overheads over the base: best of each, median of each, median of per-rep ratios."""

    def three(key: str) -> dict:
        per_rep = [x / y - 1.0 for x, y in zip(w[key + "_all"], b[key + "_all"])]
        return {
            "best": min(w[key + "_all"]) / min(b[key + "_all"]) - 1.0,
            "median": statistics.median(w[key + "_all"]) / statistics.median(b[key + "_all"]) - 1.0,
            "median_of_per_rep_ratios": statistics.median(per_rep),
            "per_rep": per_rep,
        }

    return {
        "train_step": three("train_step_s"),
        "train_step_cpu": three("train_step_cpu_s"),
        "sample_10_steps": three("sample_10_steps_s"),
        "sample_10_steps_cpu": three("sample_10_steps_cpu_s"),
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
    p.add_argument("--reps", type=int, default=6, help="timed training steps per variant")
    p.add_argument("--sample-reps", type=int, default=1, help="timed 10-step samplings")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON path (default: see output_path)")
    p.add_argument("--full-width", action="store_true", help="also time the 8 x 128 TTT branch")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.sample_reps = 1, 1
    depth = 2 if args.quick else args.depth
    base_cfg = ActionExpertConfig.gemma_300m(depth=depth, action_horizon=args.horizon)
    cfgs = {name: variant_config(base_cfg, changes) for name, changes in VARIANTS.items()
            if args.full_width or not name.endswith("_full_width")}  # fmt: skip

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
    load_start = _loadavg()
    results = {}
    for name, cfg in cfgs.items():
        results[name] = memory_phase(cfg, prefix, actions, noise)
        trim_heap()  # the variant's model and optimiser are gone before the next one
    timings, loads = timing_phase(cfgs, prefix, actions, noise, args)
    for name, t in timings.items():
        results[name].update(t)
    base = results["without_ttt"]
    over = {name: overheads(base, r) for name, r in results.items() if r["use_ttt"]}
    cpus, own = os.cpu_count() or 1, torch.get_num_threads()
    wall_over_cpu = statistics.median(
        w / c
        for r in results.values()
        for w, c in zip(r["train_step_s_all"], r["train_step_cpu_s_all"])
    )
    # busy: other jobs used more than a quarter of the cores, or stole time from this process
    busy = statistics.median(loads) > own + 0.25 * cpus or wall_over_cpu > 1.05
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
                "layer_type": base_cfg.ttt_layer_config().inner,
                "use_dual_form": base_cfg.ttt_layer_config().use_dual_form,
                "gating": base_cfg.ttt.gating,
                "input": base_cfg.ttt.input,
                "mini_batch_size": None,
                "causal": False,
                "variants": {
                    name: {"num_heads": r["ttt_num_heads"], "head_dim": r["ttt_head_dim"]}
                    for name, r in results.items()
                    if r["use_ttt"]
                },
            },
            "optimizer": "AdamW(fused=True)",
            "reps": args.reps,
            "sample_reps": args.sample_reps,
            "warmup": args.warmup,
        },
        "results": results,
        # per TTT variant: best (least disturbed by other load), median, median of per-rep ratios
        "overhead": over,
        "target": "TTT in all 18 layers adds at most 30% to the training step time",
        "machine": machine_info(),
        "machine_load": {
            "loadavg_1min_at_start": load_start,
            "loadavg_1min_during_reps": {
                "min": min(loads),
                "median": statistics.median(loads),
                "max": max(loads),
            },
            "train_step_wall_over_cpu_median": wall_over_cpu,
            "busy": busy,
            "note": (
                f"busy machine: other jobs shared the {cpus} cores (load average "
                f"{statistics.median(loads):.1f} during the reps, this benchmark alone ~{own}); "
                "wall times are inflated and noisy, CPU times less so"
                if busy
                else f"quiet machine: load average ~{own} (this benchmark alone)"
            ),
        },
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
        "wall_s": time.perf_counter() - t0,
    }
    name = "gemma_cpu.json" if depth == 18 else f"gemma_cpu_depth{depth}.json"  # never the record
    out = output_path(args.out, args.quick, name)  # --quick: results/quick/
    atomic_write_text(out, json.dumps(summary, indent=2))
    for name, o in over.items():
        r, tr = results[name], o["train_step"]
        print(
            f"{name} ({r['ttt_num_heads']}x{r['ttt_head_dim']}, +{r['ttt_parameters'] / 1e6:.1f}M "
            f"params): train step {100 * tr['best']:+.1f}% best, {100 * tr['median']:+.1f}% "
            f"median, {100 * tr['median_of_per_rep_ratios']:+.1f}% median of per-rep ratios "
            f"(CPU time: {100 * o['train_step_cpu']['median_of_per_rep_ratios']:+.1f}%); "
            f"10-step sampling {100 * o['sample_10_steps']['best']:+.1f}%"
        )
    print(
        f"base train step {base['train_step_s_min']:.3f}s best, "
        f"{base['train_step_s_median']:.3f}s median; "
        f"{summary['machine_load']['note']}; wrote {out}"
    )
    return summary


if __name__ == "__main__":
    main()
