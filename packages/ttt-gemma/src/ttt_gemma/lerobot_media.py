"""Camera frames and task prompts of LeRobot v2 datasets (the parts :mod:`ttt_gemma.lerobot` reads
beside the state/action columns).

Formats (LeRobot ``codebase_version`` v2.x, as lerobot's ``datasets/utils.py`` writes them):

- ``meta/info.json`` ``features[key]`` with ``dtype: "image"``: the episode parquet's column
  ``key`` is a struct ``{bytes: binary (PNG/JPEG file), path: string}`` per frame (Hugging Face
  ``datasets.Image``); decoded with Pillow to ``[H, W, 3]`` uint8.
- ``dtype: "video"``: one mp4 per episode and camera at ``info["video_path"]`` (default
  ``videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4``); a frame is
  the one shown at the parquet's ``timestamp`` (frame ``round(timestamp * fps)``), decoded with
  PyAV (``pip install av``), which is optional: without it a video feature is refused by name.
- ``meta/tasks.jsonl``: ``{"task_index": i, "task": "..."}`` per line; each frame's
  ``task_index`` column picks its prompt.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

VIDEO_PATH = "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"


def encode_png(image: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> the bytes of a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, where: str) -> np.ndarray:
    """The bytes of a PNG/JPEG file -> [H, W, 3] uint8 (RGB); ValueError naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{where}: not a readable PNG/JPEG image ({err})") from err


def image_column(table: pa.Table, key: str, path: Path) -> list[bytes]:
    """The encoded images of an ``image`` feature's column, one per row.

    Raises ValueError naming the file and column when the column is missing, is not
    LeRobot's ``{bytes, path}`` struct (or plain binary), or has a row without bytes."""
    if key not in table.column_names:
        raise ValueError(f"{path}: no image column {key!r}; columns are {table.column_names}")
    col = table.column(key).combine_chunks()
    if pa.types.is_struct(col.type) and col.type.get_field_index("bytes") >= 0:
        col = col.field("bytes")
    if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
        raise ValueError(
            f"{path}: column {key!r} has type {col.type}; an image feature is stored as a struct "
            "{bytes: binary, path: string} holding a PNG/JPEG file per frame"
        )
    values = col.to_pylist()
    empty = [i for i, v in enumerate(values) if not v]
    if empty:
        raise ValueError(f"{path}: column {key!r} has no image bytes in rows {empty[:5]}")
    return values


@dataclass
class VideoFrames:
    """The frames of one camera stored as mp4 videos, decoded on demand with PyAV."""

    key: str
    paths: list[Path]  # per episode
    timestamps: list[np.ndarray]  # per episode: [n] seconds of each frame
    fps: float

    def frame(self, episode: int, frame: int) -> np.ndarray:
        """[H, W, 3] uint8: the frame shown at ``timestamps[episode][frame]``."""
        import av

        seconds = float(self.timestamps[episode][frame])
        target = round(seconds * self.fps)
        with av.open(str(self.paths[episode])) as container:
            stream = container.streams.video[0]
            # to the key frame at or before the time, then decode forward (as lerobot's pyav path)
            container.seek(int(seconds / stream.time_base), stream=stream, backward=True)
            for decoded in container.decode(stream):
                index = round(float(decoded.pts * stream.time_base) * self.fps)
                if index == target:
                    return decoded.to_ndarray(format="rgb24")
                if index > target:
                    break
        raise ValueError(
            f"{self.paths[episode]}: no frame at t = {self.timestamps[episode][frame]:.4f} s "
            f"(frame {target} at {self.fps} fps) for {self.key!r}"
        )


def video_frames(root: Path, info: dict, key: str, episodes: list[int],
                 timestamps: list[np.ndarray]) -> VideoFrames:  # fmt: skip
    """A video feature's files, checked to exist; ValueError if PyAV is not installed."""
    try:
        import av  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"{root}/meta/info.json: feature {key!r} is a video; decoding it needs PyAV: "
            "pip install av (ttt-gemma[video]), or map only image features in data.image_keys"
        ) from err
    template, chunks = info.get("video_path") or VIDEO_PATH, int(info.get("chunks_size", 1000))
    paths = [root / template.format(episode_chunk=i // chunks, video_key=key, episode_index=i)
             for i in episodes]  # fmt: skip
    missing = [str(p.relative_to(root)) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{root}: video feature {key!r} has no file {missing[0]}")
    return VideoFrames(key, paths, timestamps, float(info.get("fps", 0)))


def read_jsonl(path: Path, fields: dict[str, type], missing: str) -> list[dict]:
    """The entries of a JSON-lines meta file, each with ``fields`` (name -> type); ValueError
    naming the file (``missing`` says what it is for) or the line."""
    if not path.is_file():
        raise ValueError(f"{path.parent.parent}: missing meta/{path.name} ({missing})")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
        if any(not isinstance(entry.get(k), t) for k, t in fields.items()):
            wanted = " and ".join(f"{t.__name__} {k!r}" for k, t in fields.items())
            raise ValueError(f"{path}:{n}: needs {wanted}, got {entry}")
        entries.append(entry)
    return entries


def read_tasks(root: Path) -> dict[int, str]:
    """``meta/tasks.jsonl`` as {task_index: task}; ValueError naming the line if malformed."""
    entries = read_jsonl(root / "meta" / "tasks.jsonl", {"task_index": int, "task": str},
                         "the prompts of a pi0.5 policy")  # fmt: skip
    return {e["task_index"]: e["task"] for e in entries}
