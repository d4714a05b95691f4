"""Action chunks from a real simulated task: gymnasium's MuJoCo ``Reacher-v5`` (a 2-link planar arm
reaching a random target) driven by a scripted Jacobian-transpose PD expert.

Observation (10): ``cos q1, cos q2, sin q1, sin q2, target_x, target_y, dq1, dq2, (tip - target)_xy``.
Action (2): joint torques in [-1, 1]. Episodes last 50 steps (dt = 0.02 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

try:
    import gymnasium as gym
except ImportError as err:  # the simulator is a demo-only dependency
    raise ImportError(
        "the Reacher demo needs gymnasium with MuJoCo: pip install 'ttt-gemma[demo]'"
    ) from err

ENV_ID = "Reacher-v5"
LINKS = (0.1, 0.11)  # link lengths of the arm (shoulder->elbow, elbow->fingertip), metres
EPISODE_STEPS = 50
NUM_PREFIX_TOKENS = 5  # observation tokens: (cos, sin) q1, (cos, sin) q2, target, dq, tip - target
FEATURE_DIM = 2 + NUM_PREFIX_TOKENS  # a pair of values + one-hot token type


def scripted_expert(obs: np.ndarray, kp: float = 300.0, kd: float = 0.25) -> np.ndarray:
    """Jacobian-transpose PD controller ``tau = clip(kp * J(q)^T (target - tip) - kd * dq, -1, 1)``.

    Args:
        obs: [N, 10] Reacher observations.

    Returns:
        [N, 2] torques.
    """
    c1, c2, s1, s2 = obs[:, 0], obs[:, 1], obs[:, 2], obs[:, 3]
    q1, q2 = np.arctan2(s1, c1), np.arctan2(s2, c2)
    s12, c12 = np.sin(q1 + q2), np.cos(q1 + q2)
    l1, l2 = LINKS
    jac = np.stack(  # (N, 2, 2): d tip / d q
        [
            np.stack([-l1 * s1 - l2 * s12, -l2 * s12], -1),
            np.stack([l1 * c1 + l2 * c12, l2 * c12], -1),
        ],
        axis=1,
    )
    err = -obs[:, 8:10]  # target - tip, (N, 2)
    tau = kp * np.einsum("nij,ni->nj", jac, err) - kd * obs[:, 6:8]
    return np.clip(tau, -1.0, 1.0)


def obs_to_tokens(obs: np.ndarray | Tensor) -> Tensor:
    """Observation -> prefix tokens [N, 5, 7]: each token a value pair plus a one-hot type."""
    obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32)
    pairs = torch.stack(
        [
            obs[:, [0, 2]],  # cos q1, sin q1
            obs[:, [1, 3]],  # cos q2, sin q2
            obs[:, 4:6] * 5.0,  # target position (scaled to ~unit range)
            obs[:, 6:8] * 0.1,  # joint velocities
            obs[:, 8:10] * 5.0,  # tip - target
        ],
        dim=1,
    )  # (N, 5, 2)
    onehot = torch.eye(NUM_PREFIX_TOKENS).expand(obs.shape[0], -1, -1)  # (N, 5, 5)
    return torch.cat([pairs, onehot], dim=-1)


@dataclass
class ChunkDataset:
    """Observation tokens and the expert's next ``horizon`` actions from each visited state."""

    tokens: Tensor  # (N, 5, 7)
    actions: Tensor  # (N, horizon, 2)


def collect_chunks(
    episodes: int, horizon: int, seed: int = 0, num_envs: int = 25, progress: bool = False
) -> ChunkDataset:
    """Roll out the scripted expert and cut its action sequences into chunks.

    Every step t with t + horizon <= 50 gives one sample (tokens of obs_t, actions t..t+horizon-1).
    """
    if not 1 <= horizon <= EPISODE_STEPS:
        raise ValueError(f"horizon must be in [1, {EPISODE_STEPS}], got {horizon}")
    from tqdm.auto import tqdm

    toks, acts = [], []
    num_envs = min(num_envs, episodes)
    rounds = -(-episodes // num_envs)
    env = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="sync")
    try:
        for r in tqdm(range(rounds), desc="expert rollouts", disable=not progress):
            obs, _ = env.reset(seed=seed + r * num_envs)
            obs_seq, act_seq = [], []
            for _ in range(EPISODE_STEPS):
                a = scripted_expert(obs)
                obs_seq.append(obs)
                act_seq.append(a)
                obs, *_ = env.step(a)
            obs_all = np.stack(obs_seq, 1)  # (E, 50, 10)
            act_all = np.stack(act_seq, 1)  # (E, 50, 2)
            for t in range(EPISODE_STEPS - horizon + 1):
                toks.append(obs_to_tokens(obs_all[:, t]))
                acts.append(torch.as_tensor(act_all[:, t : t + horizon], dtype=torch.float32))
    finally:
        env.close()
    return ChunkDataset(torch.cat(toks), torch.cat(acts))


def closed_loop_distance(
    policy_fn, episodes: int, execute: int, seed: int = 10_000, num_envs: int = 25
) -> float:
    """Run a chunking policy in the simulator and return the mean final fingertip-target distance.

    Args:
        policy_fn: maps observations [N, 10] (numpy) to action chunks [N, >= execute, 2].
        execute: actions of each chunk executed before re-planning.
    """
    dists = []
    num_envs = min(num_envs, episodes)
    env = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="sync")
    try:
        for r in range(-(-episodes // num_envs)):
            obs, _ = env.reset(seed=seed + r * num_envs)
            t = 0
            while t < EPISODE_STEPS - 1:
                chunk = np.asarray(policy_fn(obs))  # (N, H, 2)
                for j in range(min(execute, EPISODE_STEPS - 1 - t)):
                    obs, *_ = env.step(np.clip(chunk[:, j], -1, 1))
                    t += 1
            dists.append(np.linalg.norm(obs[:, 8:10], axis=1))
    finally:
        env.close()
    return float(np.concatenate(dists)[:episodes].mean())
