"""What a torchrun worker sets up before any work: its device and the process group (a plain `python`
run becomes a world of one), and the run's lock on its output folder. Used by train.py and judge.py.

    torchrun --standalone --nproc_per_node=8 train.py ...     # each worker: setup_distributed, acquire_lock
"""
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from checks import RunLock, UserError


def setup_distributed(want):
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` becomes a world of one, so there is
    one code path (FSDP2 needs a process group even on one rank). CUDA only where every process of
    this node gets its own GPU, else one line naming both numbers (checked on every rank alike, so
    rank 0, the one that speaks, says it). -> rank, world, device, the device mesh for fully_shard."""
    # without torchrun, a world of one that meets in memory: no port to pick that another process could take
    group = dict(store=dist.HashStore(), rank=0, world_size=1) if "RANK" not in os.environ else {}
    want = want or ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda":
        gpus, procs = torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if procs > gpus:
            raise UserError(f"{procs} processes on this node but {gpus} CUDA device(s): start at most {gpus} "
                            f"(torchrun --nproc_per_node) or pass --device cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **group)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **group)
    # an explicit mesh: fully_shard's default follows the accelerator, a CUDA mesh over a gloo group
    return dist.get_rank(), dist.get_world_size(), device, init_device_mesh(device.type, (dist.get_world_size(),))


def all_sum(*xs, device):
    """Python numbers summed over the ranks."""
    t = torch.tensor(xs, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def acquire_lock(out, rank, device):
    """OUT/.lock, taken by rank 0 (checks.RunLock); if it cannot be, every rank stops and rank 0 says why."""
    lock = error = None
    if rank == 0:
        try:
            lock = RunLock(out).acquire()
        except UserError as e:
            error = e
    if all_sum(error is not None, device=device)[0]:
        raise error or UserError("")
    return lock
