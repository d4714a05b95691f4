"""2-process DDP (gloo) over a model with TTT layers gives the gradients of one process on the batch."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ttt_core import TTTConfig, TTTLayer


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 16)
        self.ttt1 = TTTLayer(TTTConfig(hidden_size=16, num_heads=2, mini_batch_size=4))
        self.ttt2 = TTTLayer(TTTConfig(hidden_size=16, num_heads=2, inner="mlp", titans=True))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.ttt1(h)[0]
        h = h + self.ttt2(h)[0]
        return self.head(h).squeeze(-1)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 10, 8, generator=g), torch.randn(4, 10, generator=g)


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(TinyModel())
    x, y = _data()
    shard = slice(rank * 2, rank * 2 + 2)
    loss = ((model(x[shard]) - y[shard]) ** 2).mean()
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    end_worker()


def end_worker():
    """End a worker that finished its work (results saved, process group destroyed) at once:
    ``os._exit(0)`` skips the interpreter's teardown, where gloo's threads once aborted a run whose
    work had passed ("terminate called without an active exception", SIGABRT, torch 2.13; not
    reproduced since). A worker that raises never gets here: mp.spawn reports its traceback."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process():
    """The loss and every parameter's gradient of one process on the whole batch of 4 (its mean
    equals the average of the two 2-sample shard means)."""
    model = TinyModel()
    x, y = _data()
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    _, grads = single_process()
    for n, g in grads.items():
        torch.testing.assert_close(ddp_grads[n], g, rtol=1e-5, atol=1e-6, msg=n)
