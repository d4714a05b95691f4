"""Demo: pi0.5-style policies with and without TTT, fine-tuned on Reacher-v5 through ``ttt-gemma train``.

``ttt-gemma-demo --out DIR`` rolls out a scripted expert in MuJoCo's Reacher-v5, writes its
episodes as a LeRobot v2 dataset with a camera (``DIR/dataset``: the state, the torques and a
top-down image of the arm and target drawn from the simulator's state, :func:`reacher.render`),
and trains two kinds of policy through the training CLI, each without TTT, with TTT on the
residual stream and with TTT on the attention output (``ttt.input``), from one initial pi0.5
checkpoint per kind and on the same batches:

- the state policy (stand-in prefix over state tokens; ``DIR/init_pi05.safetensors``);
- the whole pi0.5 policy at a tiny size (SigLIP + Gemma prefix over the camera image and the
  prompt ``"Task: reach the target, State: <discretised state>;\nAction: "`` with a word-level
  tokenizer built in ``DIR/tokenizer``; ``DIR/init_pi05_whole.safetensors``).

It writes ``summary.json`` (held-out flow-matching loss, MSE of sampled chunks against the
expert's, closed-loop final distance to the target with the image rendered live, mean |TTT
gate|) and ``loss_curves.png``; each run folder under ``DIR/runs`` has its metrics and plots.
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
from .pi05_inputs import Pi05Observations, pi05_observation
from .policy import flow_time, sincos_time_embedding
from .reacher import (
    CAMERA,
    EPISODE_STEPS,
    OBS_DIM,
    closed_loop_distance,
    collect_episodes,
    render,
    scripted_expert,
)
from .train import make_policy
from .train_config import config_from_yaml_text, load_config
from .word_tokenizer import build_word_tokenizer, load_tokenizer

TASK = "reach the target"
# per kind (whole pi0.5 policy?): openpi's quantile for pi0.5, whose prompt bins the state over
# [-1, 1]; z-scores for the state policy
NORMALIZATION = {False: "zscore", True: "quantile"}
IMAGE = 32  # the camera's pixels (resized with padding to the vision tower's 28)
PROMPT_TOKENS = 24  # the whole policy's max_token_len, in training and in the evaluation
PLACEMENTS = {  # the expert's TTT settings (None: no TTT)
    "without TTT": None,
    "TTT on the residual stream": {"input": "residual"},
    "TTT on the attention output": {"input": "attn_output"},
}
# name -> (whole pi0.5 policy with the camera?, TTT settings)
VARIANTS = {
    **{name: (False, ttt) for name, ttt in PLACEMENTS.items()},
    **{f"pi0.5 with camera, {name}": (True, ttt) for name, ttt in PLACEMENTS.items()},
}
# the whole policy's tiny PaliGemma: 16 patches of 7 x 7 per image, K/V sizes of the expert
VLM = {"vision_width": 32, "vision_mlp_dim": 64, "vision_depth": 2, "vision_heads": 2,
       "patch_size": 7, "image_size": 28, "width": 64, "depth": 4, "mlp_dim": 128,
       "num_heads": 4, "num_kv_heads": 1, "head_dim": 16, "vocab_size": 300}  # fmt: skip


def expert_config(horizon: int, ttt: dict | None) -> dict:
    """The demo's tiny expert (4 layers of width 64, TTT in all of them when ``ttt`` is given)."""
    return {"width": 64, "depth": 4, "mlp_dim": 256, "num_heads": 4, "head_dim": 16,
            "action_dim": 2, "action_horizon": horizon, "use_ttt": ttt is not None,
            "ttt": ttt or {}}  # fmt: skip


