"""Command line: ``ttt-titans run --config CFG [key=value ...]``, ``ttt-titans compare --out DIR``.

run:     one experiment in a run folder: resolved config (config.yaml), metrics.json, checkpoint.pt
         (atomic; ``--resume`` continues from it), figures (forecast.png, cumulative_mse.png).
compare: the three modes (baseline, simple_ttt, meta_ttt) on the same data and backbone; writes
         compare.json, compare.md (MSE, MAE, seconds per epoch) and the figures side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import MODES, apply_overrides, from_dict, list_packaged_configs, load_yaml_chain
from .data import EMBEDDED_NAME
from .plots import plot_cumulative_mse, plot_forecast
from .train import Runner, build_splits


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run_experiment(
    raw_cfg: dict[str, Any],
    out: Path,
    resume: bool = False,
    progress: bool = True,
    checkpoint_every: int = 50,
    splits=None,
) -> tuple[dict[str, Any], Runner]:
    """Pretrain + online for one config dict; everything lands in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "checkpoint.pt"
    if resume and ck.is_file():
        runner = Runner.load(ck, splits=splits, progress=progress)
    else:
        runner = Runner(from_dict(raw_cfg), splits=splits, progress=progress)
    cfg = runner.cfg
    _atomic_write_text(
        out / "config.yaml", yaml.safe_dump(_listify(cfg.to_dict()), sort_keys=False)
    )
    runner.pretrain(on_epoch=lambda r: r.save(ck))
    runner.save(ck)
    runner.online(on_step=lambda r: r.save(ck) if r.online_step % checkpoint_every == 0 else None)
    runner.save(ck)
    metrics = _json_safe(runner.metrics())
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    res = {cfg.mode: {"pred": runner.history.online_pred, "true": runner.history.online_true}}
    plot_forecast(res, out / "forecast.png")
    plot_cumulative_mse(res, out / "cumulative_mse.png")
    return metrics, runner


def _listify(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _listify(v) for k, v in d.items()}
    if isinstance(d, tuple):
        return list(d)
    return d


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | backbone | MSE | MAE | s/epoch | online s | epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['backbone']} | {r['mse']:.4f} | {r['mae']:.4f} | "
            f"{r['seconds_per_epoch']:.2f} | {r['online_seconds']:.1f} | {r['epochs']} |"
        )
    return "\n".join(lines)


def compare(
    out: Path, config: str, overrides: list[str], progress: bool = True
) -> list[dict[str, Any]]:
    """Run baseline, simple_ttt, meta_ttt on the same splits; write table + figures to ``out``."""
    base = apply_overrides(load_yaml_chain(config), overrides)
    splits = build_splits(from_dict(base))
    rows, results = [], {}
    for mode in MODES:
        raw = apply_overrides(base, [f"mode={mode}", f"name={mode}"])
        metrics, runner = run_experiment(raw, out / mode, progress=progress, splits=splits)
        rows.append(metrics)
        results[mode] = {"pred": runner.history.online_pred, "true": runner.history.online_true}
        print(
            f"{mode:>10}: MSE {metrics['mse']:.4f}  MAE {metrics['mae']:.4f}  "
            f"s/epoch {metrics['seconds_per_epoch']:.2f}",
            flush=True,
        )
    base_sec = rows[0]["seconds_per_epoch"]
    for r in rows:
        r["epoch_time_vs_baseline"] = r["seconds_per_epoch"] / base_sec
    summary = {
        "data": base.get("data", {}).get("path") or f"embedded: {EMBEDDED_NAME}",
        "config": config,
        "overrides": overrides,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    _atomic_write_text(out / "compare.json", json.dumps(summary, indent=2))
    _atomic_write_text(out / "compare.md", table(rows) + "\n")
    plot_forecast(results, out / "forecast.png")
    plot_cumulative_mse(results, out / "cumulative_mse.png")
    print(table(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ttt-titans", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one experiment (pretrain + online)")
    r.add_argument(
        "--config",
        required=True,
        help=f"YAML path, or a packaged config name ({', '.join(list_packaged_configs())})",
    )
    r.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument(
        "overrides", nargs="*", help="key=value, e.g. train.epochs=3 model.backbone=lstm"
    )
    c = sub.add_parser("compare", help="baseline vs simple_ttt vs meta_ttt on the same data")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--config", default="base.yaml", help="base config (default: packaged base)")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("overrides", nargs="*", help="key=value overrides for all three modes")
    a = p.parse_args(argv)
    try:
        if a.cmd == "run":
            raw = apply_overrides(load_yaml_chain(a.config), a.overrides)
            out = Path(a.out) if a.out else Path("runs") / str(raw.get("name", "run"))
            metrics, _ = run_experiment(raw, out, resume=a.resume, progress=not a.no_progress)
            print(json.dumps(metrics, indent=2))
        else:
            compare(Path(a.out), a.config, a.overrides, progress=not a.no_progress)
    except ValueError as e:
        print(f"ttt-titans: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
