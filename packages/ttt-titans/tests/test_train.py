"""Protocol, checkpoints (atomic, bit-identical, resumable), CLI end to end on a small CSV."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ttt_titans.cli import main
from ttt_titans.train import Runner, _loader_order


@pytest.mark.parametrize(
    "mode,carry",
    [("baseline", False), ("simple_ttt", True), ("meta_ttt", True), ("meta_ttt", False)],
)
def test_checkpoint_resume_gives_same_next_step(tiny_cfg, tmp_path, mode, carry):
    r = Runner(tiny_cfg(mode, f"memory.carry={str(carry).lower()}"), progress=False)
    r.pretrain()
    for _ in range(3):
        r.online_step_once()
    ck = r.save(tmp_path / "ck" / "checkpoint.pt")
    assert not list((tmp_path / "ck").glob("*.tmp"))  # atomic: no temp file left

    r2 = Runner.load(ck, progress=False)
    for (n, a), (_, b) in zip(r.model.state_dict().items(), r2.model.state_dict().items()):
        assert torch.equal(a, b), n
    if carry:
        assert r.mem_state is not None
        for a, b in zip(r.mem_state.params.values(), r2.mem_state.params.values()):
            assert torch.equal(a, b)

    loss1 = r.online_step_once()
    loss2 = r2.online_step_once()
    assert loss1 == loss2
    for (n, a), (_, b) in zip(r.model.state_dict().items(), r2.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert r.history.online_pred == r2.history.online_pred


def test_online_memory_state_not_carried_by_default(tiny_cfg):
    r = Runner(tiny_cfg("meta_ttt"), progress=False)
    r.pretrain()
    x, _ = r.test_ds[1]
    r.online_step_once()
    assert r.mem_state is None
    # the second window's prediction starts from the initial memory weights again
    with torch.no_grad():
        expected, _ = r.model(x[None], None)
    r.online_step_once()
    np.testing.assert_allclose(r.history.online_pred[1], expected.flatten().numpy(), rtol=1e-6)


def test_online_memory_state_is_carried(tiny_cfg):
    r = Runner(tiny_cfg("simple_ttt", "memory.carry=true"), progress=False)
    r.pretrain()
    assert r.mem_state is None
    r.online_step_once()
    s1 = {k: v.clone() for k, v in r.mem_state.params.items()}
    r.online_step_once()
    assert any(not torch.equal(s1[k], r.mem_state.params[k]) for k in s1)
    assert r.mem_state.batch_size == 1


def test_online_prediction_precedes_learning(tiny_cfg):
    """The recorded prediction of a window is made before the step on its truth."""
    r = Runner(tiny_cfg("meta_ttt"), progress=False)
    r.pretrain()
    x, _ = r.test_ds[0]
    with torch.no_grad():
        expected, _ = r.model(x[None], None)
    r.online_step_once()
    np.testing.assert_allclose(r.history.online_pred[0], expected.flatten().numpy(), rtol=1e-6)


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Runner.load(tmp_path / "nope.pt")


def test_online_stride_longer_than_lookback_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="online_stride"):
        Runner(tiny_cfg("simple_ttt", "data.online_stride=32"), progress=False)


def test_cli_run_and_resume(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    args = ["run", "--config", "configs/exp_meta_ttt.yaml", "--out", str(out), "--no-progress"]
    over = tiny_overrides
    assert main(args + over) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["mode"] == "meta_ttt" and np.isfinite(m["mse"]) and m["online_windows"] > 0
    for f in ("config.yaml", "checkpoint.pt", "forecast.png", "cumulative_mse.png"):
        assert (out / f).is_file(), f
    # resume from the finished checkpoint: nothing left to do, same metrics
    assert main([*args, "--resume", *over]) == 0
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["mse"] == m["mse"] and m2["online_windows"] == m["online_windows"]


def test_cli_compare(tmp_path, capsys, make_csv, tiny_overrides):
    p = make_csv(tmp_path / "ett300.csv", n=300)
    out = tmp_path / "cmp"
    over = [*tiny_overrides, f"data.path={p}", "train.epochs=1"]
    assert main(["compare", "--out", str(out), "--no-progress", *over]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["mode"] for r in summary["rows"]] == ["baseline", "simple_ttt", "meta_ttt"]
    assert all(np.isfinite(r["mse"]) and r["seconds_per_epoch"] > 0 for r in summary["rows"])
    assert (out / "compare.md").read_text().count("|") > 20
    assert (out / "cumulative_mse.png").is_file() and (out / "forecast.png").is_file()


def test_cli_bad_input_message(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("when,OT\n1,2\n")
    rc = main(["run", "--config", "base.yaml", "--out", str(tmp_path / "r"), f"data.path={bad}"])
    assert rc == 2
    assert "no 'date' column" in capsys.readouterr().err


def test_streaming_pretraining_batches_are_consecutive_streams(tiny_cfg):
    r = Runner(tiny_cfg("meta_ttt", "memory.carry=true", "train.batch_size=8"), progress=False)
    assert r.streaming
    ds = r.train_ds
    per = len(ds) // 8
    batches = list(r._batches(ds, 8, shuffle=True))
    assert len(batches) == per == r._n_batches(ds, 8)
    for i in (0, per - 1):
        for b in (0, 7):
            x, y = ds[b * per + i]
            assert torch.equal(batches[i][0][b], x) and torch.equal(batches[i][1][b], y)
    # consecutive batches of one stream are ds.stride steps apart: the committed prefix
    x0, x1 = batches[0][0][3], batches[1][0][3]
    assert torch.equal(x0[ds.stride :], x1[: -ds.stride])
    base = Runner(tiny_cfg("baseline", "memory.carry=true"), progress=False)
    assert not base.streaming  # no memory, nothing to carry


def test_train_stride_longer_than_lookback_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="train_stride"):
        Runner(tiny_cfg("simple_ttt", "data.train_stride=17"), progress=False)


@pytest.mark.parametrize("mode,carry", [("meta_ttt", False), ("simple_ttt", True)])
def test_resume_mid_pretraining_matches_uninterrupted(tiny_cfg, tmp_path, mode, carry):
    cfg = tiny_cfg(mode, "train.epochs=3", "train.patience=5", f"memory.carry={str(carry).lower()}")
    a = Runner(cfg, progress=False)
    a.pretrain(on_epoch=lambda r: r.save(tmp_path / "ep1.pt") if r.epoch == 1 else None)
    b = Runner.load(tmp_path / "ep1.pt", progress=False)
    assert b.phase == "pretrain" and b.epoch == 1
    b.pretrain()
    assert a.history.train_loss == b.history.train_loss
    assert a.history.val_loss == b.history.val_loss
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), n


@pytest.mark.parametrize("n, batch_size, shuffle", [(37, 8, True), (16, 4, True), (10, 3, False)])
def test_batch_order_is_the_data_loaders_whatever_the_default_device(n, batch_size, shuffle):
    """Pretraining batches come in DataLoader(shuffle, generator)'s order, drawn on the CPU even
    where a user made another device the default (DataLoader itself then refuses its CPU
    generator; "meta" stands in for CUDA here)."""
    with torch.device("cpu"):  # DataLoader draws on the default device (the switch's: CUDA)
        want = [
            b.tolist()
            for b in DataLoader(list(range(n)), batch_size=batch_size, shuffle=shuffle,
                                generator=torch.Generator().manual_seed(5))
        ]  # fmt: skip
    with torch.device("meta"):
        got = _loader_order(n, batch_size, shuffle, torch.Generator().manual_seed(5))
    assert got == want


@pytest.mark.parametrize("mode, carry", [("meta_ttt", False), ("simple_ttt", True)])
def test_a_run_is_the_same_whatever_the_default_device(tiny_cfg, mode, carry):
    """A runner builds its model on the CPU (weights from the CPU generator), keeps its windows
    and batch order there and computes on ``device``: a user's default device ("meta" stands in
    for CUDA; a factory that followed it would fail or give no numbers) changes nothing."""
    cfg = tiny_cfg(mode, "train.epochs=1", f"memory.carry={str(carry).lower()}")
    runs = []
    for default in ("cpu", "meta"):
        with torch.device(default):
            r = Runner(cfg, progress=False)
            r.pretrain()
            r.online(max_steps=3)
        runs.append(r)
    a, b = runs
    assert a.history.train_loss == b.history.train_loss
    assert a.history.online_pred == b.history.online_pred
    for (n, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert x.device.type == "cpu" and torch.equal(x, y), n
