"""Files of a training run that must not execute, vanish or be misread: one policy for every CLI.

- ``atomic_save`` / ``atomic_write_text``: write a temp file beside the target, flush + fsync, then
  ``os.replace``; on any error (a full disk included) the temp file is removed and the old target
  stays as it was.
- ``safe_load``: ``torch.load(weights_only=True)`` with ttt-core's own classes (``TTTState``) and the
  caller's ``allow`` list allow-listed; a crafted pickle cannot run code, and every failure (missing,
  truncated, corrupt, not allowed) is a ``ValueError`` naming the file.
- ``reading``: a context manager that turns the raw errors of any reader (``EOFError``,
  ``BadZipFile``, ``SafetensorError``, ``UnicodeDecodeError``, ...) into a ``ValueError`` naming the file.
- ``prepare_run_dir``: the run-directory policy (refuse a non-empty run dir unless ``resume`` or
  ``overwrite``; resume needs something to resume; names cannot leave the runs root).
- ``sweep_stale_tmp``: remove the temp files a killed writer left behind.
- ``append_jsonl`` / ``truncate_jsonl``: a JSONL metrics log that never repeats a step on resume.

Examples:
    >>> run = prepare_run_dir("runs", cfg.name, resume=args.resume, overwrite=args.overwrite)
    >>> if args.resume:
    ...     ck = safe_load(run / "checkpoint.pt")
    ...     truncate_jsonl(run / "metrics.jsonl", ck["step"])
    >>> atomic_save({"model": model.state_dict(), "step": step}, run / "checkpoint.pt")
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import torch

from .state import TTTState

__all__ = [
    "RUN_MARKER",
    "TMP_SUFFIX",
    "append_jsonl",
    "atomic_path",
    "atomic_save",
    "atomic_write_text",
    "prepare_run_dir",
    "reading",
    "safe_load",
    "sweep_stale_tmp",
    "truncate_jsonl",
]

TMP_SUFFIX = ".tmp"
RUN_MARKER = ".ttt-run"  # written into every run dir prepare_run_dir creates; --overwrite needs it
SAFE_CLASSES: tuple[type, ...] = (TTTState,)  # ttt-core's own classes a checkpoint may hold


# ------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp file beside ``path`` (``.<name>.<random>.tmp``) for a writer that takes a file name
    (e.g. safetensors' ``save_file``): when the block ends, the file is fsynced and
    ``os.replace``-d onto ``path`` and the folder fsynced, so readers see the old file or the
    whole new one; on any error (a full disk included) it is removed and ``path`` left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _atomic_open(path: Path, mode: str) -> Iterator[IO[Any]]:
    """Yield the file of :func:`atomic_path`, open in ``mode``."""
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        yield fh


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: readers see the old file or the whole new one.

    The temp file (``.<name>.<random>.tmp`` in the same folder) is removed on any error, a full
    disk included, and the previous ``path`` is left untouched.

    Args:
        obj: anything ``torch.save`` takes; keep it to tensors, containers, numbers, strings and
            ``TTTState`` so that :func:`safe_load` can read it back.
        path: the target file; its folder is created if needed.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    with _atomic_open(path, "wb") as fh:
        torch.save(obj, fh)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_save` does."""
    path = Path(path)
    with _atomic_open(path, "w") as fh:
        fh.write(text)
    return path


