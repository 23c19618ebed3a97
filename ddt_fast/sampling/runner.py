"""Sampling many images (FID-sized runs) to a folder, on one process or many.

`sample_to_folder` samples `classes[i]` from `seeds[i]` for every i. The
samples still missing are cut into batches; under `torchrun` (a
`torch.distributed` process group) rank r takes batches r, r + W, r + 2W, ...
Each finished batch is written as a shard file (temporary file, then rename)
holding, beside the samples, each sample's index, class and seed and the
settings that determine the samples' content (`run_settings`: the model's
weights digest and configuration, the sampler's settings, schedule and mode,
the latent size, the VAE's weights digest). When every sample exists, rank 0
merges them into `samples.npz` (uint8 images under `arr_0`, or `latents.npz`
without a VAE) and writes `manifest.json`.

A run started again on the same folder reuses exactly the samples that match
it: same settings, and the same class and seed at the same index. The batch
size and the number of processes may differ (each sample's noise comes from
its own seed). Shards made with other settings, or holding other classes or
seeds at the same indices, make the run stop with a message naming what
differs; `overwrite=True` deletes them and samples those indices again.
Shards are zip files whose members carry CRC-32 checksums: a shard that
fails to read back completely is reported, deleted and sampled again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ddt_fast._distributed import barrier_fn, rank_world
from ddt_fast._io import atomic_write_text, remove_stale_temps
from ddt_fast._progress import progress_bar
from ddt_fast.models import weights_digest
from ddt_fast.sampling.outputs import decode_latents, make_grid, save_npz, save_png
from ddt_fast.sampling.samplers import make_noise

__all__ = ["sample_to_folder", "run_settings", "SHARD_DIR", "MANIFEST_NAME"]

logger = logging.getLogger("ddt_fast")

SHARD_DIR = "shards"
MANIFEST_NAME = "manifest.json"
_SHARD_NAME = re.compile(r"^samples_(\d{8})_(\d{8})\.npz$")
_LEGACY_SHARD_NAME = re.compile(r"^batch_\d{6}\.npz$")  # before shards recorded their settings


def run_settings(model, sampler, latent_size: int, vae=None) -> Dict[str, object]:
    """What determines a sample's content besides its class and seed (JSON-able)."""
    param = next(model.parameters())
    sched = sampler.schedule
    return {
        "weights_sha256": weights_digest(model),
        "model_config": dict(model.config),
        "model_dtype": str(param.dtype).replace("torch.", ""),
        "sampler": sampler.settings(),
        "mode": sampler.mode,
        "cache_modulation": bool(getattr(sampler, "cache_modulation", True)),
        "autocast": None if getattr(sampler, "autocast", None) is None else str(sampler.autocast).replace("torch.", ""),
        "schedule": {"num_steps": sched.num_steps, "steps": list(sched.steps)},
        "latent_size": int(latent_size),
        "vae_sha256": None if vae is None else weights_digest(vae),
    }