def run_config(args, out: Path, name: str, ttt: dict | None, whole: bool = False) -> dict:
    """A ``ttt-gemma train`` config: the state policy, or (``whole``) the tiny pi0.5 policy."""
    data = {"root": str(out / "dataset"), "normalization": NORMALIZATION[whole]}
    model = {"expert": expert_config(args.horizon, ttt), "prefix": {"width": 64, "mlp_dim": 128}}
    if whole:
        data.update(image_keys={"base_0_rgb": CAMERA}, tokenizer=str(out / "tokenizer"),
                    max_token_len=PROMPT_TOKENS)  # fmt: skip
        model["vlm"] = VLM
    model["init_pi05"] = str(out / ("init_pi05_whole" if whole else "init_pi05")) + ".safetensors"
    steps = args.camera_steps if whole else args.steps
    return {
        "data": data,
        "model": model,
        "train": {
            "steps": steps,
            "batch_size": args.batch,
            "lr": args.lr,
            "warmup_steps": min(20, steps - 1),
            "seed": args.seed,
            "log_every": 25,
            "ckpt_every": steps,
            "threads": args.threads,
        },
        "run": {"root": str(out / "runs"), "name": name},
    }


class Evaluator:
    """Held-out chunks and the simulator, in the dataset's normalisation; the observations of
    the state policy (normalised states) or of the whole pi0.5 policy (camera + prompt)."""

    def __init__(self, train_root: Path, test_root: Path, horizon: int, seed: int, beta,
                 tokenizer):  # fmt: skip
        train = read_lerobot(train_root)
        self.norms = {whole: train.normalizers(mode) for whole, mode in NORMALIZATION.items()}
        test = read_lerobot(test_root, image_keys=[CAMERA], tasks=True)
        self.frames = test.chunk_starts(horizon)  # (M,) the held-out chunks' first frames
        states, actions = test.chunks(self.frames, horizon)
        self.states, self.actions = states, actions  # raw units
        self.whole = Pi05Observations(test, {"base_0_rgb": CAMERA},
                                      self.norms[True][0].normalize(test.states), tokenizer,
                                      PROMPT_TOKENS, VLM["image_size"])  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(actions.shape, generator=gen, device="cpu")
        self.t = flow_time(actions.shape[0], beta, device="cpu", generator=gen)
        self.start = torch.randn(actions.shape, generator=gen, device="cpu")

    def live(self, obs: np.ndarray, whole: bool) -> tuple:
        """A policy's inputs for simulator observations [N, 10] (the camera rendered live)."""
        states = self.norms[whole][0].normalize(torch.as_tensor(obs, dtype=torch.float32))
        if not whole:
            return (states,)
        w = self.whole
        return pi05_observation({"base_0_rgb": torch.from_numpy(render(obs, IMAGE))},
                                [TASK] * len(obs), states, w.tokenizer, w.max_token_len,
                                w.image_size)  # fmt: skip

    @torch.no_grad()
    def __call__(self, model, whole: bool, episodes: int) -> dict:
        model.eval()
        state_norm, action_norm = self.norms[whole]
        held_out = self.whole(self.frames) if whole else (state_norm.normalize(self.states),)
        actions = action_norm.normalize(self.actions)
        flow = model.loss(*held_out, actions, self.noise, self.t).item()
        sampled = action_norm.unnormalize(model.sample(*held_out, noise=self.start))
        act = lambda obs: action_norm.unnormalize(model.sample(*self.live(obs, whole))).numpy()
        return {
            "flow_matching_loss": flow,
            "sampled_action_mse": torch.mean((sampled - self.actions) ** 2).item(),
            "mean_chunk_action_mse": torch.mean((self.actions - self.actions.mean(0)) ** 2).item(),
            "closed_loop_distance": closed_loop_distance(
                act, episodes=episodes, execute=max(1, self.actions.shape[1] // 2)
            ),
        }


@torch.no_grad()
def ttt_gate_magnitude(model) -> float | None:
    """Mean |g_ttt| of the TTT branches' AdaRMS gates over t in [0, 1] (0 at the exact start)."""
    from .layer import TTTBranch

    policy, c = model.policy, model.policy.config
    t = torch.linspace(0.001, 1.0, 11, device=next(policy.parameters()).device)
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
           title="Reacher-v5 action chunks: pi0.5-style policies, with and without TTT")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _int_in(minimum: int, maximum: int | None = None):
    """An argparse type: an int in [minimum, maximum]; anything else is a usage error (exit 2)."""

    def parse(text: str) -> int:
        value = int(text)  # not an int: argparse's "invalid int value"
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_positive_float.__name__ = "float"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    count = _int_in(1)
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--steps", type=count, default=300, help="training steps per state policy")
    p.add_argument("--camera-steps", type=count, default=150,
                   help="training steps per whole pi0.5 policy (each ~2.5x a state step)")  # fmt: skip
    p.add_argument("--batch", type=count, default=32)
    p.add_argument("--lr", type=_positive_float, default=2e-3)
    p.add_argument("--horizon", type=_int_in(1, EPISODE_STEPS), default=16,
                   help=f"actions per chunk (at most an episode's {EPISODE_STEPS})")  # fmt: skip
    p.add_argument("--train-episodes", type=count, default=150)
    p.add_argument("--test-episodes", type=count, default=10)
    p.add_argument("--closed-loop-episodes", type=count, default=25)
    p.add_argument("--seed", type=_int_in(0), default=0)
    p.add_argument("--threads", type=count, default=1, help="torch CPU threads (1: steadiest)")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    args = p.parse_args(argv)  # bad values exit here (status 2), before any work
    out = Path(args.out).absolute()
    try:
        out = prepare_run_dir(out.parent, out.name, resume=False, overwrite=args.overwrite)
    except ValueError as err:  # an earlier demo there (pass --overwrite), or not a run folder
        p.error(f"argument --out: {err}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    for folder, episodes, seed in (("dataset", args.train_episodes, args.seed),
                                   ("test_dataset", args.test_episodes, args.seed + 50_000)):  # fmt: skip
        write_lerobot(out / folder, collect_episodes(episodes, seed, progress=True, camera=IMAGE),
                      fps=50, image_keys=[CAMERA], robot_type="reacher", task=TASK)  # fmt: skip
    build_word_tokenizer(out / "tokenizer", [TASK])
    expert_dist = closed_loop_distance(
        lambda obs: scripted_expert(obs)[:, None], args.closed_loop_episodes, execute=1
    )
    # one initial policy per kind, saved as a pi0.5 checkpoint: its runs start from it (TTT: gates
    # at 0); the state policy's file holds the expert and heads, the whole policy's the VLM too
    for whole in (False, True):
        base = config_from_yaml_text(yaml.safe_dump(run_config(args, out, "init", None, whole)),
                                     "<demo>")  # fmt: skip
        torch.manual_seed(args.seed)
        policy = make_policy(base, OBS_DIM)
        save_pi05(policy if whole else policy.policy, base.model.init_pi05)

    evaluate = Evaluator(out / "dataset", out / "test_dataset", args.horizon, args.seed + 2,
                         base.model.expert.time_beta, load_tokenizer(out / "tokenizer"))  # fmt: skip
    curves, results = {}, {}
    for name, (whole, ttt) in VARIANTS.items():
        folder = name.lower().replace("pi0.5 with camera, ", "pi05_camera_").replace(" ", "_")
        cfg_path = out / "configs" / f"{folder}.yaml"
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        config = run_config(args, out, folder, ttt, whole)
        cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
        if cli_main(["train", "--config", str(cfg_path)]) != 0:  # the training CLI itself
            raise RuntimeError(f"ttt-gemma train --config {cfg_path} failed")
        cfg = load_config(cfg_path)
        model = make_policy(cfg, OBS_DIM)
        load_checkpoint(model, out / "runs" / folder / "model.safetensors")
        metrics = (out / "runs" / folder / "metrics.jsonl").read_text().splitlines()
        curves[name] = [json.loads(line)["loss"] for line in metrics]
        results[name] = evaluate(model, whole, args.closed_loop_episodes)
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
        "camera_steps": args.camera_steps,
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
