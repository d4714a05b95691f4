"""Demo: pi0.5-style policies with and without TTT, fine-tuned on Reacher-v5 through ``ttt-gemma train``.

``ttt-gemma-demo --out DIR`` rolls out a scripted expert in MuJoCo's Reacher-v5, writes its
episodes as a LeRobot v2 dataset (``DIR/dataset``), saves one initial policy as a pi0.5 checkpoint
(``DIR/init_pi05.safetensors``) and trains three policies from it with the training CLI, on the
same batches: without TTT, with TTT on the residual stream, with TTT on the attention output
(``ttt.input``). It writes ``summary.json`` (held-out flow-matching loss, MSE of sampled chunks
against the expert's, closed-loop final distance to the target, mean |TTT gate|) and
``loss_curves.png``; each run folder under ``DIR/runs`` has its metrics and plots.
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
import yaml

from ttt_core.runfiles import prepare_run_dir

from .checkpoint import load_checkpoint, save_pi05
from .cli import main as cli_main
from .lerobot import read_lerobot, write_lerobot
from .policy import flow_time, sincos_time_embedding
from .reacher import OBS_DIM, closed_loop_distance, collect_episodes, scripted_expert
from .state_policy import StatePolicy
from .train import make_policy
from .train_config import config_from_yaml_text, load_config

# name -> the expert's TTT settings (None: no TTT)
VARIANTS = {
    "without TTT": None,
    "TTT on the residual stream": {"input": "residual"},
    "TTT on the attention output": {"input": "attn_output"},
}


def expert_config(horizon: int, ttt: dict | None) -> dict:
    """The demo's tiny expert (4 layers of width 64, TTT in all of them when ``ttt`` is given)."""
    return {"width": 64, "depth": 4, "mlp_dim": 256, "num_heads": 4, "head_dim": 16,
            "action_dim": 2, "action_horizon": horizon, "use_ttt": ttt is not None,
            "ttt": ttt or {}}  # fmt: skip


def run_config(args, out: Path, name: str, ttt: dict | None) -> dict:
    return {
        "data": {"root": str(out / "dataset"), "normalization": "zscore"},
        "model": {
            "expert": expert_config(args.horizon, ttt),
            "prefix": {"width": 64, "mlp_dim": 128},
            "init_pi05": str(out / "init_pi05.safetensors"),
        },
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "warmup_steps": min(20, args.steps - 1),
            "seed": args.seed,
            "log_every": 25,
            "ckpt_every": args.steps,
            "threads": args.threads,
        },
        "run": {"root": str(out / "runs"), "name": name},
    }


