"""The demo's simulated task (MuJoCo Reacher-v5), its scripted expert, and a short demo run."""

import json

import numpy as np
import pytest

from ttt_gemma.demo import VARIANTS, main
from ttt_gemma.lerobot import read_lerobot
from ttt_gemma.reacher import (
    CAMERA,
    EPISODE_STEPS,
    OBS_DIM,
    closed_loop_distance,
    collect_episodes,
    render,
    scripted_expert,
)


def test_scripted_expert_reaches_the_target():
    start = closed_loop_distance(lambda obs: np.zeros((obs.shape[0], 1, 2)), 10, execute=1)
    expert = closed_loop_distance(lambda obs: scripted_expert(obs)[:, None], 10, execute=1)
    assert expert < 0.1 * start


def test_episodes_are_the_experts_actions_on_its_observations():
    eps = collect_episodes(3, seed=3, num_envs=3)
    assert len(eps) == 3
    for ep in eps:
        obs, act = ep["observation.state"], ep["action"]
        assert obs.shape == (EPISODE_STEPS, OBS_DIM) and act.shape == (EPISODE_STEPS, 2)
        np.testing.assert_allclose(act, scripted_expert(obs.astype(np.float64)), atol=1e-6)
    assert not np.allclose(eps[0]["observation.state"], eps[1]["observation.state"])


def test_demo_trains_through_the_cli_and_writes_outputs(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--steps", "3", "--camera-steps", "3", "--batch", "8",
            "--train-episodes", "4",
            "--test-episodes", "2", "--closed-loop-episodes", "2"]  # fmt: skip
    summary = main(args)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["results"].keys() == summary["results"].keys() == set(VARIANTS)
    for r in saved["results"].values():
        assert np.isfinite(r["flow_matching_loss"]) and np.isfinite(r["sampled_action_mse"])
    for kind in ("", "pi0.5 with camera, "):
        assert saved["results"][kind + "without TTT"]["mean_abs_ttt_gate"] is None
        for name in ("TTT on the residual stream", "TTT on the attention output"):
            assert saved["results"][kind + name]["mean_abs_ttt_gate"] > 0  # opened from 0
    whole = saved["results"]["pi0.5 with camera, without TTT"]["parameters"]
    assert whole > saved["results"]["without TTT"]["parameters"]  # the VLM is in it
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    # the rollouts, as a LeRobot v2 dataset with the camera drawn from the simulator's state
    frames = read_lerobot(tmp_path / "dataset", image_keys=[CAMERA], tasks=True)
    assert frames.states.shape == (4 * EPISODE_STEPS, OBS_DIM)
    assert np.array_equal(frames.image(CAMERA, 7), render(frames.states[7:8].numpy(), 32)[0])
    assert frames.tasks == {0: "reach the target"}
    for folder in ("without_ttt", "ttt_on_the_residual_stream", "ttt_on_the_attention_output",
                   "pi05_camera_without_ttt", "pi05_camera_ttt_on_the_residual_stream",
                   "pi05_camera_ttt_on_the_attention_output"):  # fmt: skip
        run = tmp_path / "runs" / folder
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
        assert (run / "model.safetensors").is_file() and (run / "checkpoint.pt").is_file()
    with pytest.raises(SystemExit) as exit_:  # an earlier demo is never mixed in
        main(args)
    assert exit_.value.code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--train-episodes", "0", "must be >= 1, got 0"),
        ("--threads", "0", "must be >= 1, got 0"),
        ("--horizon", "0", f"must be in [1, {EPISODE_STEPS}], got 0"),
        ("--horizon", str(EPISODE_STEPS + 1), f"must be in [1, {EPISODE_STEPS}]"),
        ("--steps", "0", "must be >= 1, got 0"),
        ("--steps", "x", "invalid int value: 'x'"),
        ("--lr", "-1", "must be > 0, got -1"),
    ],
)
def test_bad_demo_arguments_are_usage_errors(tmp_path, capsys, flag, value, message):
    """Refused by the argument parser (one line, exit status 2) before anything is collected or
    written."""
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out), flag, value])
    assert exit_.value.code == 2
    assert f"error: argument {flag}: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_camera_image_shows_the_arm_reaching_the_target():
    """The drawn fingertip (black) is where forward kinematics puts it, the target (red) where
    the observation says; when the expert has reached it they coincide."""
    obs = collect_episodes(1, seed=5, num_envs=1)[0]["observation.state"].astype(np.float64)
    images = render(obs, 32)

    def pixel_of(xy):  # metres -> (row, column) of the 32 x 32 image over [-0.22, 0.22]^2
        col, row = (xy[0] + 0.22) / 0.44 * 32, (0.22 - xy[1]) / 0.44 * 32
        return int(row), int(col)

    for img, o in ((images[0], obs[0]), (images[-1], obs[-1])):
        tip = o[4:6] + o[8:10]  # target + (tip - target)
        assert (img[pixel_of(tip)] == 0).all()  # black fingertip
    first = images[0]
    assert (first[pixel_of(obs[0, 4:6])] == (220, 30, 30)).all()  # red target, not yet reached
    assert np.linalg.norm(obs[-1, 8:10]) < 0.02  # the expert reached it: the tip covers it
