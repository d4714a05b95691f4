"""One ``TTTLayer`` streaming step (one token per call), side by side in one process: ttt-core's
backends in this checkout (``torch`` and ttt-cuda's fused C++ step ``cpp``), optionally another
ttt-core source tree (e.g. an older commit's, torch backend), or the cpp step on 1 vs 2 threads.

Every variant (the same weights) steps through the same tokens in turn (the order alternating), and
each step's outputs are compared; the JSON gives each variant's median ms per step and the median
ratio of neighbouring steps against the first variant.

Run (1 thread, C=1024, H=4, D=64, TTT-Linear, batch 1 by default):
``python benchmarks/core_step.py --threads 1`` (torch vs cpp: ``results/core_step_backends_cpu.json``),
``git archive <commit> packages/ttt-core/src | tar -x -C /tmp/before`` then
``python benchmarks/core_step.py --before /tmp/before/packages/ttt-core/src --label <commit>
--threads 1`` (the other tree's torch backend too: ``results/core_step_cpu.json``),
``OMP_WAIT_POLICY=PASSIVE python benchmarks/core_step.py --thread-pair --inner mlp --batch 8
--heads 16`` (the cpp step on 1 and 2 threads: ``results/core_step_threads_cpu.json``; passive, so
that torch's idle OpenMP workers do not spin on the core the step's second thread needs).
``--inner-only``: the inner learner's public step alone (``InnerLearner.step``, q/k/v/eta made
beforehand), ``--inner mlp`` TTT-MLP. ``--quick``: 200 steps.
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

HERE = Path(__file__).resolve().parent
NOW = HERE.parent / "packages" / "ttt-core" / "src"


def load_ttt_core(src: Path):
    """Import the ttt_core package of the source tree ``src`` (forgetting any imported before, and
    ttt_cuda, which binds the ttt_core it was imported with)."""
    for name in [n for n in sys.modules if n.split(".")[0] in ("ttt_core", "ttt_cuda")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        import ttt_core
    finally:
        sys.path.remove(str(src))
    if not Path(ttt_core.__file__).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"imported {ttt_core.__file__}, not the tree {src}")
    return ttt_core


def make_variants(args) -> dict[str, tuple[torch.nn.Module, int]]:
    """label -> (layer, torch threads it steps with), every layer with the first one's weights."""
    threads = args.threads or torch.get_num_threads()
    trees = [(args.label, args.before)] if args.before else []
    variants = {}
    for label, src in [*trees, ("this checkout", NOW)]:
        tc = load_ttt_core(src)
        backends = ["torch"] if src is not NOW else args.backends.split(",")
        for backend in ["cpp"] if args.thread_pair else backends:
            torch.manual_seed(0)
            cfg = tc.TTTConfig(hidden_size=args.hidden, num_heads=args.heads, head_dim=args.head_dim,
                               inner=args.inner, backend=backend)  # fmt: skip
            layer = tc.TTTLayer(cfg).eval()
            if args.thread_pair:
                variants["cpp/1 thread"], variants["cpp/2 threads"] = (layer, 1), (layer, 2)
            else:
                variants[f"{label}/{backend}" if trees else backend] = (layer, threads)
    first, *others = (layer for layer, _ in variants.values())
    for layer in others:
        layer.load_state_dict(first.state_dict())
    return variants


def stepper(layer: torch.nn.Module, xs: torch.Tensor, inner_only: bool):
    """(token index t, state) -> (output, state): the layer on xs[:, t] or (``inner_only``) its
    inner learner's public single step on the token's q, k, v, eta (computed beforehand)."""
    if not inner_only:
        return lambda t, state: layer(xs[:, t : t + 1], state)
    inputs = [layer.inner_inputs(xs[:, t : t + 1]) for t in range(xs.shape[1])]
    c = layer.config

    def step(t, state):
        i = inputs[t]
        return layer.inner.step(i["q"], i["k"], i["v"], i["eta"], state=state,
                                mini_batch_size=c.mini_batch_size, backend=c.backend)  # fmt: skip

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, default=None, help="another tree's ttt-core src dir")
    p.add_argument("--label", default="before", help="the other tree's name in the JSON")
    p.add_argument("--backends", default="torch,cpp", help="this checkout's backends to compare")
    p.add_argument("--thread-pair", action="store_true", help="the cpp step on 1 vs 2 threads")
    p.add_argument("--inner-only", action="store_true", help="time the inner learner's step only")
    p.add_argument("--inner", default="linear", choices=["linear", "mlp"])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    variants = make_variants(args)
    steps, warmup, period = (200 if args.quick else 2000), 64, 256  # a fresh state every 256 tokens
    xs = torch.randn(args.batch, period, args.hidden)
    with torch.no_grad():
        calls = {
            label: stepper(layer, xs, args.inner_only) for label, (layer, _) in variants.items()
        }
    times = {label: [] for label in variants}
    states = dict.fromkeys(variants)
    outs = {}
    order = list(variants)
    with torch.no_grad():
        for i in range(warmup + steps):
            if i % period == 0:
                states = dict.fromkeys(variants)
            for label in order if i % 2 else order[::-1]:
                torch.set_num_threads(variants[label][1])
                t0 = time.perf_counter()
                outs[label], states[label] = calls[label](i % period, states[label])
                if i >= warmup:
                    times[label].append(time.perf_counter() - t0)
            ref, *rest = outs.values()
            for o in rest:
                torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5)
    base, *_ = order
    shape = (f"C={args.hidden}, H={args.heads}, D={args.head_dim}, {args.inner}, fp32, "
             f"batch {args.batch}")  # fmt: skip
    what = "the inner learner's step of a TTTLayer" if args.inner_only else "TTTLayer"
    result = {
        "benchmark": f"{what} streaming step ({shape}): {', '.join(order)}",
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(
            threads={label: t for label, (_, t) in variants.items()},
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        ),
        "steps": steps,
        "median_ms": {label: round(statistics.median(t) * 1e3, 4) for label, t in times.items()},
        "min_ms": {label: round(min(t) * 1e3, 4) for label, t in times.items()},
        "median_ratio_over_" + base: {
            label: round(statistics.median(y / x for x, y in zip(times[base], times[label])), 3)
            for label in order[1:]
        },
    }
    name = "core_step_cpu.json" if args.before else "core_step_backends_cpu.json"
    if args.inner_only:
        name = name.replace(".json", f"_inner_{args.inner}.json")
    out = output_path(
        args.out, args.quick, "core_step_threads_cpu.json" if args.thread_pair else name
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
