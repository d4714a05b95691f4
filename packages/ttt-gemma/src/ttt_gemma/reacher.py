"""Action chunks from a real simulated task: gymnasium's MuJoCo ``Reacher-v5`` (a 2-link planar arm
reaching a random target) driven by a scripted Jacobian-transpose PD expert.

Observation (10): ``cos q1, cos q2, sin q1, sin q2, target_x, target_y, dq1, dq2, (tip - target)_xy``.
Action (2): joint torques in [-1, 1]. Episodes last 50 steps (dt = 0.02 s).
"""

from __future__ import annotations

import numpy as np

try:
    import gymnasium as gym
except ImportError as err:  # the simulator is a demo-only dependency
    raise ImportError(
        "the Reacher demo needs gymnasium with MuJoCo: pip install 'ttt-gemma[demo]'"
    ) from err

ENV_ID = "Reacher-v5"
LINKS = (0.1, 0.11)  # link lengths of the arm (shoulder->elbow, elbow->fingertip), metres
EPISODE_STEPS = 50
OBS_DIM = 10  # the observation (the dataset's state) size


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


def collect_episodes(
    episodes: int, seed: int = 0, num_envs: int = 25, progress: bool = False
) -> list[dict[str, np.ndarray]]:
    """Roll out the scripted expert: per episode ``{"observation.state": [50, 10], "action":
    [50, 2]}`` (the observation before each action), ready for :func:`ttt_gemma.lerobot.write_lerobot`."""
    from tqdm.auto import tqdm

    out = []
    num_envs = min(num_envs, episodes)
    env = gym.make_vec(ENV_ID, num_envs=num_envs, vectorization_mode="sync")
    try:
        for r in tqdm(
            range(-(-episodes // num_envs)), desc="expert rollouts", disable=not progress
        ):
            obs, _ = env.reset(seed=seed + r * num_envs)
            obs_seq, act_seq = [], []
            for _ in range(EPISODE_STEPS):
                a = scripted_expert(obs)
                obs_seq.append(obs)
                act_seq.append(a)
                obs, *_ = env.step(a)
            obs_all, act_all = np.stack(obs_seq, 1), np.stack(act_seq, 1)  # (E, 50, 10), (E, 50, 2)
            out += [{"observation.state": o.astype(np.float32), "action": a.astype(np.float32)}
                    for o, a in zip(obs_all, act_all)]  # fmt: skip
    finally:
        env.close()
    return out[:episodes]


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
