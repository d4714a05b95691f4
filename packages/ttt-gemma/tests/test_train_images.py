"""``ttt-gemma train`` on the whole pi0.5 policy: a tiny LeRobot v2 dataset with camera images
(PNG in the parquet, and mp4 videos) trains through the CLI; resume is exact; the reader refuses
malformed image columns and unknown cameras by name."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ttt_gemma.cli import main
from ttt_gemma.lerobot import read_lerobot, write_lerobot
from ttt_gemma.word_tokenizer import build_word_tokenizer

TASKS = ["push the red block", "lift_the cup"]
CONFIG = """
data:
  root: {root}
  normalization: quantile
  tokenizer: {tokenizer}
  max_token_len: 20
  image_keys: {{base_0_rgb: observation.images.top, left_wrist_0_rgb: observation.images.wrist}}
model:
  expert: {{width: 32, depth: 2, mlp_dim: 48, num_heads: 2, head_dim: 8, action_dim: 3,
           action_horizon: 4, use_ttt: true, ttt: {{input: {placement}}}}}
  vlm: {{vision_width: 16, vision_mlp_dim: 32, vision_depth: 1, vision_heads: 2, patch_size: 14,
        image_size: 28, width: 24, depth: 2, mlp_dim: 40, num_heads: 2, num_kv_heads: 1,
        head_dim: 8, vocab_size: 300}}
train: {{steps: 5, batch_size: 3, lr: 3e-3, warmup_steps: 1, ckpt_every: 10, threads: 1,
        trainable: {trainable}}}
run: {{root: {runs}, name: {name}}}
"""


def episodes(rng, lengths=(7, 9, 6)):
    """Three episodes: 2-d state, 2-d actions, a 24 x 32 top camera and a 20 x 20 wrist camera."""
    out = []
    for n in lengths:
        top = rng.integers(0, 256, size=(n, 24, 32, 3), dtype=np.uint8)
        wrist = rng.integers(0, 256, size=(n, 20, 20, 3), dtype=np.uint8)
        out.append({"observation.state": rng.normal(size=(n, 2)).astype(np.float32),
                    "action": np.cumsum(rng.normal(size=(n, 2)), 0).astype(np.float32),
                    "observation.images.top": top, "observation.images.wrist": wrist})  # fmt: skip
    return out


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("images") / "ds"
    data = episodes(np.random.default_rng(0))
    write_lerobot(root, data, fps=10, image_keys=("observation.images.top",
                  "observation.images.wrist"), task=[TASKS[0], TASKS[1], TASKS[0]])  # fmt: skip
    return root, data


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_word_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", TASKS)


def write_config(tmp_path, root, tokenizer, name, placement="residual", trainable="all"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(root=root, tokenizer=tokenizer, runs=tmp_path / "runs",
                                  name=name, placement=placement, trainable=trainable))  # fmt: skip
    return path


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_reader_returns_the_written_images_and_tasks(image_dataset):
    root, data = image_dataset
    frames = read_lerobot(root, image_keys=["observation.images.top"], tasks=True)
    assert frames.tasks == {0: TASKS[0], 1: TASKS[1]}
    assert frames.task_index.tolist() == [0] * 7 + [1] * 9 + [0] * 6
    for index, (ep, t) in [(0, (0, 0)), (12, (1, 5)), (21, (2, 5))]:  # PNG is lossless
        assert np.array_equal(frames.image("observation.images.top", index),
                              data[ep]["observation.images.top"][t])  # fmt: skip


@pytest.mark.parametrize("placement", ["residual", "attn_output"])
def test_whole_policy_trains_and_resumes_exactly(tmp_path, image_dataset, tokenizer_dir, placement):
    root, _ = image_dataset
    whole = write_config(tmp_path, root, tokenizer_dir, "whole", placement)
    assert main(["train", "--config", str(whole), "--no-progress"]) == 0
    cut = write_config(tmp_path, root, tokenizer_dir, "cut", placement)
    assert main(["train", "--config", str(cut), "--no-progress", "--stop-at", "2"]) == 0
    assert main(["train", "--config", str(cut), "--no-progress", "--resume"]) == 0
    runs = tmp_path / "runs"
    first = losses(runs / "whole")
    assert len(first) == 5 and all(np.isfinite(first)) and len(set(first)) == 5
    assert losses(runs / "cut") == first  # bit-identical after the stop and resume
    from safetensors.torch import load_file

    a, b = (
        load_file(runs / "whole" / "model.safetensors"),
        load_file(runs / "cut" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("prefix.paligemma.model.vision_tower.") for k in a)


def test_freeze_vlm_leaves_paligemma_unchanged(tmp_path, image_dataset, tokenizer_dir):
    from safetensors.torch import load_file

    from ttt_gemma.train import make_policy
    from ttt_gemma.train_config import load_config

    root, _ = image_dataset
    path = write_config(tmp_path, root, tokenizer_dir, "frozen", trainable="freeze_vlm")
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    cfg = load_config(path)
    torch.manual_seed(cfg.train.seed)
    start = make_policy(cfg, 2).state_dict()  # the run's initialisation (same seed)
    end = load_file(tmp_path / "runs" / "frozen" / "model.safetensors")
    vlm = [k for k in start if k.startswith("prefix.")]
    assert vlm and all(torch.equal(start[k], end[k]) for k in vlm)
    assert not torch.equal(
        start["policy.action_in_proj.weight"], end["policy.action_in_proj.weight"]
    )


def test_missing_camera_key_is_named(tmp_path, image_dataset, tokenizer_dir):
    root, _ = image_dataset
    with pytest.raises(ValueError, match=r"no image or video feature 'observation.images\.side'.*"
                       r"observation\.images\.top"):  # fmt: skip
        read_lerobot(root, image_keys=["observation.images.side"])
    cfg = write_config(tmp_path, root, tokenizer_dir, "bad")
    cfg.write_text(cfg.read_text().replace("observation.images.wrist", "observation.images.side"))
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2


def test_a_vocabulary_larger_than_the_vlms_is_refused(tmp_path, image_dataset, tokenizer_dir):
    from ttt_gemma.train import Batches, read_frames
    from ttt_gemma.train_config import load_config

    root, _ = image_dataset
    path = write_config(tmp_path, root, tokenizer_dir, "small_vocab")
    path.write_text(path.read_text().replace("vocab_size: 300", "vocab_size: 100"))
    cfg = load_config(path)
    with pytest.raises(ValueError, match=r"model\.vlm\.vocab_size \(100\) is smaller than the "
                       r"tokenizer's vocabulary \(2\d\d"):  # fmt: skip
        Batches(read_frames(cfg), cfg)


def _rewrite_column(root, tmp_path, key, array) -> "Path":  # noqa: F821
    """A copy of the dataset whose episode 0 has ``array`` as column ``key``."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    path = copy / "data/chunk-000/episode_000000.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.column_names.index(key), key, array)
    pq.write_table(table, path)
    return copy


