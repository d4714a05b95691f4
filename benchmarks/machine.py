"""What every benchmark records about the machine it ran on, where it writes its JSON, and how it
reads the process's resident memory (shared by the scripts here)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def output_path(out: str | Path | None, quick: bool, name: str) -> Path:
    """Where a benchmark writes its JSON ``name``: ``--out`` when given; else
    ``results/<name>`` for a full run and ``results/quick/<name>`` (git-ignored) for ``--quick``,
    so a smoke run never replaces the recorded figures."""
    if out is not None:
        return Path(out)
    return RESULTS / "quick" / name if quick else RESULTS / name


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(**extra) -> dict:
    """platform, cpu, cpu_count, python, torch, intra-op threads, plus ``extra`` fields."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **extra,
    }


def write_json(out: Path, doc: dict) -> None:
    """Write ``doc`` to ``out`` atomically (a run killed mid-write leaves the previous file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


def rss_mib(field: str = "VmRSS") -> float:
    """``field`` of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (the peak since the
    process started or since the last ``reset_peak_rss``); NaN where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs), so that
    ``rss_mib("VmHWM")`` is the peak from here on; a no-op where that is not possible.
    (``getrusage``'s ``ru_maxrss`` is the same peak but can never be reset.)"""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def trim_heap() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS deltas are tight."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
