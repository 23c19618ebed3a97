"""Sampling many images (FID-sized runs) to a folder, on one process or many.

`sample_to_folder` splits the (class, seed) pairs into fixed batches; under
`torchrun` (a `torch.distributed` process group) rank r takes batches
r, r + W, r + 2W, ... Each finished batch is written as a shard file
(temporary file, then rename), so a stopped run started again with the same
arguments skips the shards it already has. When every shard exists, rank 0
merges them into `samples.npz` (uint8 images under `arr_0`, or `latents.npz`
without a VAE). Because each sample's noise comes from its own seed, the
result does not depend on the batch size or the number of processes.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch

from ddt_fast._distributed import barrier_fn, rank_world
from ddt_fast._io import atomic_write_text
from ddt_fast._progress import progress_bar
from ddt_fast.sampling.outputs import decode_latents, make_grid, save_npz, save_png
from ddt_fast.sampling.samplers import make_noise


def _dist():
    rank, world = rank_world()
    return rank, world, barrier_fn()


def _shard_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, "shards", f"batch_{k:06d}.npz")


def _valid_shard(path: str, n: int) -> bool:
    try:
        with np.load(path) as z:
            return len(z["classes"]) == n
    except (OSError, ValueError, KeyError, EOFError):
        return False


def sample_to_folder(model, sampler, classes: Sequence[int], seeds: Sequence[int], out_dir: str, *,
                     batch_size: int = 16, vae=None, latent_size: int = 32, png: bool = True,
                     grid: bool = True, progress: bool = True, overwrite: bool = False) -> str:
    """Sample `classes[i]` from `seeds[i]` for every i into `out_dir`; returns
    the path of the merged `.npz` (on every rank; rank 0 writes it)."""
    classes, seeds = list(map(int, classes)), list(map(int, seeds))
    if len(classes) != len(seeds):
        raise ValueError(f"{len(classes)} classes but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world, barrier = _dist()
    device = next(model.parameters()).device
    os.makedirs(os.path.join(out_dir, "shards"), exist_ok=True)
    if png and vae is not None:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    batches = [range(i, min(i + batch_size, len(classes))) for i in range(0, len(classes), batch_size)]
    mine = [k for k in range(len(batches)) if k % world == rank]
    todo = [k for k in mine if not _valid_shard(_shard_path(out_dir, k), len(batches[k]))]
    bar = progress_bar(progress and rank == 0, total=len(mine), initial=len(mine) - len(todo), desc="sampling",
                       unit="batch")
    for k in todo:
        idx = batches[k]
        y = torch.tensor([classes[i] for i in idx], device=device)
        noise = make_noise([seeds[i] for i in idx], (model.in_channels, latent_size, latent_size), device)
        latents = sampler(model, noise, y, torch.full_like(y, model.num_classes))
        payload = {"classes": y.cpu().numpy(), "seeds": np.asarray([seeds[i] for i in idx]),
                   "index": np.asarray(list(idx)), "latents": latents.float().cpu().numpy()}
        if vae is not None:
            payload["images"] = decode_latents(latents, vae)
            if png:
                for i, img in zip(idx, payload["images"]):
                    save_png(img, os.path.join(out_dir, "images", f"{i:06d}.png"), overwrite=True)
        save_npz(_shard_path(out_dir, k), payload.pop("images", payload["latents"]), overwrite=True, **payload)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    barrier()
    merged = os.path.join(out_dir, "samples.npz" if vae is not None else "latents.npz")
    if rank == 0:
        parts = []
        for k in range(len(batches)):
            with np.load(_shard_path(out_dir, k)) as z:
                parts.append(z["arr_0"])
        arr = np.concatenate(parts)
        save_npz(merged, arr, overwrite=True, classes=np.asarray(classes), seeds=np.asarray(seeds))
        if grid and vae is not None:
            save_png(make_grid(arr[:64]), os.path.join(out_dir, "grid.png"), overwrite=True)
        atomic_write_text(os.path.join(out_dir, "manifest.json"), json.dumps({
            "num_samples": len(classes), "batch_size": batch_size, "world_size": world,
            "latent_size": latent_size, "decoded": vae is not None,
            "sampler": sampler.settings(), "mode": sampler.mode,
            "schedule": sampler.schedule.to_dict()}, indent=1), overwrite=True)
    barrier()
    return merged
