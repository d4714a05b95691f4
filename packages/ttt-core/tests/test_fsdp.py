"""FSDP2 (``fully_shard``, gloo, 2 processes) over a model with TTT layers: the same loss and
gradients as one process on the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_ddp import TinyModel, _data, _free_port, end_worker, single_process


def _worker(rank, world, port, out_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    # a CPU mesh, named: fully_shard's default mesh takes the machine's accelerator, which on a
    # machine with a GPU moved the shards to cuda:0 while the data stayed on the CPU
    mesh = init_device_mesh("cpu", (world,))
    model = TinyModel()
    for layer in (model.ttt1, model.ttt2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = _data()
    shard = slice(rank * 2, rank * 2 + 2)
    loss = ((model(x[shard]) - y[shard]) ** 2).mean()
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # gathers every shard
    if rank == 0:
        torch.save({"loss": total / world, "grads": grads}, out_path)
    dist.barrier()
    dist.destroy_process_group()
    end_worker()


@pytest.mark.cpu_only(
    "FSDP2 over two gloo processes on the CPU against one process: the spawned workers do not run "
    "under the device switch (their model and data are on the CPU), and the in-process reference "
    "would draw its weights on the GPU (other numbers than the workers')"
)
def test_fsdp2_loss_and_gradients_equal_single_process(tmp_path):
    out = tmp_path / "fsdp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    loss, grads = single_process()
    torch.testing.assert_close(got["loss"], loss, rtol=1e-6, atol=1e-7)
    for n, g in grads.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-5, atol=1e-6, msg=n)
