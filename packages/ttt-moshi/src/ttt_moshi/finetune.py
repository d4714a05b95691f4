"""``ttt-moshi-finetune --config ft.yaml``: fine-tune a TTT-patched Moshi LM from a YAML config.

One process: ``ttt-moshi-finetune --config ft.yaml``. Several (one per GPU, or gloo on CPU):
``torchrun --nproc-per-node N -m ttt_moshi.finetune --config ft.yaml`` (FSDP2 by layer, or DDP
with ``parallelism: ddp``). ``--resume`` continues the run in ``run_dir`` from its newest
checkpoint; ``--overwrite`` replaces it. An error prints one line (``--debug``: the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
import torch.distributed as dist

from .config import FinetuneConfig
from .train import Trainer


def _init_distributed() -> bool:
    """Join the ``torchrun`` process group (WORLD_SIZE > 1): nccl with GPUs, gloo without."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def run(args: argparse.Namespace) -> dict:
    cfg = FinetuneConfig.from_yaml(args.config)
    distributed = _init_distributed()
    try:
        trainer = Trainer(
            cfg, progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite
        )
        trainer.fit()
        result = {"steps": trainer.step, "final_loss": trainer.history[-1]["loss"]}
        if trainer.eval_data is not None:
            result["eval_loss"] = trainer.evaluate()
        return result
    finally:
        if distributed:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="ttt-moshi-finetune", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (see example_finetune.yaml)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue the run in run_dir")
    runs.add_argument("--overwrite", action="store_true", help="replace the run in run_dir")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        result = run(args)
    except Exception as e:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"ttt-moshi-finetune: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
