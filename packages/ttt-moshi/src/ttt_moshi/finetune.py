"""``ttt-moshi-finetune --config ft.yaml``: fine-tune a TTT-patched Moshi LM from a YAML config."""

from __future__ import annotations

import argparse
import json
import logging

from .config import FinetuneConfig
from .train import Trainer


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML config (see example_finetune.yaml)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = FinetuneConfig.from_yaml(args.config)
    trainer = Trainer(cfg, progress=not args.no_progress)
    trainer.fit()
    result = {"steps": trainer.step, "final_loss": trainer.history[-1]["loss"]}
    if trainer.eval_data is not None:
        result["eval_loss"] = trainer.evaluate()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