def sweep_stale_tmp(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``*.tmp`` files directly inside ``folder`` (what a killed writer left).

    Call it on a folder this process owns (a run dir, before the run writes), never on one another
    process is writing to. Returns the removed paths; a missing folder removes nothing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in sorted(folder.glob(f"*{TMP_SUFFIX}")):
        if p.is_file() and not p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------ reading
def _read_errors() -> tuple[type[BaseException], ...]:
    """The exceptions readers raise on missing, truncated or corrupt files."""
    errors: list[type[BaseException]] = [
        OSError,  # missing, unreadable, gzip.BadGzipFile
        EOFError,  # truncated gzip / pickle
        zipfile.BadZipFile,  # truncated .npz / torch zip
        zlib.error,
        UnicodeDecodeError,
        pickle.UnpicklingError,
        RuntimeError,  # torch's zip reader ("PytorchStreamReader failed ...")
        ValueError,
        KeyError,  # torch zip without data.pkl
    ]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    return tuple(errors)


@contextlib.contextmanager
def reading(path: str | os.PathLike[str], what: str = "file") -> Iterator[Path]:
    """Turn the raw errors of reading ``path`` into a ``ValueError`` that names it.

    Keep only the reading itself inside the block: a ``ValueError`` raised there that does not
    name the file is reported as corruption (one that names it passes through unchanged), so check
    the content (shapes, dtypes) after the block.

    Args:
        path: the file being read.
        what: how the message calls it (``"checkpoint"``, ``"data file"``, ``"shard"``).

    Raises:
        ValueError: ``"<what> '<path>' does not exist"`` before the block, or ``"<what> '<path>' is
            truncated or corrupt (<error>)"`` for the errors readers raise.

    Examples:
        >>> with reading(path, "shard") as p:
        ...     codes = np.load(p)["codes"]
        ValueError: shard '/data/a.npz' is truncated or corrupt (BadZipFile: File is not a zip file)
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist (or is not a file)")
    try:
        yield path
    except _read_errors() as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise  # already names the file
        raise ValueError(
            f"{what} {str(path)!r} is truncated or corrupt ({type(e).__name__}: {e})"
        ) from e


def _allowing(classes: list[Any]) -> contextlib.AbstractContextManager[Any]:
    """Allow-list ``classes`` for ``weights_only`` loads within a ``with`` block (torch >= 2.5);
    torch 2.4 has only the process-wide ``add_safe_globals``, used there instead."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is not None:
        return scoped(classes)
    torch.serialization.add_safe_globals(classes)
    return contextlib.nullcontext()


def safe_load(
    path: str | os.PathLike[str],
    *,
    allow: Sequence[Any] = (),
    map_location: str | torch.device | None = "cpu",
    what: str = "checkpoint",
) -> Any:
    """Load a ``torch.save`` file without executing anything it holds.

    ``torch.load(weights_only=True)``: tensors, containers, numbers and strings load; classes load only
    when allow-listed (``TTTState`` always, plus ``allow``). A crafted pickle that would call a
    function (``os.system``) raises instead.

    Args:
        path: the file (a ``.pt`` checkpoint).
        allow: extra classes or functions the file may hold (the package's own dataclasses).
        map_location: as in ``torch.load`` (default ``"cpu"``).
        what: how errors call the file.

    Raises:
        ValueError: naming the file: missing, truncated/corrupt, or holding a global that is not
            allow-listed (the message gives the global's name).
    """
    path = Path(path)
    with reading(path, what), _allowing([*SAFE_CLASSES, *allow]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            refused = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line]
            if not refused:
                raise  # a corrupt pickle: `reading` names the file
            raise ValueError(
                f"{what} {str(path)!r} holds objects that a safe load refuses "
                f"({refused[0]}); it was not written by this package or was tampered with. "
                "Load only files you trust; a package that stores its own classes passes them "
                "as safe_load(..., allow=[...])"
            ) from None


# ------------------------------------------------------------------------------ run directory
def _inside(root: Path, name: str) -> Path:
    """``root / name`` after checking that ``name`` is a relative path that stays below ``root``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"run name must be a non-empty string, got {name!r}")
    p = Path(name)
    if p.is_absolute() or p.drive or ".." in p.parts:
        raise ValueError(
            f"run name {name!r} must be a relative path inside {str(root)!r} without '..' "
            "(e.g. 'exp1' or 'ablation/exp1'); pass an explicit output folder to write elsewhere"
        )
    run = (root / p).resolve()
    root_r = root.resolve()
    if run == root_r or root_r not in run.parents:
        raise ValueError(f"run name {name!r} must name a folder below {str(root)!r}")
    return root / p


def prepare_run_dir(
    root: str | os.PathLike[str],
    name: str,
    *,
    resume: bool,
    overwrite: bool,
    checkpoints: str = "*.pt",
) -> Path:
    """The one run-directory policy: create, resume or replace ``root / name``.

    - fresh (neither flag): the run dir must not exist or be empty (the marker alone counts as
      empty: a run that failed before writing anything can start again); it is created.
    - ``resume``: the run dir must hold a file matching ``checkpoints`` (the caller loads it and
      decides which config wins); stale temp files are swept.
    - ``overwrite``: an existing run dir is emptied first, but only if it carries the marker
      ``.ttt-run`` that this function writes (so a mistyped ``--out $HOME`` deletes nothing).

    Args:
        root: the runs root (e.g. ``runs``); for an explicit output folder ``out`` pass
            ``out.parent, out.name``.
        name: the run name: a relative path below ``root`` (``exp1``, ``sweep/exp1``);
            ``../x``, ``/tmp/x`` and ``.`` are rejected.
        resume: continue the run in the folder.
        overwrite: replace the run in the folder.
        checkpoints: glob (inside the run dir) of the files a resume needs.

    Returns:
        The run dir (``root / name``), existing, with the marker file, and without stale temp files.

    Raises:
        ValueError: both flags; a name leaving ``root``; a non-empty run dir without a flag (the
            message says which flag to pass); nothing to resume; ``overwrite`` of an unmarked dir.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: pass one of them")
    root = Path(root)
    run = _inside(root, name)
    if run.exists() and not run.is_dir():
        raise ValueError(f"run dir {str(run)!r} exists and is not a folder")
    has_content = run.is_dir() and any(p.name != RUN_MARKER for p in run.iterdir())
    if resume:
        if not run.is_dir() or not any(run.glob(checkpoints)):
            raise ValueError(
                f"nothing to resume in {str(run)!r} (no file matching {checkpoints!r}); "
                "start it without --resume"
            )
    elif has_content:
        if not overwrite:
            raise ValueError(
                f"run dir {str(run)!r} exists and is not empty: pass --resume to continue it, "
                "--overwrite to replace it, or choose another name/output folder"
            )
        if not (run / RUN_MARKER).is_file():
            raise ValueError(
                f"refusing to overwrite {str(run)!r}: it has no {RUN_MARKER} marker, so it was "
                "not made as a run dir; remove it yourself or choose another folder"
            )
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / RUN_MARKER).touch()
    sweep_stale_tmp(run)
    return run


# ------------------------------------------------------------------------------- metrics log
def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON record as a line to ``path`` (created if missing), flushed to the OS.

    A kill mid-append leaves at most a torn last line, which :func:`truncate_jsonl` drops.
    """
    line = json.dumps(record)  # NaN/Infinity as Python writes and reads them
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()


def truncate_jsonl(path: str | os.PathLike[str], last_step: int, *, key: str = "step") -> int:
    """Cut a JSONL log back to a checkpoint: keep records with ``record[key] <= last_step``.

    Call it on resume with the checkpoint's step, before the run appends again, so that no step
    appears twice. A torn last line (a kill during an append) is dropped; a corrupt line elsewhere
    or a record without ``key`` raises ``ValueError`` naming the file and line. The file is
    rewritten atomically; a missing file keeps nothing and stays missing.

    Returns:
        The number of records kept.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break  # torn last append
            raise ValueError(f"metrics log {str(path)!r} line {i + 1} is not JSON") from None
        if not isinstance(rec, dict) or key not in rec:
            raise ValueError(f"metrics log {str(path)!r} line {i + 1} has no {key!r} field")
        if rec[key] <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))
    return len(kept)
