"""The LeRobot v2 reader: values, chunks and normalisation against hand-made files; bad layouts."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ttt_gemma.lerobot import Normalizer, read_lerobot, write_lerobot

LENGTHS = (7, 3, 9)  # episode 1 is shorter than the horizon below
S, A = 3, 2


def _episode_arrays(i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame f of episode i: state [100 i + f, ...], action [10 i + f, -f] (easy to recognise)."""
    f = np.arange(n, dtype=np.float32)
    state = np.stack([100 * i + f, f * 0.5, np.full(n, i, np.float32)], 1)
    action = np.stack([10 * i + f, -f], 1)
    return state, action


def make_dataset(root, lengths=LENGTHS, chunks_size=2):
    """A LeRobot v2 dataset written by hand (pyarrow), independent of write_lerobot."""
    (root / "meta").mkdir(parents=True)
    info = {
        "codebase_version": "v2.0", "fps": 10, "total_episodes": len(lengths),
        "chunks_size": chunks_size,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "features": {"observation.state": {"dtype": "float32", "shape": [S]},
                     "action": {"dtype": "float32", "shape": [A]}},
    }  # fmt: skip
    (root / "meta" / "info.json").write_text(json.dumps(info))
    eps = [json.dumps({"episode_index": i, "length": n}) for i, n in enumerate(lengths)]
    (root / "meta" / "episodes.jsonl").write_text("\n".join(eps) + "\n")
    stats = {
        "observation.state": {"mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 0.5]},
        "action": {"mean": [0.5, -1.0], "std": [3.0, 1.0], "q01": [-2.0, -4.0], "q99": [2.0, 0.0]},
    }
    (root / "meta" / "stats.json").write_text(json.dumps(stats))
    for i, n in enumerate(lengths):
        state, action = _episode_arrays(i, n)
        d = root / "data" / f"chunk-{i // chunks_size:03d}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "observation.state": [list(map(float, r)) for r in state],
            "action": [list(map(float, r)) for r in action],
            "episode_index": np.full(n, i), "frame_index": np.arange(n),
        }), d / f"episode_{i:06d}.parquet")  # fmt: skip
    return root


def test_reads_frames_in_episode_order(tmp_path):
    frames = read_lerobot(make_dataset(tmp_path))
    assert frames.states.shape == (sum(LENGTHS), S) and frames.actions.shape == (sum(LENGTHS), A)
    assert frames.episode_starts.tolist() == [0, 7, 10] and frames.fps == 10
    for i, n in enumerate(LENGTHS):
        s, a = _episode_arrays(i, n)
        start = int(frames.episode_starts[i])
        assert torch.equal(frames.states[start : start + n], torch.from_numpy(s))
        assert torch.equal(frames.actions[start : start + n], torch.from_numpy(a))


def test_action_chunks_stay_inside_their_episode(tmp_path):
    frames = read_lerobot(make_dataset(tmp_path))
    H = 5
    starts = frames.chunk_starts(H)
    # episode 0 (7 frames): t = 0..2; episode 1 (3 frames): none; episode 2 (9): t = 0..4
    assert starts.tolist() == [0, 1, 2, 10, 11, 12, 13, 14]
    states, chunks = frames.chunks(starts, H)
    assert chunks.shape == (8, H, A)
    for m, frame in enumerate(starts.tolist()):
        ep = 0 if frame < 7 else 2
        t = frame - (0 if ep == 0 else 10)
        want = torch.tensor([[10.0 * ep + t + j, -(t + j)] for j in range(H)])
        assert torch.equal(chunks[m], want), m
        assert states[m, 0].item() == 100 * ep + t
    with pytest.raises(ValueError, match="longer than every episode"):
        frames.chunk_starts(10)


def test_normalisers_follow_the_stats(tmp_path):
    frames = read_lerobot(make_dataset(tmp_path))
    x = torch.tensor([[3.0, 2.0], [-2.0, -4.0], [2.0, 0.0]])
    z = Normalizer.from_stats(frames.stats, "action", "zscore", A)
    torch.testing.assert_close(
        z.normalize(x), (x - torch.tensor([0.5, -1.0])) / torch.tensor([3.0, 1.0])
    )
    q = Normalizer.from_stats(frames.stats, "action", "quantile", A)
    torch.testing.assert_close(
        q.normalize(x)[1:], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-5, rtol=0
    )
    for norm in (z, q):
        torch.testing.assert_close(norm.unnormalize(norm.normalize(x)), x)
    with pytest.raises(ValueError, match=r"needs \['q01', 'q99'\].*zscore"):
        frames.normalizers("quantile")  # the state has no quantiles
    with pytest.raises(ValueError, match="normalization"):
        frames.normalizers("minmax")


@pytest.mark.parametrize("name", ["info.json", "episodes.jsonl", "stats.json"])
def test_missing_meta_file(tmp_path, name):
    root = make_dataset(tmp_path)
    (root / "meta" / name).unlink()
    with pytest.raises(ValueError, match=rf"missing meta/{name}"):
        read_lerobot(root)


def test_wrong_column(tmp_path):
    root = make_dataset(tmp_path)
    with pytest.raises(ValueError, match="no feature 'actions'"):
        read_lerobot(root, action_key="actions")
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["actions"] = info["features"]["action"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"episode_000000\.parquet: no column 'actions'"):
        read_lerobot(root, action_key="actions")
    info["features"]["action"]["shape"] = [3]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="meta says 7 frames of 3"):
        read_lerobot(root)


def test_episode_index_gaps(tmp_path):
    root = make_dataset(tmp_path)
    lines = (root / "meta" / "episodes.jsonl").read_text().splitlines()
    (root / "meta" / "episodes.jsonl").write_text("\n".join([lines[0], lines[2]]))
    with pytest.raises(ValueError, match=r"episode indices.*missing \[1\]"):
        read_lerobot(root)


def test_missing_episode_file_and_bad_frame_index(tmp_path):
    root = make_dataset(tmp_path)
    path = root / "data" / "chunk-001" / "episode_000002.parquet"
    table = pq.read_table(path)
    path.unlink()
    with pytest.raises(ValueError, match="episode 2 has no data file"):
        read_lerobot(root)
    frame = np.arange(9)
    frame[4] = 5
    pq.write_table(table.set_column(3, "frame_index", pa.array(frame)), path)
    with pytest.raises(ValueError, match="'frame_index'"):
        read_lerobot(root)


def test_writer_round_trip(tmp_path):
    episodes = []
    for i, n in enumerate(LENGTHS):
        s, a = _episode_arrays(i, n)
        episodes.append({"observation.state": s, "action": a})
    root = write_lerobot(tmp_path / "ds", episodes, fps=10, task="test")
    frames = read_lerobot(root)
    assert torch.equal(
        frames.states, torch.from_numpy(np.concatenate([e["observation.state"] for e in episodes]))
    )
    assert torch.equal(
        frames.actions, torch.from_numpy(np.concatenate([e["action"] for e in episodes]))
    )
    all_actions = np.concatenate([e["action"] for e in episodes]).astype(np.float64)
    np.testing.assert_allclose(frames.stats["action"]["std"], all_actions.std(0))
    np.testing.assert_allclose(
        frames.stats["action"]["q99"], np.percentile(all_actions, 99, axis=0)
    )
    with pytest.raises(ValueError, match="not empty"):
        write_lerobot(root, episodes, fps=10)
    shutil.rmtree(root)