def _fingerprint(settings: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _shard_path(out_dir: str, idx: Sequence[int]) -> str:
    return os.path.join(out_dir, SHARD_DIR, f"samples_{idx[0]:08d}_{idx[-1]:08d}.npz")


@dataclass
class _Shard:
    path: str
    settings: Optional[dict]  # None: written before shards recorded their settings
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    classes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _read_shard(path: str, full: bool) -> _Shard:
    """A shard's records; `full` also reads every member, so each one's CRC-32 is checked.
    Raises (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) when unreadable."""
    with np.load(path, allow_pickle=False) as z:
        if full:
            for name in z.files:
                z[name]
        if "settings" not in z.files:
            return _Shard(path, None)
        return _Shard(
            path,
            json.loads(str(z["settings"])),
            z["index"].astype(np.int64),
            z["classes"].astype(np.int64),
            z["seeds"].astype(np.int64),
        )


_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _scan(out_dir: str, verify: bool) -> Tuple[List[_Shard], List[str]]:
    """The shards in `out_dir` and the paths of those that do not read back."""
    folder = os.path.join(out_dir, SHARD_DIR)
    if not os.path.isdir(folder):
        return [], []
    shards, broken = [], []
    for name in sorted(os.listdir(folder)):
        if not (_SHARD_NAME.match(name) or _LEGACY_SHARD_NAME.match(name)):
            continue
        path = os.path.join(folder, name)
        try:
            shards.append(_read_shard(path, full=verify))
        except _UNREADABLE:
            broken.append(path)
    return shards, broken


def _describe_difference(old: Optional[dict], new: dict) -> str:
    if old is None:
        return "settings not recorded (written by an earlier ddt_fast version)"
    parts = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            parts += [
                f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            ]
        elif key.endswith("sha256") and a and b:
            parts.append(f"{key}: {a[:12]}... -> {b[:12]}...")
        else:
            parts.append(f"{key}: {a!r} -> {b!r}")
    return ", ".join(parts)


def _plan(shards: List[_Shard], settings: dict, classes: List[int], seeds: List[int]):
    """`(found, conflicts)`: found maps index -> (shard path, row) for every
    sample a shard holds with these settings, class and seed; conflicts are
    `(shard path, reason)` for shards that hold anything else within range."""
    n = len(classes)
    found: Dict[int, Tuple[str, int]] = {}
    conflicts: List[Tuple[str, str]] = []
    for sh in shards:
        if sh.settings != settings:
            conflicts.append((sh.path, _describe_difference(sh.settings, settings)))
            continue
        wrong = [
            int(i)
            for i, c, s in zip(sh.index, sh.classes, sh.seeds)
            if i < n and (classes[i], seeds[i]) != (int(c), int(s))
        ]
        if wrong:
            i = wrong[0]
            row = int(np.nonzero(sh.index == i)[0][0])
            conflicts.append(
                (
                    sh.path,
                    f"{len(wrong)} sample(s) with other classes or seeds (index {i}: class "
                    f"{int(sh.classes[row])} seed {int(sh.seeds[row])} -> class {classes[i]} "
                    f"seed {seeds[i]})",
                )
            )
            continue
        for row, i in enumerate(sh.index):
            if i < n:
                found.setdefault(int(i), (sh.path, row))
    return found, conflicts


def _conflict_error(out_dir: str, conflicts: List[Tuple[str, str]]) -> FileExistsError:
    path, reason = conflicts[0]
    more = f" (and {len(conflicts) - 1} more shard(s))" if len(conflicts) > 1 else ""
    return FileExistsError(
        f"{out_dir} holds samples made differently from this run: {os.path.basename(path)}{more}: {reason}. "
        "Nothing is overwritten without asking: pass overwrite=True (ddt-fast sample --force) to replace them, "
        "or choose another output folder"
    )


def sample_to_folder(
    model,
    sampler,
    classes: Sequence[int],
    seeds: Sequence[int],
    out_dir: str,
    *,
    batch_size: int = 16,
    vae=None,
    latent_size: int = 32,
    png: bool = True,
    grid: bool = True,
    progress: bool = True,
    overwrite: bool = False,
) -> str:
    """Sample `classes[i]` from `seeds[i]` for every i into `out_dir`; returns
    the path of the merged `.npz` (on every rank; rank 0 writes it).

    Resumable: samples already in `out_dir` with the same settings, class and
    seed are kept; anything else there raises FileExistsError naming what
    differs, unless `overwrite=True`, which replaces it."""
    classes, seeds = list(map(int, classes)), list(map(int, seeds))
    if len(classes) != len(seeds):
        raise ValueError(f"{len(classes)} classes but {len(seeds)} seeds")
    if not classes:
        raise ValueError("nothing to sample: classes and seeds are empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if latent_size < 1:
        raise ValueError(f"latent_size must be >= 1, got {latent_size}")
    bad = [c for c in classes if not 0 <= c < model.num_classes]
    if bad:
        raise ValueError(
            f"class ids {sorted(set(bad))[:8]} out of range: the model has classes 0..{model.num_classes - 1}"
        )
    rank, world = rank_world()
    barrier = barrier_fn()
    device = next(model.parameters()).device
    settings = run_settings(model, sampler, latent_size, vae)
    n = len(classes)
    shard_dir = os.path.join(out_dir, SHARD_DIR)
    merged = os.path.join(out_dir, "samples.npz" if vae is not None else "latents.npz")
    derived = [merged, os.path.join(out_dir, MANIFEST_NAME), os.path.join(out_dir, "grid.png")]

    # Rank 0 checks the folder while nobody writes to it: temporaries of killed writes go, shards that
    # do not read back completely go (they are sampled again), a mismatch stops every rank.
    error: Optional[str] = None
    if rank == 0:
        remove_stale_temps(shard_dir)
        remove_stale_temps(out_dir)
        remove_stale_temps(os.path.join(out_dir, "images"))
        shards, broken = _scan(out_dir, verify=True)
        for path in broken:
            logger.warning("sample shard %s is corrupt or truncated; deleting it, its samples are drawn again", path)
            os.remove(path)
        found, conflicts = _plan(shards, settings, classes, seeds)
        if conflicts and not overwrite:
            error = str(_conflict_error(out_dir, conflicts))
        else:
            for path, reason in conflicts:
                logger.warning("replacing %s (overwrite=True): %s", path, reason)
                os.remove(path)
            if len(found) < n:  # the merged files would describe an unfinished run
                for path in derived:
                    if os.path.exists(path):
                        os.remove(path)
    error = _share(error, rank, world)
    if error is not None:
        raise FileExistsError(error)
    barrier()
    os.makedirs(shard_dir, exist_ok=True)
    if png and vae is not None:
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    shards, _ = _scan(out_dir, verify=False)  # every rank: the same plan
    found, _ = _plan(shards, settings, classes, seeds)
    missing = [i for i in range(n) if i not in found]
    batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
    mine = batches[rank::world]
    barrier()  # every rank has its plan before any writes a shard
    settings_text = np.asarray(json.dumps(settings, sort_keys=True))
    bar = progress_bar(progress and rank == 0, total=len(mine), desc="sampling", unit="batch")
    for idx in mine:
        y = torch.tensor([classes[i] for i in idx], device=device)
        noise = make_noise([seeds[i] for i in idx], (model.in_channels, latent_size, latent_size), device)
        latents = sampler(model, noise, y, torch.full_like(y, model.num_classes))
        payload = {
            "classes": y.cpu().numpy(),
            "seeds": np.asarray([seeds[i] for i in idx]),
            "index": np.asarray(idx),
            "latents": latents.float().cpu().numpy(),
            "settings": settings_text,
            "fingerprint": np.asarray(_fingerprint(settings)),
        }
        if vae is not None:
            payload["images"] = decode_latents(latents, vae)
            if png:
                for i, img in zip(idx, payload["images"]):
                    save_png(img, os.path.join(out_dir, "images", f"{i:06d}.png"), overwrite=True)
        save_npz(_shard_path(out_dir, idx), payload.pop("images", payload["latents"]), overwrite=True, **payload)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    barrier()
    if rank == 0:
        _merge(out_dir, merged, settings, classes, seeds, batch_size, world, sampler, vae, grid)
    barrier()
    return merged


def _merge(out_dir, merged, settings, classes, seeds, batch_size, world, sampler, vae, grid) -> None:
    shards, broken = _scan(out_dir, verify=False)
    found, _ = _plan(shards, settings, classes, seeds)
    missing = [i for i in range(len(classes)) if i not in found]
    if missing or broken:
        raise RuntimeError(
            f"{out_dir}: {len(missing)} sample(s) missing after sampling (first index "
            f"{missing[:1]}), unreadable shards {broken[:3]}; another process may be writing "
            "there. Run the same call again to sample what is missing."
        )
    rows_by_shard: Dict[str, List[Tuple[int, int]]] = {}
    for i, (path, row) in found.items():
        rows_by_shard.setdefault(path, []).append((i, row))
    arr = None
    for path, rows in sorted(rows_by_shard.items()):
        with np.load(path, allow_pickle=False) as z:
            part = z["arr_0"]
        if arr is None:
            arr = np.empty((len(classes),) + part.shape[1:], dtype=part.dtype)
        for i, row in rows:
            arr[i] = part[row]
    save_npz(merged, arr, overwrite=True, classes=np.asarray(classes), seeds=np.asarray(seeds))
    if grid and vae is not None:
        save_png(make_grid(arr[:64]), os.path.join(out_dir, "grid.png"), overwrite=True)
    atomic_write_text(
        os.path.join(out_dir, MANIFEST_NAME),
        json.dumps(
            {
                "num_samples": len(classes),
                "batch_size": batch_size,
                "world_size": world,
                "latent_size": settings["latent_size"],
                "decoded": vae is not None,
                "sampler": sampler.settings(),
                "mode": sampler.mode,
                "schedule": sampler.schedule.to_dict(),
                "settings": settings,
                "fingerprint": _fingerprint(settings),
            },
            indent=1,
        ),
        overwrite=True,
    )


def _share(message: Optional[str], rank: int, world: int) -> Optional[str]:
    """Rank 0's verdict, on every rank (so all stop together)."""
    if world == 1:
        return message
    box = [message if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
