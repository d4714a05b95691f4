"""One ``TTTLayer`` streaming step (one token per call, batch 1) for two ttt-core source trees side by
side in one process: e.g. an older commit's and this checkout's.

Both layers (C=1024, H=4, D=64, TTT-Linear, fp32, the same weights) step through the same tokens in
turn (the order alternating), and each step's outputs are compared; the JSON gives each tree's median
ms per step and the median ratio of neighbouring steps.

Run: ``git worktree add /tmp/before 561cb53`` then
``python benchmarks/core_step.py --before /tmp/before/packages/ttt-core/src --threads 1``
(``--quick``: 200 steps). Writes ``benchmarks/results/core_step_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from machine import machine_info, output_path

HERE = Path(__file__).resolve().parent
NOW = HERE.parent / "packages" / "ttt-core" / "src"


def load_ttt_core(src: Path):
    """Import the ttt_core package of the source tree ``src`` (forgetting any imported before)."""
    for name in [n for n in sys.modules if n == "ttt_core" or n.startswith("ttt_core.")]:
        del sys.modules[name]
    sys.path.insert(0, str(src))
    try:
        import ttt_core
    finally:
        sys.path.remove(str(src))
    if not Path(ttt_core.__file__).resolve().is_relative_to(src.resolve()):
        raise RuntimeError(f"imported {ttt_core.__file__}, not the tree {src}")
    return ttt_core


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="the other tree's ttt-core src dir")
    p.add_argument("--label", default="561cb53", help="the other tree's name in the JSON")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = {}
    for label, src in ((args.label, args.before), ("this checkout", NOW)):
        tc = load_ttt_core(src)
        torch.manual_seed(0)
        cfg = tc.TTTConfig(hidden_size=1024, num_heads=4, head_dim=64, inner="linear")
        layers[label] = tc.TTTLayer(cfg).eval()
    first, *others = layers.values()
    for layer in others:
        layer.load_state_dict(first.state_dict())
    steps, warmup, period = (200 if args.quick else 2000), 64, 256  # a fresh state every 256 tokens
    xs = torch.randn(1, period, 1024)
    times = {label: [] for label in layers}
    states = dict.fromkeys(layers)
    outs = {}
    order = list(layers)
    with torch.no_grad():
        for i in range(warmup + steps):
            if i % period == 0:
                states = dict.fromkeys(layers)
            x = xs[:, i % period : i % period + 1]
            for label in order if i % 2 else order[::-1]:
                t0 = time.perf_counter()
                outs[label], states[label] = layers[label](x, states[label])
                if i >= warmup:
                    times[label].append(time.perf_counter() - t0)
            ref, *rest = outs.values()
            for o in rest:
                torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5)
    a, b = (times[label] for label in order)
    result = {
        "benchmark": "TTTLayer streaming step (C=1024, H=4, D=64, linear, fp32, batch 1), two trees",
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(threads=torch.get_num_threads()),
        "steps": steps,
        "median_ms": {label: round(statistics.median(t) * 1e3, 4) for label, t in times.items()},
        "min_ms": {label: round(min(t) * 1e3, 4) for label, t in times.items()},
        f"median_ratio_this_checkout_over_{args.label}": round(
            statistics.median(y / x for x, y in zip(a, b)), 3
        ),
    }
    out = output_path(args.out, args.quick, "core_step_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
