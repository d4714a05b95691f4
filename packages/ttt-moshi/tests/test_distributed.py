"""Two gloo processes (FSDP2 with one unit per Moshi layer, and DDP) train like one process on the
whole batch, also when the run stops and resumes (a sharded checkpoint gathered, then loaded into
the shards); the sharded model keeps its state dict keys and streams like the unsharded one."""

from __future__ import annotations

import datetime
import json
import os
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_KWARGS, random_codes
from moshi.modules.transformer import StreamingTransformerLayer
from torch.distributed.fsdp import FSDPModule

from ttt_moshi import FinetuneConfig, Trainer, load_checkpoint, save_shard

TIMEOUT_S = 240  # the whole 2-process run; ~30 s on 2 busy cores
STREAM_CODES = random_codes(2, 13, seed=21)  # B2-T13 read step by step after training


def _stream_text_logits(lm, codes: torch.Tensor) -> torch.Tensor:
    """``codes [B, K, T] -> [B, 1, T, text_card]``: ``forward_text`` one step at a time."""
    with torch.no_grad(), lm.streaming(codes.shape[0]):
        return torch.cat(
            [lm.forward_text(codes[:, :, t : t + 1])[1] for t in range(codes.shape[2])], 2
        )


def _worker(rank: int, world: int, init_file: str, cfg: dict, out: str) -> None:
    from moshi.utils.compile import no_compile

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        config = FinetuneConfig.from_dict(cfg)
        with no_compile():
            Trainer(config, progress=False).fit(max_steps=1)  # stop after one step
            trainer = Trainer(config, progress=False, resume=True)
            trainer.fit()
            if config.parallelism != "fsdp":
                return
            # stream through the sharded model: the root unit (embeddings, heads) is gathered by
            # hand since forward_text does not enter through it; each layer gathers itself
            trainer.module.unshard()
            logits = _stream_text_logits(trainer.lm.eval(), STREAM_CODES)
            trainer.module.reshard()
        if rank == 0:
            units = [n for n, m in trainer.module.named_modules() if isinstance(m, FSDPModule)]
            keys = list(trainer.lm.state_dict())
            with open(f"{out}/sharded.json", "w") as f:
                json.dump([units, keys], f)
            torch.save(logits, f"{out}/stream.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path, cfg: dict) -> None:
    """Run `_worker` in ``world`` processes on the CPU; fail (and stop them) after TIMEOUT_S.

    The processes see no GPU: a trainer puts the model it builds on a visible GPU, and FSDP2 over
    gloo on CUDA tensors killed a process (SIGSEGV on an H200)."""
    with mock.patch.dict(os.environ, CUDA_VISIBLE_DEVICES=""):  # inherited by the spawned only
        ctx = mp.start_processes(
            _worker,
            args=(world, str(tmp_path / "init"), cfg, str(tmp_path)),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=TIMEOUT_S)
    while not ctx.join(timeout=5):
        if datetime.datetime.now() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world}-process run did not finish in {TIMEOUT_S} s")


def _config(tmp_path, name: str, batch_size: int, parallelism: str) -> dict:
    shard = tmp_path / "train.npz"
    if not shard.exists():
        save_shard(shard, random_codes(6, 40, seed=8))
    return {
        "run_dir": str(tmp_path / name),
        "data": {"train_data": [str(shard)]},
        "duration_sec": 1.6,
        "batch_size": batch_size,
        "max_steps": 3,
        "log_freq": 100,
        "parallelism": parallelism,
        "optim": {"lr": 1e-2, "pct_start": 0.4},
        "first_codebook_weight_multiplier": 10.0,
        "text_padding_weight": 0.5,
        "model": {"lm_kwargs": TINY_KWARGS},
        "ttt": {"layers": [0, 2], "config": {"mini_batch_size": 4}},
        "attention_context": 10,
        "ttt_attention_context": 5,
    }


def _losses(run) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.cpu_only(
    "two gloo processes on the CPU (gloo is the CPU backend; one GPU cannot hold two NCCL ranks) "
    "against one run in this process, whose weights the switch would draw on the GPU"
)
@pytest.mark.parametrize("parallelism", ["fsdp", "ddp"])
def test_two_processes_equal_one_on_the_whole_batch(tmp_path, parallelism):
    two = _config(tmp_path, "two", batch_size=2, parallelism=parallelism)  # 2 x 2 windows
    _spawn(2, tmp_path, two)
    one = Trainer(
        FinetuneConfig.from_dict(_config(tmp_path, "one", 4, parallelism)), progress=False
    )
    one.fit()
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    lm_two, payload = load_checkpoint(tmp_path / "two" / "final.pt")  # gathered by rank 0
    assert payload["step"] == 3 and (tmp_path / "two" / "step000001.pt").exists()
    sd_one = one.lm.state_dict()
    for k, v in lm_two.state_dict().items():
        # AdamW divides by sqrt(v): entries with near-zero gradients move by up to lr (1e-2) on
        # rounding alone; measured here: <= 2e-4 after 3 steps, most entries ~1e-6
        torch.testing.assert_close(v, sd_one[k], rtol=0, atol=1e-3, msg=k)
    if parallelism != "fsdp":
        return
    units, keys = json.loads((tmp_path / "sharded.json").read_text())
    layers = [
        f"lm.{n}" for n, m in one.lm.named_modules() if isinstance(m, StreamingTransformerLayer)
    ]
    assert len(layers) == 4  # 3 main-transformer layers (2 of them TTT) + 1 depformer layer
    assert sorted(units) == sorted(["", *layers])  # one unit per layer, then the root
    assert keys == list(sd_one)
    streamed = torch.load(tmp_path / "stream.pt", weights_only=True)
    one.lm.eval()
    with torch.no_grad():
        expected = one.lm.forward_text(STREAM_CODES)[1]  # one pass of the 1-process model
    # the weights differ by <= 2e-4 (above); measured here: logits differ by 2e-6
    torch.testing.assert_close(streamed, expected, rtol=0, atol=1e-3)


def test_fsdp_class_swap_works_for_moshi_layers(tiny_lm):
    """The cause (`FSDPStreamingModule`): torch's own ``(FSDPModule, cls)`` cannot replace a moshi
    layer's class, ttt-moshi's registered class can, and it resolves every FSDPModule method to
    FSDPModule's, with the original class where ``FSDPModule.__new__`` looks for it."""
    from torch.distributed.fsdp._fully_shard._fully_shard import get_cls_to_fsdp_cls

    from ttt_moshi.fsdp import register_fsdp_classes

    layer = tiny_lm.transformer.layers[1]
    cls = type(layer)
    torch_made = type("FSDPPlain", (FSDPModule, cls), {})
    with pytest.raises(TypeError, match="layout differs"):
        layer.__class__ = torch_made
    get_cls_to_fsdp_cls()[cls] = torch_made  # what a failed fully_shard(layer) leaves there
    register_fsdp_classes(tiny_lm)
    fsdp_cls = get_cls_to_fsdp_cls()[cls]
    layer.__class__ = fsdp_cls
    assert isinstance(layer, FSDPModule) and isinstance(layer, StreamingTransformerLayer)
    assert fsdp_cls.__mro__[FSDPModule._orig_cls_mro_index] is cls
    for name, value in vars(FSDPModule).items():
        if callable(value) and name not in ("__init__", "__dict__", "__weakref__"):
            assert getattr(fsdp_cls, name) is getattr(FSDPModule, name), name
    layer.__class__ = cls  # and back
