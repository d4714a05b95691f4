"""The ``ttt-gemma`` command: ``ttt-gemma train --config FILE.yaml [--resume | --overwrite]``.

Under ``torchrun --nproc_per_node N`` the same command trains with DDP or FSDP2
(``train.parallel``). Errors print one line (``--debug``: the traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from .train import train
from .train_config import load_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ttt-gemma", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="fine-tune a policy on a LeRobot v2 dataset")
    t.add_argument("--config", required=True, help="the run's YAML config (see train_config.py)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in run.root/run.name")
    mode.add_argument("--overwrite", action="store_true", help="replace that run")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after this step with a checkpoint (continue with --resume)")  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.stop_at is not None and args.stop_at < 1:
            raise ValueError(f"--stop-at must be >= 1, got {args.stop_at}")
        cfg = load_config(args.config)
        run = train(cfg, resume=args.resume, overwrite=args.overwrite, stop_at=args.stop_at,
                    progress=not args.no_progress)  # fmt: skip
    except (ValueError, TypeError, OSError) as err:
        if args.debug:
            raise
        print(f"ttt-gemma {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(f"run folder: {run}")
    return 0


def cli() -> None:
    """Console entry point ``ttt-gemma``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
