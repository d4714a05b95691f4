"""``ttt-moshi COMMAND ...``: ``encode`` (WAV -> shards), ``finetune``, ``demo``."""

from __future__ import annotations

import sys

COMMANDS = {
    "encode": "ttt_moshi.encode",
    "finetune": "ttt_moshi.finetune",
    "demo": "ttt_moshi.demo",
}


USAGE = f"usage: ttt-moshi {{{','.join(COMMANDS)}}} [-h] ...  (ttt-moshi COMMAND -h: its options)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):  # asked for: the usage on stdout, status 0
        print(f"{USAGE}\n\n{__doc__.strip()}")
        raise SystemExit(0)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
