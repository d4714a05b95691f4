"""Demo: a tiny pi0.5-style policy with and without TTT, trained on Reacher-v5 expert action chunks.

``ttt-gemma-demo --out DIR`` collects chunks from the scripted expert in MuJoCo's Reacher-v5,
trains two policies (stand-in prefix encoder + action expert + flow-matching head) from the same
initial weights on the same batches -- one with a TTT branch in every expert layer, one without --
and writes ``loss_curves.png`` and ``summary.json`` (final flow-matching loss on held-out chunks,
action MSE of sampled chunks against the expert's, closed-loop final distance to the target).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import ActionExpertConfig, PrefixEncoderConfig
from .policy import FlowMatchingPolicy, sincos_time_embedding
from .prefix import StandInPrefixEncoder
from .reacher import FEATURE_DIM, ChunkDataset, closed_loop_distance, collect_chunks, obs_to_tokens


class ReacherPolicy(nn.Module):
    """Stand-in prefix encoder over observation tokens + the flow-matching action policy."""

    def __init__(self, config: ActionExpertConfig, prefix_width: int):
        super().__init__()
        self.encoder = StandInPrefixEncoder(
            PrefixEncoderConfig.for_expert(
                config, feature_dim=FEATURE_DIM, width=prefix_width, mlp_dim=2 * prefix_width
            )
        )
        self.policy = FlowMatchingPolicy(config)

    def loss(self, tokens: Tensor, actions: Tensor, noise=None, t=None) -> Tensor:
        return self.policy.loss(actions, self.encoder(tokens), noise=noise, t=t)

    @torch.no_grad()
    def sample(self, tokens: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.policy.sample(self.encoder(tokens), noise=noise)


def demo_config(use_ttt: bool, horizon: int) -> ActionExpertConfig:
    return ActionExpertConfig.tiny(
        width=64,
        depth=4,
        mlp_dim=256,
        num_heads=4,
        head_dim=16,
        action_dim=2,
        action_horizon=horizon,
        use_ttt=use_ttt,
    )


def train(
    model: ReacherPolicy,
    data: ChunkDataset,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    desc: str,
) -> list[float]:
    """AdamW with cosine decay; the batch order and the noise/time draws depend only on ``seed``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=True):
        idx = torch.randint(0, data.actions.shape[0], (batch,), generator=gen)
        acts = data.actions[idx]
        noise = torch.randn(acts.shape, generator=gen)
        u = torch.rand(batch, generator=gen)
        t = u.pow(1.0 / 1.5) * 0.999 + 0.001  # Beta(1.5, 1) by inverse CDF, scaled to [0.001, 1]
        loss = model.loss(data.tokens[idx], acts, noise=noise, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: ReacherPolicy, data: ChunkDataset, seed: int, closed_loop_episodes: int):
    """Held-out flow loss (fixed noise and times), sampled-chunk MSE, closed-loop distance."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    acts = data.actions
    noise = torch.randn(acts.shape, generator=gen)
    t = torch.rand(acts.shape[0], generator=gen).pow(1.0 / 1.5) * 0.999 + 0.001
    flow = model.loss(data.tokens, acts, noise=noise, t=t).item()
    mean_chunk_mse = torch.mean((acts - acts.mean(0)) ** 2).item()  # predicting the average chunk
    start = torch.randn(acts.shape, generator=gen)
    sampled = model.sample(data.tokens, noise=start)
    mse = torch.mean((sampled - acts) ** 2).item()
    horizon = acts.shape[1]
    dist = closed_loop_distance(
        lambda obs: model.sample(obs_to_tokens(obs)).numpy(),
        episodes=closed_loop_episodes,
        execute=max(1, horizon // 2),
    )
    return {
        "flow_matching_loss": flow,
        "sampled_action_mse": mse,
        "mean_chunk_action_mse": mean_chunk_mse,
        "closed_loop_distance": dist,
    }


@torch.no_grad()
def ttt_gate_magnitude(policy: FlowMatchingPolicy) -> float | None:
    """Mean |g_ttt| of the TTT branches' AdaRMS gates over t in [0, 1] (0 at initialisation)."""
    from .layer import TTTBranch

    c = policy.config
    t = torch.linspace(0.001, 1.0, 11)
    cond = policy.time_condition(sincos_time_embedding(t, c.width, c.min_period, c.max_period))
    gates = [
        m.norm.dense(cond)[:, 2 * c.width :].abs().mean()
        for m in policy.modules()
        if isinstance(m, TTTBranch) and m.norm.dense is not None
    ]
    return float(torch.stack(gates).mean()) if gates else None