class Evaluator:
    """Held-out chunks and the simulator, in the dataset's normalisation."""

    def __init__(self, train_root: Path, test_root: Path, horizon: int, seed: int, beta):
        self.state_norm, self.action_norm = read_lerobot(train_root).normalizers("zscore")
        test = read_lerobot(test_root)
        states, actions = test.chunks(test.chunk_starts(horizon), horizon)
        self.states, self.actions = states, actions  # raw units
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(actions.shape, generator=gen)
        self.t = flow_time(actions.shape[0], beta, generator=gen)
        self.start = torch.randn(actions.shape, generator=gen)

    @torch.no_grad()
    def __call__(self, model: StatePolicy, episodes: int) -> dict:
        model.eval()
        s = self.state_norm.normalize(self.states)
        flow = model.loss(s, self.action_norm.normalize(self.actions), self.noise, self.t).item()
        sampled = self.action_norm.unnormalize(model.sample(s, noise=self.start))
        act = lambda obs: self.action_norm.unnormalize(
            model.sample(self.state_norm.normalize(torch.as_tensor(obs, dtype=torch.float32)))
        ).numpy()
        return {
            "flow_matching_loss": flow,
            "sampled_action_mse": torch.mean((sampled - self.actions) ** 2).item(),
            "mean_chunk_action_mse": torch.mean((self.actions - self.actions.mean(0)) ** 2).item(),
            "closed_loop_distance": closed_loop_distance(
                act, episodes=episodes, execute=max(1, self.actions.shape[1] // 2)
            ),
        }


@torch.no_grad()
def ttt_gate_magnitude(model: StatePolicy) -> float | None:
    """Mean |g_ttt| of the TTT branches' AdaRMS gates over t in [0, 1] (0 at the exact start)."""
    from .layer import TTTBranch

    policy, c = model.policy, model.policy.config
    t = torch.linspace(0.001, 1.0, 11)
    cond = policy.time_condition(sincos_time_embedding(t, c.width, c.min_period, c.max_period))
    gates = [m.norm.dense(cond)[:, 2 * c.width :].abs().mean()  # the gate third of [scale, shift, gate]
             for m in policy.modules() if isinstance(m, TTTBranch) and m.norm.dense is not None]  # fmt: skip
    return float(torch.stack(gates).mean()) if gates else None


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        k = min(25, len(losses))
        smooth = np.convolve(np.asarray(losses), np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k // 2, smooth, label=name)
    ax.set(yscale="log", xlabel="training step", ylabel="flow-matching loss (smoothed)",
           title="Reacher-v5 action chunks: pi0.5-style expert, with and without TTT")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--steps", type=int, default=300, help="training steps per policy")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--horizon", type=int, default=16, help="actions per chunk")
    p.add_argument("--train-episodes", type=int, default=150)
    p.add_argument("--test-episodes", type=int, default=10)
    p.add_argument("--closed-loop-episodes", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        raise ValueError("--steps and --batch must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out).absolute()
    out = prepare_run_dir(out.parent, out.name, resume=False, overwrite=args.overwrite)
    t0 = time.perf_counter()
    write_lerobot(out / "dataset", collect_episodes(args.train_episodes, args.seed, progress=True),
                  fps=50, robot_type="reacher", task="reach the target")  # fmt: skip
    write_lerobot(out / "test_dataset", collect_episodes(args.test_episodes, args.seed + 50_000),
                  fps=50, robot_type="reacher", task="reach the target")  # fmt: skip
    expert_dist = closed_loop_distance(
        lambda obs: scripted_expert(obs)[:, None], args.closed_loop_episodes, execute=1
    )
    # one initial policy, saved as a pi0.5 checkpoint: every run starts from it (TTT: gates at 0)
    base = config_from_yaml_text(yaml.safe_dump(run_config(args, out, "init", None)), "<demo>")
    torch.manual_seed(args.seed)
    save_pi05(make_policy(base, OBS_DIM).policy, out / "init_pi05.safetensors")

    evaluate = Evaluator(out / "dataset", out / "test_dataset", args.horizon, args.seed + 2,
                         base.model.expert.time_beta)  # fmt: skip
    curves, results = {}, {}
    for name, ttt in VARIANTS.items():
        folder = name.lower().replace(" ", "_")
        cfg_path = out / "configs" / f"{folder}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(run_config(args, out, folder, ttt), sort_keys=False))
        if cli_main(["train", "--config", str(cfg_path)]) != 0:  # the training CLI itself
            raise RuntimeError(f"ttt-gemma train --config {cfg_path} failed")
        cfg = load_config(cfg_path)
        model = make_policy(cfg, OBS_DIM)
        load_checkpoint(model, out / "runs" / folder / "model.safetensors")
        metrics = (out / "runs" / folder / "metrics.jsonl").read_text().splitlines()
        curves[name] = [json.loads(line)["loss"] for line in metrics]
        results[name] = evaluate(model, args.closed_loop_episodes)
        results[name]["final_train_loss_avg50"] = float(np.mean(curves[name][-50:]))
        results[name]["parameters"] = sum(p.numel() for p in model.parameters())
        results[name]["mean_abs_ttt_gate"] = ttt_gate_magnitude(model)
    plot(curves, out / "loss_curves.png")
    summary = {
        "task": "gymnasium Reacher-v5 (MuJoCo), scripted Jacobian-transpose PD expert",
        "train_episodes": args.train_episodes,
        "test_chunks": int(evaluate.actions.shape[0]),
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


def cli(argv: list[str] | None = None) -> None:
    """Console entry point ``ttt-gemma-demo``: runs :func:`main`, exit status 0 on success."""
    main(argv)


if __name__ == "__main__":
    cli()
