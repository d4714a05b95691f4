"""LeRobot v2 datasets (read with pyarrow, no lerobot dependency): frames, action chunks, norms.

Layout (LeRobot ``codebase_version`` v2.x)::

    ROOT/meta/info.json          fps, total_episodes, chunks_size, data_path, features
    ROOT/meta/episodes.jsonl     one line per episode: {"episode_index": i, "length": n, ...}
    ROOT/meta/stats.json         per feature: mean, std, min, max (and q01, q99 for quantiles)
    ROOT/data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet
                                 one row per frame: observation.state, action, episode_index,
                                 frame_index, timestamp, index, task_index

    ROOT/meta/tasks.jsonl        one line per task: {"task_index": i, "task": "..."}

The state and action columns are always read; camera features (``dtype`` ``image``: PNG/JPEG
bytes in the parquet; ``video``: mp4 files, with PyAV) and the task prompts when asked for (see
:mod:`ttt_gemma.lerobot_media`). A training sample is the state (and images) at frame t and the
actions t .. t + horizon - 1 of the same episode: every frame with t + horizon <= the episode's
length gives one (as openpi and lerobot do away from episode ends).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from .lerobot_media import (
    VideoFrames,
    decode_image,
    encode_png,
    image_column,
    read_jsonl,
    read_tasks,
    video_frames,
)

DATA_PATH = "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet"
NORMALIZATIONS = ("zscore", "quantile", "none")
_LAYOUT = (
    "a LeRobot v2 dataset has meta/info.json, meta/episodes.jsonl, meta/stats.json and "
    "data/chunk-*/episode_*.parquet"
)


@dataclass
class Normalizer:
    """Per-dimension affine normalisation of one feature from the dataset's statistics.

    ``zscore``: ``(x - mean) / (std + 1e-6)``; ``quantile`` (openpi): ``2 (x - q01) / (q99 - q01
    + 1e-6) - 1``, so the 1st..99th percentiles map to [-1, 1]; ``none``: identity.
    """

    mode: str
    offset: Tensor  # (F,): mean or q01
    scale: Tensor  # (F,): std + 1e-6 or (q99 - q01 + 1e-6) / 2

    @classmethod
    def from_stats(cls, stats: dict, key: str, mode: str, dim: int) -> Normalizer:
        if mode not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
        if mode == "none":
            return cls(mode, torch.zeros(dim, device="cpu"), torch.ones(dim, device="cpu"))
        need = ("mean", "std") if mode == "zscore" else ("q01", "q99")
        entry = stats.get(key)
        if not isinstance(entry, dict) or any(n not in entry for n in need):
            raise ValueError(
                f"meta/stats.json: {mode} normalisation of {key!r} needs {list(need)}, found "
                f"{sorted(entry) if isinstance(entry, dict) else None}"
                + ("; use normalization: zscore" if mode == "quantile" else "")
            )
        a, b = (torch.from_numpy(np.asarray(entry[n], dtype=np.float64).reshape(-1)) for n in need)
        if (
            a.shape != (dim,)
            or b.shape != (dim,)
            or not (a.isfinite().all() and b.isfinite().all())
        ):
            raise ValueError(
                f"meta/stats.json: {key}.{need[0]}/{need[1]} must be {dim} finite numbers each, got "
                f"{tuple(a.shape)} and {tuple(b.shape)}"
            )
        if mode == "zscore":
            return cls(mode, a.float(), (b + 1e-6).float())
        return cls(mode, a.float(), ((b - a + 1e-6) / 2).float())

    def normalize(self, x: Tensor) -> Tensor:
        """x [..., F] -> normalised [..., F] (quantile: shifted by one more, to [-1, 1])."""
        y = (x - self.offset.to(x.device)) / self.scale.to(x.device)
        return y - 1.0 if self.mode == "quantile" else y

    def unnormalize(self, y: Tensor) -> Tensor:
        """The inverse of :meth:`normalize`."""
        offset, scale = self.offset.to(y.device), self.scale.to(y.device)
        return ((y + 1.0) if self.mode == "quantile" else y) * scale + offset


@dataclass
class LeRobotFrames:
    """The state and action columns of a whole dataset, frames of all episodes in order.

    Attributes:
        states: [N, S] float32. actions: [N, A] float32.
        episode_starts: [E] first frame of each episode; episode_lengths: [E].
        fps: frames per second; stats: meta/stats.json as read.
        cameras: per image feature read, its frames (encoded images [N] or videos), see :meth:`image`.
        task_index: [N] long, each frame's task (zeros when tasks were not read); tasks: {index: text}.
    """

    root: Path
    states: Tensor
    actions: Tensor
    episode_starts: Tensor
    episode_lengths: Tensor
    fps: float
    stats: dict
    state_key: str
    action_key: str
    cameras: dict[str, list[bytes] | VideoFrames] = field(default_factory=dict)
    task_index: Tensor | None = None
    tasks: dict[int, str] = field(default_factory=dict)

    def image(self, key: str, index: int) -> np.ndarray:
        """Camera ``key``'s frame ``index`` (over the whole dataset) as [H, W, 3] uint8."""
        frames = self.cameras[key]
        if isinstance(frames, VideoFrames):
            episode = int(torch.searchsorted(self.episode_starts, index, right=True)) - 1
            return frames.frame(episode, index - int(self.episode_starts[episode]))
        return decode_image(frames[index], f"{self.root}: {key!r} frame {index}")

    def chunk_starts(self, horizon: int) -> Tensor:
        """Frames t with t + horizon within their episode: [M] long (a sample's state frame)."""
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        starts = [torch.arange(int(s), int(s) + int(n) - horizon + 1, device="cpu")
                  for s, n in zip(self.episode_starts, self.episode_lengths) if n >= horizon]  # fmt: skip
        if not starts:
            longest = int(self.episode_lengths.max())
            raise ValueError(f"horizon {horizon} is longer than every episode (longest {longest})")
        return torch.cat(starts)

    def chunks(self, frames: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
        """(states [M, S], action chunks [M, horizon, A]) for the start frames ``frames`` [M]."""
        idx = frames[:, None] + torch.arange(horizon, device=frames.device)  # (M, horizon)
        return self.states[frames], self.actions[idx]

    def normalizers(self, mode: str) -> tuple[Normalizer, Normalizer]:
        """(state, action) normalisers from meta/stats.json."""
        return (
            Normalizer.from_stats(self.stats, self.state_key, mode, self.states.shape[1]),
            Normalizer.from_stats(self.stats, self.action_key, mode, self.actions.shape[1]),
        )


def _read_json(path: Path):
    if not path.is_file():
        raise ValueError(
            f"{path.parent.parent}: missing {path.parent.name}/{path.name} ({_LAYOUT})"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _read_episodes(path: Path) -> list[dict]:
    episodes = read_jsonl(path, {"episode_index": int, "length": int}, _LAYOUT)
    indices = [ep["episode_index"] for ep in episodes]
    if indices != list(range(len(episodes))):
        gaps = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise ValueError(
            f"{path}: episode indices must be 0..{len(episodes) - 1} in order; got "
            f"{indices[:10]}{'...' if len(indices) > 10 else ''} (missing {gaps[:10]})"
        )
    return episodes


def _vectors(table: pa.Table, key: str, path: Path) -> np.ndarray:
    """A list-of-floats (or float) column as [rows, F] float32."""
    if key not in table.column_names:
        raise ValueError(f"{path}: no column {key!r}; columns are {table.column_names}")
    col = table.column(key).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
        sizes = np.diff(col.offsets.to_numpy()) if pa.types.is_list(col.type) else None
        if sizes is not None and len(sizes) and (sizes != sizes[0]).any():
            raise ValueError(f"{path}: column {key!r} has rows of different lengths")
        values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        return values.reshape(len(col), -1)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    raise ValueError(f"{path}: column {key!r} has type {col.type}, expected a list of floats")


def read_lerobot(
    root: str | os.PathLike,
    state_key: str = "observation.state",
    action_key: str = "action",
    image_keys: tuple[str, ...] | list[str] = (),
    tasks: bool = False,
) -> LeRobotFrames:
    """Read a LeRobot v2 dataset's states and actions (and cameras, tasks), checking its layout.

    Args:
        image_keys: camera features to read (``dtype`` ``image`` or ``video`` in meta/info.json).
        tasks: read meta/tasks.jsonl and every frame's ``task_index``.

    Raises ValueError naming the file for: a missing meta file, a codebase version other than
    v2.x, an episode list with gaps or out of order, a missing episode file, a missing or
    mis-shaped column, frame indices that are not 0..length-1, non-finite values, a camera key
    that is not an image/video feature, an image column that is not PNG/JPEG bytes of the shape
    meta/info.json gives, a task index without a task.
    """
    root = Path(root)
    info = _read_json(root / "meta" / "info.json")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v2"):
        raise ValueError(f"{root}/meta/info.json: codebase_version {version!r}, expected v2.x")
    episodes = _read_episodes(root / "meta" / "episodes.jsonl")
    stats = _read_json(root / "meta" / "stats.json")
    if info.get("total_episodes", len(episodes)) != len(episodes):
        raise ValueError(
            f"{root}/meta/info.json: total_episodes {info['total_episodes']} but "
            f"episodes.jsonl lists {len(episodes)}"
        )
    features = info.get("features", {})
    for key in (state_key, action_key):
        if key not in features:
            raise ValueError(
                f"{root}/meta/info.json: no feature {key!r}; features are {sorted(features)}"
            )
    _check_camera_features(root, features, image_keys)
    task_names = read_tasks(root) if tasks else {}
    template, chunks_size = info.get("data_path", DATA_PATH), int(info.get("chunks_size", 1000))
    states, actions, starts, lengths, start = [], [], [], [], 0
    encoded = {k: [] for k in image_keys if features[k]["dtype"] == "image"}
    timestamps, task_index = [], []
    for ep in episodes:
        i, n = ep["episode_index"], ep["length"]
        path = root / template.format(episode_chunk=i // chunks_size, episode_index=i)
        if not path.is_file():
            raise ValueError(f"{root}: episode {i} has no data file {path.relative_to(root)}")
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise ValueError(f"{path}: not a readable parquet file ({err})") from err
        s, a = _vectors(table, state_key, path), _vectors(table, action_key, path)
        for key, arr in ((state_key, s), (action_key, a)):
            want = int(math.prod(features[key].get("shape", [arr.shape[1]])))
            if arr.shape != (n, want):
                raise ValueError(
                    f"{path}: column {key!r} is {arr.shape}, meta says {n} frames of {want}"
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"{path}: column {key!r} has NaN or Inf values")
        for key, want in (("episode_index", np.full(n, i)), ("frame_index", np.arange(n))):
            if key in table.column_names and not np.array_equal(table.column(key).to_numpy(), want):
                raise ValueError(f"{path}: column {key!r} must be {want[:3]}... for episode {i}")
        for key in encoded:
            images = image_column(table, key, path)
            _check_image_shape(decode_image(images[0], f"{path}: {key!r} row 0"),
                               features[key], f"{path}: column {key!r}")  # fmt: skip
            encoded[key] += images
        if len(encoded) < len(image_keys):  # videos: frame times from the parquet
            timestamps.append(_vectors(table, "timestamp", path)[:, 0])
        if tasks:
            task_index.append(_task_column(table, path, n, task_names))
        states.append(torch.from_numpy(s))
        actions.append(torch.from_numpy(a))
        starts.append(start)
        lengths.append(n)
        start += n
    cameras = {key: encoded[key] if key in encoded else
               video_frames(root, info, key, list(range(len(episodes))), timestamps)
               for key in image_keys}  # fmt: skip
    n_frames, cpu = sum(lengths), torch.device("cpu")  # the frames' device, whatever the default
    no_tasks = torch.zeros(n_frames, dtype=torch.long, device=cpu)
    return LeRobotFrames(root, torch.cat(states), torch.cat(actions),
                         torch.tensor(starts, device=cpu), torch.tensor(lengths, device=cpu),
                         float(info.get("fps", 0)), stats, state_key, action_key, cameras,
                         torch.cat(task_index) if tasks else no_tasks, task_names)  # fmt: skip


def _check_camera_features(root: Path, features: dict, image_keys) -> None:
    """Every requested camera key is an ``image`` or ``video`` feature of meta/info.json."""
    cameras = sorted(k for k, f in features.items() if f.get("dtype") in ("image", "video"))
    for key in image_keys:
        if features.get(key, {}).get("dtype") not in ("image", "video"):
            raise ValueError(
                f"{root}/meta/info.json: no image or video feature {key!r}; its camera features "
                f"are {cameras} (set data.image_keys to those)"
            )


def _check_image_shape(image: np.ndarray, feature: dict, where: str) -> None:
    """A decoded [H, W, 3] image against the feature's ``shape`` (HWC, or CHW when its
    ``names`` start with the channel)."""
    shape = list(feature.get("shape", image.shape))
    names = feature.get("names") or []
    if names and str(names[0]).startswith("channel"):
        shape = shape[1:] + shape[:1]
    if list(image.shape) != shape:
        raise ValueError(f"{where}: images are {list(image.shape)} (H, W, C), meta says {shape}")


def _task_column(table: pa.Table, path: Path, n: int, tasks: dict[int, str]) -> Tensor:
    """The ``task_index`` column [n], each index one of meta/tasks.jsonl."""
    if "task_index" not in table.column_names:
        raise ValueError(f"{path}: no column 'task_index' (each frame's prompt)")
    index = table.column("task_index").to_numpy().astype(np.int64)
    unknown = sorted(set(index.tolist()) - set(tasks))
    if len(index) != n or unknown:
        raise ValueError(
            f"{path}: task_index {unknown[:5]} not in meta/tasks.jsonl {sorted(tasks)}"
        )
    return torch.from_numpy(index)


def write_lerobot(
    root: str | os.PathLike,
    episodes: list[dict[str, np.ndarray]],
    *,
    fps: float,
    state_key: str = "observation.state",
    action_key: str = "action",
    image_keys: tuple[str, ...] | list[str] = (),
    robot_type: str = "unknown",
    task: str | list[str] = "",
    chunks_size: int = 1000,
) -> Path:
    """Write episodes ({state_key: [n, S], action_key: [n, A]} arrays, and per camera of
    ``image_keys`` [n, H, W, 3] uint8 frames) as a LeRobot v2 dataset.

    Cameras are ``image`` features: one PNG per frame in the parquet (``{bytes, path}`` structs).
    ``task``: one prompt for every episode or one per episode (meta/tasks.jsonl, ``task_index``).
    Stats (mean, std, min, max, q01, q99 per dimension over all frames) of the state and action
    go to meta/stats.json. The folder must not exist yet or be empty. Returns the root."""
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root}: exists and is not empty; choose a new folder")
    episode_tasks = [task] * len(episodes) if isinstance(task, str) else list(task)
    if len(episode_tasks) != len(episodes):
        raise ValueError(f"task: one string or one per episode ({len(episodes)}), got {len(task)}")
    task_ids = {t: i for i, t in enumerate(dict.fromkeys(episode_tasks))}
    (root / "meta").mkdir(parents=True, exist_ok=True)
    all_frames = {state_key: [], action_key: []}
    index = 0
    for i, ep in enumerate(episodes):
        n = len(ep[action_key])
        columns = {key: np.asarray(ep[key], dtype=np.float32) for key in all_frames}
        for key, arr in columns.items():
            if arr.ndim != 2 or len(arr) != n:
                raise ValueError(f"episodes[{i}][{key!r}]: expected [{n}, F], got {arr.shape}")
            all_frames[key].append(arr)
        table = pa.table({
            **{key: pa.array(list(arr), type=pa.list_(pa.float32())) for key, arr in columns.items()},
            "timestamp": pa.array(np.arange(n, dtype=np.float32) / fps),
            "frame_index": pa.array(np.arange(n, dtype=np.int64)),
            "episode_index": pa.array(np.full(n, i, dtype=np.int64)),
            "index": pa.array(np.arange(index, index + n, dtype=np.int64)),
            "task_index": pa.array(np.full(n, task_ids[episode_tasks[i]], dtype=np.int64)),
            **{key: _image_structs(ep[key], n, f"episodes[{i}][{key!r}]") for key in image_keys},
        })  # fmt: skip
        path = root / DATA_PATH.format(episode_chunk=i // chunks_size, episode_index=i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        index += n
    stats = {}
    for key, arrays in all_frames.items():
        x = np.concatenate(arrays).astype(np.float64)
        stats[key] = {
            name: getattr(np, name)(x, axis=0).tolist() for name in ("mean", "std", "min", "max")
        }
        stats[key].update(
            q01=np.quantile(x, 0.01, axis=0).tolist(), q99=np.quantile(x, 0.99, axis=0).tolist()
        )
    feature = lambda key: {
        "dtype": "float32",
        "shape": [all_frames[key][0].shape[1]],
        "names": None,
    }
    cameras = {key: {"dtype": "image", "shape": list(np.shape(episodes[0][key])[1:]),
                     "names": ["height", "width", "channel"]} for key in image_keys}  # fmt: skip
    info = {
        "codebase_version": "v2.1",
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": index,
        "total_tasks": len(task_ids),
        "chunks_size": chunks_size,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": DATA_PATH,
        "features": {state_key: feature(state_key), action_key: feature(action_key), **cameras},
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    (root / "meta" / "stats.json").write_text(json.dumps(stats, indent=2))
    lines = [json.dumps({"episode_index": i, "tasks": [t], "length": len(ep[action_key])})
             for i, (ep, t) in enumerate(zip(episodes, episode_tasks))]  # fmt: skip
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    lines = [json.dumps({"task_index": i, "task": t}) for t, i in task_ids.items()]
    (root / "meta" / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _image_structs(frames: np.ndarray, n: int, where: str) -> pa.Array:
    """[n, H, W, 3] uint8 frames -> LeRobot's image column: ``{bytes: PNG, path: null}`` structs."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != n or frames.shape[3] != 3:
        raise ValueError(
            f"{where}: expected [{n}, H, W, 3] uint8, got {frames.dtype} {frames.shape}"
        )
    structs = [{"bytes": encode_png(f), "path": None} for f in frames]
    return pa.array(structs, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
