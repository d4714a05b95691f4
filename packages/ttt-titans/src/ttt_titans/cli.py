"""Command line: ``ttt-titans run --config CFG [key=value ...]``, ``ttt-titans compare --out DIR``.

run:     one experiment in a run folder (``--out``, or ``runs/<name>`` from the config's ``name``):
         resolved config (config.yaml), metrics.json, checkpoint.pt (atomic), figures
         (forecast.png, cumulative_mse.png). A folder that is not empty is refused unless
         ``--resume`` (continue its checkpoint; the config comes from the run, and only the keys
         ``resume_config`` allows may change) or ``--overwrite`` (replace the run).
compare: the three modes (baseline, simple_ttt, meta_ttt) on the same data and backbone; writes
         compare.json, compare.md (MSE, MAE, seconds per epoch) and the figures side by side
         (``--overwrite`` to replace an earlier compare folder).

Errors print one line (``ttt-titans: error: ...``, exit 2 for bad input); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from ttt_core.runfiles import atomic_write_text, prepare_run_dir

from .config import MODES, apply_overrides, from_dict, list_packaged_configs, load_yaml_chain
from .data import EMBEDDED_NAME
from .plots import plot_cumulative_mse, plot_forecast
from .train import Runner, build_splits

RUNS_ROOT = Path("runs")  # run folders named by the config's `name` live here
CHECKPOINT = "checkpoint.pt"


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run_experiment(
    raw_cfg: dict[str, Any] | None,
    out: Path,
    resume: bool = False,
    progress: bool = True,
    checkpoint_every: int = 50,
    splits=None,
    overrides: list[str] | None = None,
) -> tuple[dict[str, Any], Runner]:
    """Pretrain + online for one config dict; everything lands in ``out``.

    Args:
        raw_cfg: the config as a dict (YAML + overrides); with ``resume`` it may be None (the
            run's saved config + ``overrides``), else it must agree with the saved config except
            for the keys a resume may change.
        out: a run folder made by ``ttt_core.runfiles.prepare_run_dir`` (the caller applies the
            run-directory policy).
        resume: continue from ``out/checkpoint.pt``.
        checkpoint_every: online windows between checkpoints (and one after every epoch).
    """
    ck = out / CHECKPOINT
    if resume:
        runner = Runner.load(ck, splits=splits, progress=progress, requested=raw_cfg,
                             overrides=overrides or [])  # fmt: skip
        for key, (old, new) in runner.resume_changes.items():
            print(f"ttt-titans: resume: {key}: {old!r} -> {new!r}", file=sys.stderr)
    elif raw_cfg is None:
        raise ValueError("a new run needs a config (--config)")
    else:
        runner = Runner(from_dict(raw_cfg), splits=splits, progress=progress)
    cfg = runner.cfg
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    runner.pretrain(on_epoch=lambda r: r.save(ck))
    runner.save(ck)
    runner.online(on_step=lambda r: r.save(ck) if r.online_step % checkpoint_every == 0 else None)
    runner.save(ck)
    metrics = _json_safe(runner.metrics())
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    res = {cfg.mode: {"pred": runner.history.online_pred, "true": runner.history.online_true}}
    plot_forecast(res, out / "forecast.png")
    plot_cumulative_mse(res, out / "cumulative_mse.png")
    return metrics, runner


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


def _split_out(out: Path) -> tuple[Path, str]:
    """(root, name) of an explicit output folder, for ``prepare_run_dir``."""
    if out.name in ("", ".", ".."):
        out = out.resolve()
    return out.parent, out.name


def compare(
    out: Path, config: str, overrides: list[str], progress: bool = True, overwrite: bool = False
) -> list[dict[str, Any]]:
    """Run baseline, simple_ttt, meta_ttt on the same splits; write table + figures to ``out``."""
    base = apply_overrides(load_yaml_chain(config), overrides)
    splits = build_splits(from_dict(base))
    out = prepare_run_dir(*_split_out(out), resume=False, overwrite=overwrite)
    rows, results = [], {}
    for mode in MODES:
        raw = apply_overrides(base, [f"mode={mode}", f"name={mode}"])
        run = prepare_run_dir(out, mode, resume=False, overwrite=False)
        metrics, runner = run_experiment(raw, run, progress=progress, splits=splits)
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
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "compare.md", table(rows) + "\n")
    plot_forecast(results, out / "forecast.png")
    plot_cumulative_mse(results, out / "cumulative_mse.png")
    print(table(rows))
    return rows


def _run(a: argparse.Namespace) -> None:
    """``ttt-titans run``: the run-directory policy, then :func:`run_experiment`."""
    if a.config is None and not a.resume:
        raise ValueError("run needs --config (or --resume with --out to continue a run)")
    raw = apply_overrides(load_yaml_chain(a.config), a.overrides) if a.config else None
    cfg = None if raw is None else from_dict(raw)  # a bad config fails before any folder is made
    if a.out:
        root, name = _split_out(Path(a.out))
    elif cfg is not None:
        root, name = RUNS_ROOT, cfg.name
    else:
        raise ValueError("--resume without --config needs --out (the run folder to continue)")
    out = prepare_run_dir(
        root, name, resume=a.resume, overwrite=a.overwrite, checkpoints=CHECKPOINT
    )
    metrics, _ = run_experiment(
        raw, out, resume=a.resume, progress=not a.no_progress, overrides=a.overrides
    )
    print(json.dumps(metrics, indent=2))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p = argparse.ArgumentParser(prog="ttt-titans", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", parents=[common], help="one experiment (pretrain + online)")
    r.add_argument(
        "--config",
        default=None,
        help=f"YAML path, or a packaged config name ({', '.join(list_packaged_configs())}); "
        "with --resume, optional (the run's own config)",
    )
    r.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    how.add_argument("--overwrite", action="store_true", help="replace the run in <out>")
    r.add_argument(
        "overrides", nargs="*", help="key=value, e.g. train.epochs=3 model.backbone=lstm"
    )
    c = sub.add_parser(
        "compare", parents=[common], help="baseline vs simple_ttt vs meta_ttt on the same data"
    )
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--config", default="base.yaml", help="base config (default: packaged base)")
    c.add_argument("--overwrite", action="store_true", help="replace an earlier compare in --out")
    c.add_argument("overrides", nargs="*", help="key=value overrides for all three modes")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, taking ``key=value`` overrides anywhere on the line (also after ``--out DIR``)."""
    parser = _parser()
    a, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    a.overrides = [*a.overrides, *extra]
    return a


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    try:
        if a.cmd == "run":
            _run(a)
        else:
            compare(
                Path(a.out), a.config, a.overrides, progress=not a.no_progress,
                overwrite=a.overwrite,
            )  # fmt: skip
    except KeyboardInterrupt:
        if a.debug:
            raise
        print("ttt-titans: interrupted (a run continues with --resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if a.debug:
            raise
        text = " ".join(str(e).split())
        if not isinstance(e, (ValueError, TypeError)):
            text = f"{type(e).__name__}: {text}"
        print(f"ttt-titans: error: {text} (--debug shows the traceback)", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, TypeError)) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
