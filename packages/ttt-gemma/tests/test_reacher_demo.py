"""The demo's simulated task (MuJoCo Reacher-v5), its scripted expert, and a short demo run."""

import json

import numpy as np
import torch

from ttt_gemma.demo import main
from ttt_gemma.reacher import (
    EPISODE_STEPS,
    closed_loop_distance,
    collect_chunks,
    obs_to_tokens,
    scripted_expert,
)


def test_scripted_expert_reaches_the_target():
    start = closed_loop_distance(lambda obs: np.zeros((obs.shape[0], 1, 2)), 10, execute=1)
    expert = closed_loop_distance(lambda obs: scripted_expert(obs)[:, None], 10, execute=1)
    assert expert < 0.1 * start


def test_chunks_are_consecutive_expert_actions():
    H, E = 8, 5
    data = collect_chunks(E, H, seed=3, num_envs=E)
    n = EPISODE_STEPS - H + 1
    assert data.actions.shape == (n * E, H, 2) and data.tokens.shape == (n * E, 5, 7)
    assert data.actions.abs().max() <= 1.0
    # sample (t, e) sits at index t * E + e: the chunk at t + 1 is the chunk at t shifted by one
    torch.testing.assert_close(data.actions[E:, :-1], data.actions[:-E, 1:])
    # the token of type 4 carries tip - target; the expert's first action is a function of obs
    assert torch.equal(data.tokens[:, :, 2:], torch.eye(5).expand(n * E, -1, -1))


def test_obs_tokens_layout():
    obs = np.arange(20, dtype=np.float32).reshape(2, 10)
    tok = obs_to_tokens(obs)
    assert tok[1, 0, :2].tolist() == [10.0, 12.0]  # cos q1, sin q1
    assert tok[1, 4, :2].tolist() == [18.0 * 5, 19.0 * 5]  # tip - target, scaled


def test_demo_runs_and_writes_outputs(tmp_path):
    summary = main(
        [
            "--out",
            str(tmp_path),
            "--steps",
            "4",
            "--batch",
            "8",
            "--train-episodes",
            "5",
            "--test-episodes",
            "2",
            "--closed-loop-episodes",
            "2",
        ]
    )
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert (
        saved["results"].keys()
        == summary["results"].keys()
        == {
            "without TTT",
            "with TTT (all layers)",
        }
    )
    for r in saved["results"].values():
        assert np.isfinite(r["flow_matching_loss"]) and np.isfinite(r["sampled_action_mse"])
    assert saved["results"]["without TTT"]["mean_abs_ttt_gate"] is None
    assert saved["results"]["with TTT (all layers)"]["mean_abs_ttt_gate"] > 0  # gate opened
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