@pytest.mark.parametrize(
    "column, message",
    [
        (pa.array([[1.0, 2.0]] * 7), r"has type list<.*double>; an image feature is stored"),
        (pa.array([{"bytes": b"not a png", "path": None}] * 7), r"not a readable PNG/JPEG image"),
        (
            pa.array(
                [{"bytes": b"\x89PNG" if i != 3 else None, "path": "x.png"} for i in range(7)],
                type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
            r"no image bytes in rows \[3\]",
        ),
    ],
    ids=["list-of-floats", "garbage-bytes", "null-bytes"],
)
def test_malformed_image_column_is_refused(tmp_path, image_dataset, column, message):
    root, _ = image_dataset
    bad = _rewrite_column(root, tmp_path, "observation.images.top", column)
    with pytest.raises(ValueError, match=message):
        read_lerobot(bad, image_keys=["observation.images.top"])


def test_image_of_the_wrong_size_is_refused(tmp_path, image_dataset):
    root, _ = image_dataset
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.images.top"]["shape"] = [32, 24, 3]
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"images are \[24, 32, 3\].*meta says \[32, 24, 3\]"):
        read_lerobot(copy, image_keys=["observation.images.top"])


def write_video(path, frames: np.ndarray, fps: int) -> None:
    """[n, H, W, 3] uint8 frames as an H.264 mp4 (lerobot's layout, yuv444p: small images)."""
    import av  # the video tests' dependency (ttt-gemma[test]): without it they fail, not the module

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv444p"
        # lossless, a key frame every 4th frame: frames 5 and 7 are reached by seeking to a key
        # frame before them and decoding forward
        stream.options = {"qp": "0", "g": "4", "keyint_min": "4", "sc_threshold": "0"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def video_dataset(tmp_path_factory, image_dataset):
    """The image dataset with its top camera moved to mp4 videos (a ``video`` feature)."""
    import shutil

    root, data = image_dataset
    copy = tmp_path_factory.mktemp("video") / "ds"
    shutil.copytree(root, copy)
    key = "observation.images.top"
    for i, ep in enumerate(data):
        path = copy / f"data/chunk-000/episode_{i:06d}.parquet"
        pq.write_table(pq.read_table(path).drop_columns([key]), path)
        write_video(copy / f"videos/chunk-000/{key}/episode_{i:06d}.mp4", ep[key], fps=10)
    info = json.loads((copy / "meta/info.json").read_text())
    info["features"][key]["dtype"] = "video"
    info["video_path"] = (
        "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4"
    )
    (copy / "meta/info.json").write_text(json.dumps(info))
    return copy, data


def test_video_frames_are_the_frames_at_their_timestamps(video_dataset):
    import av

    root, data = video_dataset
    frames = read_lerobot(root, image_keys=["observation.images.top"])
    key = "observation.images.top"
    for index, (ep, t) in [(0, (0, 0)), (12, (1, 5)), (14, (1, 7)), (15, (1, 8)), (21, (2, 5))]:
        got = frames.image(key, index).astype(np.int16)
        # every decoded frame of that episode's file, in order (an independent read)
        with av.open(str(root / f"videos/chunk-000/{key}/episode_{ep:06d}.mp4")) as f:
            decoded = [x.to_ndarray(format="rgb24") for x in f.decode(video=0)]
        assert np.array_equal(got, decoded[t])
        assert np.abs(got - data[ep][key][t]).mean() < 3  # yuv444 rounding only


def test_video_feature_trains(tmp_path, video_dataset, tokenizer_dir):
    root, _ = video_dataset
    cfg = write_config(tmp_path, root, tokenizer_dir, "video")
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
    assert all(np.isfinite(losses(tmp_path / "runs" / "video")))


def test_ttt_only_from_a_pi05_checkpoint_keeps_every_other_weight(tmp_path, image_dataset,
                                                                   tokenizer_dir):  # fmt: skip
    """init_pi05 loads the whole openpi-named file (VLM included); trainable: ttt changes only
    the TTT branches, so every other tensor of the result is the file's."""
    from safetensors.torch import load_file

    from ttt_gemma.checkpoint import save_pi05
    from ttt_gemma.train import make_policy
    from ttt_gemma.train_config import load_config

    root, _ = image_dataset
    path = write_config(tmp_path, root, tokenizer_dir, "ttt_only", trainable="ttt")
    torch.manual_seed(123)  # another initialisation than the run's seed
    source = make_policy(load_config(path), 2)
    save_pi05(source, tmp_path / "pi05.safetensors")
    path.write_text(path.read_text().replace(
        "model:\n", f"model:\n  init_pi05: {tmp_path / 'pi05.safetensors'}\n"))  # fmt: skip
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    end = load_file(tmp_path / "runs" / "ttt_only" / "model.safetensors")
    start = source.state_dict()
    ttt = [k for k in start if ".ttt." in k]
    assert ttt and all(torch.equal(start[k], end[k]) for k in start if k not in ttt)
    torch.manual_seed(0)  # the run's seed: its TTT branches start from this (not in the file)
    ttt_init = make_policy(load_config(path), 2).state_dict()
    assert any(not torch.equal(ttt_init[k], end[k]) for k in ttt)  # and they trained


def test_pure_bf16_whole_policy_trains(tmp_path, image_dataset, tokenizer_dir):
    root, _ = image_dataset
    path = write_config(tmp_path, root, tokenizer_dir, "bf16")
    path.write_text(path.read_text().replace("trainable: all", "trainable: all, precision: bf16"))
    assert main(["train", "--config", str(path), "--no-progress"]) == 0
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "runs" / "bf16" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert all(np.isfinite(losses(tmp_path / "runs" / "bf16")))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda root: (root / "meta/tasks.jsonl").unlink(), r"missing meta/tasks\.jsonl"),
        (
            lambda root: (root / "meta/tasks.jsonl").write_text('{"task_index": 0}\n'),
            r"tasks\.jsonl:1: needs int 'task_index' and str 'task'",
        ),
        (
            lambda root: (root / "meta/tasks.jsonl").write_text('{"task_index": 0, "task": "a"}\n'),
            r"task_index \[1\] not in meta/tasks\.jsonl \[0\]",
        ),
    ],
    ids=["no-tasks-file", "task-without-text", "unknown-task-index"],
)
def test_malformed_tasks_are_refused(tmp_path, image_dataset, change, message):
    import shutil

    root, _ = image_dataset
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    change(copy)
    with pytest.raises(ValueError, match=message):
        read_lerobot(copy, tasks=True)


@pytest.mark.cpu_only(
    "two gloo processes on the CPU against one run in this process: the device switch does not "
    "reach spawned processes, and weights drawn on the GPU differ from the CPU's"
)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_whole_policy_on_two_gloo_processes_equals_one(tmp_path, image_dataset, tokenizer_dir,
                                                        parallel):  # fmt: skip
    import os
    import subprocess
    import sys

    root, _ = image_dataset
    paths = {}
    for name in ("one", "two"):
        paths[name] = write_config(tmp_path, root, tokenizer_dir, name)
        paths[name].write_text(paths[name].read_text().replace(
            "batch_size: 3", f"batch_size: 4, parallel: {parallel}"))  # fmt: skip
    assert main(["train", "--config", str(paths["one"]), "--no-progress"]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29700 + os.getpid() % 1000), "-m", "ttt_gemma.cli", "train",
           "--config", str(paths["two"]), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = tmp_path / "runs"
    np.testing.assert_allclose(losses(runs / "two"), losses(runs / "one"), rtol=2e-5, atol=0)
