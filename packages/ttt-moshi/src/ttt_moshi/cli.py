"""``ttt-moshi COMMAND ...``: ``encode`` (WAV -> shards), ``finetune``, ``demo``."""

from __future__ import annotations

import sys

COMMANDS = {
    "encode": "ttt_moshi.encode",
    "finetune": "ttt_moshi.finetune",
    "demo": "ttt_moshi.demo",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: ttt-moshi {{{','.join(COMMANDS)}}} [-h] ...", file=sys.stderr)
        raise SystemExit(2)
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
