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
CAMERA = "observation.images.top"  # the dataset's camera feature (see render)


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


def render(obs: np.ndarray, size: int = 32, extent: float = 0.22) -> np.ndarray:
    """A top-down camera image of each observation, drawn from the simulator's state: the two links
    (blue, from the joint angles), the fingertip (black) and the target (red) on grey, the arena
    ``[-extent, extent]^2`` metres over ``size`` x ``size`` pixels (y up).

    Args:
        obs: [N, 10] Reacher observations.

    Returns:
        [N, size, size, 3] uint8.
    """
    q1, q2 = np.arctan2(obs[:, 2], obs[:, 0]), np.arctan2(obs[:, 3], obs[:, 1])
    l1, l2 = LINKS
    elbow = np.stack([l1 * np.cos(q1), l1 * np.sin(q1)], -1)  # (N, 2)
    tip = elbow + np.stack([l2 * np.cos(q1 + q2), l2 * np.sin(q1 + q2)], -1)
    target = obs[:, 4:6]
    centres = (np.arange(size) + 0.5) / size * 2 * extent - extent
    px = np.stack(np.meshgrid(centres, centres[::-1], indexing="xy"), -1)  # (size, size, 2): x, y
    pixel = 2 * extent / size

    def near_segment(a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
        """[N, size, size] bool: pixels within ``radius`` of the segment a-b (a, b: [N, 2])."""
        ab = (b - a)[:, None, None]  # (N, 1, 1, 2)
        ap = px[None] - a[:, None, None]  # (N, size, size, 2)
        s = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
        return np.linalg.norm(ap - s[..., None] * ab, axis=-1) <= radius

    image = np.full((len(obs), size, size, 3), 200, dtype=np.uint8)
    origin = np.zeros_like(elbow)
    image[near_segment(target, target, 1.2 * pixel)] = (220, 30, 30)
    image[near_segment(origin, elbow, 0.7 * pixel)] = (40, 70, 200)
    image[near_segment(elbow, tip, 0.7 * pixel)] = (40, 120, 230)
    image[near_segment(tip, tip, 0.8 * pixel)] = (0, 0, 0)
    return image


def collect_episodes(
    episodes: int, seed: int = 0, num_envs: int = 25, progress: bool = False, camera: int = 0
) -> list[dict[str, np.ndarray]]:
    """Roll out the scripted expert: per episode ``{"observation.state": [50, 10], "action":
    [50, 2]}`` (the observation before each action), and with ``camera`` > 0 the
    ``observation.images.top`` frames [50, camera, camera, 3] (:func:`render`), ready for
    :func:`ttt_gemma.lerobot.write_lerobot`."""
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
            for o, a in zip(obs_all, act_all):
                episode = {
                    "observation.state": o.astype(np.float32),
                    "action": a.astype(np.float32),
                }
                if camera:
                    episode[CAMERA] = render(o, camera)
                out.append(episode)
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
