"""Data parallelism under torchrun: one process (rank) per device, for extraction and shortcut training.

    torchrun --nproc_per_node 8 -m stages.extract

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without it (WORLD_SIZE
unset or 1) nothing is initialised and every helper here is the single-process identity, so the
same code runs either way.
"""

import atexit
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def setup() -> torch.device | None:
    """Under torchrun: join the process group and return this rank's device; else None.

    The device is cuda:LOCAL_RANK (backend nccl) when CUDA is available and MIGM_DEVICE is not
    `cpu`, else the CPU (backend gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if torch.cuda.is_available() and os.environ.get("MIGM_DEVICE") != "cpu":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)  # nccl collectives run on the current device
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(cleanup)  # also after an early return or an error
    return device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 alone writes outputs: checkpoints, metrics, MLflow runs."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block before the other ranks, e.g. creates a store that they then open."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over the ranks (a copy: the input, and its autograd graph, are untouched)."""
    x = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def gather(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
