"""`torch.distributed` plumbing shared by the sampling and training loops.

Under `torchrun` (WORLD_SIZE > 1) a process joins the default process group:
nccl with one GPU per local rank when CUDA is used, gloo on the CPU. Without
torchrun everything runs as rank 0 of 1.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: Optional[str] = None) -> torch.device:
    """Join the process group when launched by torchrun and return this
    process's device: `cuda:LOCAL_RANK` when CUDA is used (the default when a
    GPU is visible and `device` does not say otherwise), else `device` or cpu.
    Does nothing to an already initialised group."""
    dist = torch.distributed
    cuda = torch.cuda.is_available() and (device or "cuda").startswith("cuda")
    if not launched_by_torchrun():
        return torch.device(device or ("cuda" if cuda else "cpu"))
    if cuda:
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device or "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dev


def rank_world() -> Tuple[int, int]:
    """`(rank, world_size)` of the default group, `(0, 1)` without one."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def barrier_fn() -> Callable[[], None]:
    """`torch.distributed.barrier` when a group is initialised, else a no-op."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.barrier
    return lambda: None