def smooth(x: list[float], k: int = 25) -> np.ndarray:
    x = np.asarray(x)
    if len(x) < k:
        return x
    return np.convolve(x, np.ones(k) / k, mode="valid")


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for color, (name, losses) in zip(("tab:blue", "tab:red"), curves.items()):
        ax.plot(np.asarray(losses), color=color, alpha=0.15, lw=0.8)
        ax.plot(np.arange(len(smooth(losses))) + 12, smooth(losses), color=color, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("flow-matching loss")
    ax.set_title("Reacher-v5 action chunks: pi0.5-style expert with vs without TTT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder for loss_curves.png, summary.json")
    p.add_argument("--steps", type=int, default=400, help="training steps per model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--horizon", type=int, default=16, help="actions per chunk")
    p.add_argument("--train-episodes", type=int, default=200)
    p.add_argument("--test-episodes", type=int, default=10)
    p.add_argument("--closed-loop-episodes", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)"
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    train_data = collect_chunks(args.train_episodes, args.horizon, seed=args.seed, progress=True)
    test_data = collect_chunks(args.test_episodes, args.horizon, seed=args.seed + 50_000)
    expert_dist = closed_loop_distance(
        lambda obs: _expert_chunk(obs, args.horizon), args.closed_loop_episodes, execute=1
    )

    torch.manual_seed(args.seed)
    base = ReacherPolicy(demo_config(False, args.horizon), prefix_width=64)
    torch.manual_seed(args.seed)
    with_ttt = ReacherPolicy(demo_config(True, args.horizon), prefix_width=64)
    missing = with_ttt.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert all(".ttt." in k for k in missing)  # same start: only TTT params are new

    curves, results = {}, {}
    for name, model in (("without TTT", base), ("with TTT (all layers)", with_ttt)):
        curves[name] = train(
            model, train_data, args.steps, args.batch, args.lr, args.seed + 1, desc=name
        )
        results[name] = evaluate(model, test_data, args.seed + 2, args.closed_loop_episodes)
        results[name]["final_train_loss_avg50"] = float(np.mean(curves[name][-50:]))
        results[name]["parameters"] = sum(p.numel() for p in model.parameters())
        results[name]["mean_abs_ttt_gate"] = ttt_gate_magnitude(model.policy)
    plot(curves, out / "loss_curves.png")
    summary = {
        "task": "gymnasium Reacher-v5 (MuJoCo), scripted Jacobian-transpose PD expert",
        "train_chunks": int(train_data.actions.shape[0]),
        "test_chunks": int(test_data.actions.shape[0]),
        "horizon": args.horizon,
        "steps": args.steps,
        "batch": args.batch,
        "expert_closed_loop_distance": expert_dist,
        "results": results,
        "seconds": time.perf_counter() - t0,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv or sys.argv[1:])]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {out / 'loss_curves.png'} and {out / 'summary.json'}")
    return summary


def _expert_chunk(obs: np.ndarray, horizon: int) -> np.ndarray:
    from .reacher import scripted_expert

    return scripted_expert(obs)[:, None].repeat(horizon, axis=1)


def cli(argv: list[str] | None = None) -> None:
    """Console entry point ``ttt-gemma-demo``: runs :func:`main`, exit status 0 on success."""
    main(argv)


if __name__ == "__main__":
    cli()
