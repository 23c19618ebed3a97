"""Data-parallel training under `torchrun`: DDP (default) or FSDP2.

`init_distributed()` joins the process group that torchrun describes (gloo on
the CPU, nccl on GPUs, one GPU per local rank); `wrap()` applies the strategy;
the state-dict helpers give full (gathered, CPU) weights and optimizer state
keyed by parameter name whatever the strategy, so checkpoints do not depend
on how the run was sharded.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn

from ddt_fast._distributed import barrier_fn, init_from_env, launched_by_torchrun, rank_world

__all__ = [
    "init_distributed",
    "rank_world",
    "barrier_fn",
    "launched_by_torchrun",
    "wrap",
    "fsdp_available",
    "model_state",
    "load_model_state",
    "optimizer_state",
    "load_optimizer_state",
    "all_reduce_mean",
    "gather_objects",
    "broadcast_object",
]


def init_distributed(device=None) -> torch.device:
    """Join torchrun's process group (if launched by torchrun) and return this process's device."""
    return init_from_env(device)


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def wrap(module: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module the training step calls: `module` itself on one process,
    DDP or FSDP2 (each DDT block its own shard group, then the root) under a
    process group of more than one process."""
    _, world = rank_world()
    if world == 1:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if strategy == "fsdp":
        if not fsdp_available():
            raise RuntimeError(
                f"strategy='fsdp' needs torch.distributed.fsdp.fully_shard (FSDP2, PyTorch >= 2.6); "
                f"this PyTorch ({torch.__version__}) lacks it: use strategy='ddp'"
            )
        from torch.distributed.fsdp import fully_shard

        for block in module.denoiser.blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Full weights of `module` on the CPU (for FSDP: gathered; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def load_model_state(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Full optimizer state keyed by parameter name, on the CPU."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over processes (itself on one process)."""
    rank, world = rank_world()
    if world == 1:
        return t
    t = t.clone()
    torch.distributed.all_reduce(t)
    return t / world


def gather_objects(obj: Any) -> list:
    """`[obj of rank 0, obj of rank 1, ...]` on every process."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    _, world = rank_world()
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
