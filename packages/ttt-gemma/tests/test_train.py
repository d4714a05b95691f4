"""``ttt-gemma train``: config checks, exact resume, the NaN guard, gradient checkpointing,
and a 2-process gloo run equal to one process on the whole batch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ttt_gemma import ActionExpert, ActionExpertConfig
from ttt_gemma.cli import main
from ttt_gemma.lerobot import write_lerobot
from ttt_gemma.train import guarded_step
from ttt_gemma.train_config import load_config

CONFIG = """
data: {{root: {root}}}
model:
  expert: {{width: 32, depth: 2, mlp_dim: 48, num_heads: 2, head_dim: 8, action_dim: 4,
           action_horizon: 5, use_ttt: true, ttt: {{input: {placement}}}}}
  prefix: {{width: 24, mlp_dim: 40}}
train: {{steps: 6, batch_size: 4, lr: 3e-3, warmup_steps: 1, ckpt_every: 4, threads: 1,
         precision: {precision}, parallel: {parallel}}}
run: {{root: {runs}, name: {name}}}
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four short episodes of a 5-d state and 3-d actions (smooth, so there is something to fit)."""
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(4):
        n = 11 + 2 * i
        state = rng.normal(size=(n, 5)).astype(np.float32)
        actions = np.cumsum(rng.normal(size=(n, 3)), 0).astype(np.float32)
        episodes.append({"observation.state": state, "action": actions})
    return write_lerobot(tmp_path_factory.mktemp("data") / "ds", episodes, fps=10)


def write_config(tmp_path, dataset, name, placement="residual", precision="fp32", parallel="ddp"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(root=dataset, runs=tmp_path / "runs", name=name,
                                  placement=placement, precision=precision, parallel=parallel))  # fmt: skip
    return path


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("placement", ["residual", "attn_output"])
def test_resume_gives_the_same_next_losses(tmp_path, dataset, placement):
    whole = write_config(tmp_path, dataset, "whole", placement)
    assert main(["train", "--config", str(whole), "--no-progress"]) == 0
    cut = write_config(tmp_path, dataset, "cut", placement)
    assert main(["train", "--config", str(cut), "--no-progress", "--stop-at", "3"]) == 0
    assert len(losses(tmp_path / "runs" / "cut")) == 3
    # a run folder may be renamed (run.name changes) and resume where it is now
    (tmp_path / "runs" / "cut").rename(tmp_path / "runs" / "moved")
    moved = write_config(tmp_path, dataset, "moved", placement)
    assert main(["train", "--config", str(moved), "--no-progress", "--resume"]) == 0
    run = tmp_path / "runs"
    assert losses(run / "moved") == losses(run / "whole")  # bit-identical, steps not repeated
    assert len(set(losses(run / "whole"))) == 6
    from safetensors.torch import load_file

    a, b = (
        load_file(run / "whole" / "model.safetensors"),
        load_file(run / "moved" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((run / "whole" / "metrics.jsonl").read_text().splitlines()[-1])
    layers = record["ttt_layers"]
    assert [r["layer"] for r in layers] == [0, 1]
    for r in layers:  # the gate opened from 0; the inner update lowers the inner loss
        assert r["gate_abs"] > 0 and r["grad_norm"] > 0
        assert r["inner_loss_after"] < r["inner_loss_before"]
    assert (run / "whole" / "plots.png").stat().st_size > 1000


def test_run_folder_and_config_errors(tmp_path, dataset, capsys):
    cfg = write_config(tmp_path, dataset, "r")
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--no-progress", "--stop-at", "1"]) == 0
    assert main(["train", "--config", str(cfg), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    changed = cfg.read_text().replace("lr: 3e-3", "lr: 1e-3")
    cfg.write_text(changed)
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
    assert "differs" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(changed.replace("threads: 1", "threads: 1, grad_clip: -1"))
    assert main(["train", "--config", str(bad)]) == 2
    assert "'train.grad_clip'" in capsys.readouterr().err
    bad.write_text(changed.replace("ttt: {input: residual}", "ttt: {layer_type: mlp}"))
    with pytest.raises(ValueError, match=r"model\.expert\.ttt\.layer\.inner"):
        load_config(bad)
    assert main(["train", "--config", str(tmp_path / "typo.yaml")]) == 2
    assert "typo.yaml" in capsys.readouterr().err


@pytest.mark.parametrize(
    "typo",
    [("data: {root: ", "data: {root: /no/such/dataset-"), ("action_dim: 4", "action_dim: 2")],
    ids=["data.root", "action_dim"],
)
def test_a_run_that_fails_its_checks_leaves_nothing_in_the_way(tmp_path, dataset, capsys, typo):
    """The input checks (dataset, batches, model) run before the run folder gets its config: the
    corrected command starts the run without a flag, and --overwrite keeps the old run until the
    new config has passed them."""
    good = write_config(tmp_path, dataset, "r")
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace(*typo))
    run = tmp_path / "runs" / "r"
    assert main(["train", "--config", str(bad), "--no-progress"]) == 2
    assert sorted(p.name for p in run.iterdir()) == [".ttt-run"]  # the marker only
    assert main(["train", "--config", str(good), "--no-progress", "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(bad), "--no-progress", "--overwrite"]) == 2
    assert (run / "checkpoint.pt").is_file() and len(losses(run)) == 1  # the old run, intact
    assert main(["train", "--config", str(good), "--no-progress", "--resume"]) == 0
    assert len(losses(run)) == 6


def test_resume_without_a_checkpoint_says_to_overwrite(tmp_path, dataset, capsys):
    cfg = write_config(tmp_path, dataset, "r")
    assert main(["train", "--config", str(cfg), "--no-progress", "--stop-at", "1"]) == 0
    run = tmp_path / "runs" / "r"
    (run / "checkpoint.pt").unlink()  # as if it had stopped before its first checkpoint
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert main(["train", "--config", str(cfg), "--no-progress", "--overwrite"]) == 0


def test_resume_with_another_configs_checkpoint_is_one_error(tmp_path, dataset, capsys):
    narrow = write_config(tmp_path, dataset, "narrow")
    wide = tmp_path / "wide.yaml"
    wide.write_text(narrow.read_text().replace("width: 32", "width: 48").replace("narrow", "wide"))
    for cfg in (narrow, wide):
        assert main(["train", "--config", str(cfg), "--no-progress", "--stop-at", "1"]) == 0
    runs = tmp_path / "runs"
    (runs / "narrow" / "checkpoint.pt").write_bytes((runs / "wide" / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert main(["train", "--config", str(narrow), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(runs / "narrow" / "checkpoint.pt") in err
    assert "shape mismatch" in err and "file (144, 48), model (96, 32)" in err
    assert len(losses(runs / "narrow")) == 1  # nothing was changed


def test_resume_past_stop_at_says_where_the_run_is(tmp_path, dataset, capsys):
    cfg = write_config(tmp_path, dataset, "r")
    assert main(["train", "--config", str(cfg), "--no-progress", "--stop-at", "4"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--no-progress", "--resume", "--stop-at", "2"]) == 0
    assert "already at step 4 of 6 (--stop-at 2): nothing to train" in capsys.readouterr().out
    assert len(losses(tmp_path / "runs" / "r")) == 4


def test_guard_skips_a_non_finite_step():
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.randn(4, 3)).sum().backward()
    assert guarded_step(opt, list(layer.parameters()), torch.tensor(1.0), 1.0)[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[layer.weight].items()}
    (layer(torch.randn(4, 3)).sum() * float("nan")).backward()
    stepped, norm = guarded_step(opt, list(layer.parameters()), torch.tensor(float("nan")), 1.0)
    assert not stepped and not np.isfinite(norm)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in opt.state[layer.weight].items())
    assert all(p.grad is None for p in layer.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = ActionExpertConfig.tiny(use_ttt=True, ttt=dict(gating="both"))
    plain = ActionExpert(cfg)
    ckpt = ActionExpert(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing = True
    x, cond = torch.randn(2, 7, cfg.width), torch.randn(2, cfg.width)
    for model in (plain, ckpt):
        model(x, cond).pow(2).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_bf16_and_autocast_runs_train(tmp_path, dataset):
    for precision in ("bf16", "autocast_bf16"):
        cfg = write_config(tmp_path, dataset, precision, precision=precision)
        assert main(["train", "--config", str(cfg), "--no-progress"]) == 0
        assert all(np.isfinite(losses(tmp_path / "runs" / precision)))


@pytest.mark.cpu_only(
    "two gloo processes on the CPU against one run in this process: the device switch does not "
    "reach spawned processes, and weights drawn on the GPU differ from the CPU's"
)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path, dataset, parallel):
    one = write_config(tmp_path, dataset, "one", parallel=parallel)
    assert main(["train", "--config", str(one), "--no-progress"]) == 0
    two = write_config(tmp_path, dataset, "two", parallel=parallel)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "ttt_gemma.cli", "train",
           "--config", str(two), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs"
    np.testing.assert_allclose(losses(run / "two"), losses(run / "one"), rtol=2e-5, atol=0)
