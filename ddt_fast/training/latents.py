"""Latent extraction: an image folder encoded by the Stable Diffusion VAE into
safetensors shards with a JSON index (what `LatentDataset` reads).

    extract_latents("imagenet/train", "latents256", vae="stabilityai/sd-vae-ft-ema",
                    resolution=256, flip=True)

Images are center-cropped to `resolution` (ADM's crop); with `flip=True`
each image is also encoded mirrored (two items per image). Latents are the
posterior mean times the VAE's scaling factor (0.18215 for SD-VAE), with the
posterior std beside them (`store_std`), so training can use the mean or
draw a sample. Shard k holds items `[k * shard_size, (k + 1) * shard_size)`,
written crash-safe, with a `sha256sum` sidecar (`shard_XXXXXX.safetensors.sha256`)
written before the shard is renamed into place. Running the same call again
skips the shards whose checksum verifies and re-encodes the others (missing,
damaged, or without a sidecar), so it both resumes a killed extraction and
repairs a damaged dataset. Under torchrun (an initialised process group)
rank r writes shards r, r + W, ...; rank 0 writes `index.json` last, once
every shard exists, recording each shard's rows, size and sha256.

`extract.json` records the settings, the VAE's `weights_digest` and dtype,
and a digest of the input files (relative paths and sizes): a later call on
the same out_dir with another VAE, changed images or other settings is
refused, naming what differs.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Union

import torch

from ddt_fast._distributed import barrier_fn, rank_world
from ddt_fast._io import atomic_write_checked, atomic_write_text, read_checksum, remove_stale_temps, sha256_file
from ddt_fast._progress import progress_bar
from ddt_fast.models import weights_digest
from ddt_fast.models.vae import load_vae
from ddt_fast.training.data import (
    INDEX_NAME,
    DatasetError,
    ImageFolderDataset,
    check_shard,
    files_digest,
    scan_image_folder,
)

__all__ = ["extract_latents", "SETTINGS_NAME"]

logger = logging.getLogger("ddt_fast")
SETTINGS_NAME = "extract.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _shard_file(k: int) -> str:
    return os.path.join("shards", f"shard_{k:06d}.safetensors")


# what the recorded settings mean, for the refusal message
_SETTING_NAMES = {
    "vae_digest": "the VAE's weights (weights_digest)",
    "vae_dtype": "the VAE's dtype",
    "files_digest": "the input images (relative paths and sizes)",
    "num_files": "the number of input images",
}


def _shard_done(path: str, n: int) -> bool:
    """Whether shard `path` is complete: its sidecar exists and its sha256
    matches (reads the shard once), and it holds `n` rows."""
    try:
        expected = read_checksum(path)
        if expected is None:  # no sidecar: never finished by this code, or from before checksums
            return False
        check_shard(path, n)
        return sha256_file(path) == expected
    except (DatasetError, ValueError, OSError):
        return False


@torch.no_grad()
def extract_latents(
    image_folder: str,
    out_dir: str,
    vae: Union[str, torch.nn.Module] = "stabilityai/sd-vae-ft-ema",
    resolution: int = 256,
    flip: bool = False,
    batch_size: int = 32,
    shard_size: int = 1024,
    dtype: str = "float16",
    store_std: bool = True,
    device=None,
    vae_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    scaling_factor: Optional[float] = None,
) -> str:
    """Encode `image_folder` (root/<class>/<images>) into `out_dir`; returns
    the path of `index.json`. `vae` is a `diffusers.AutoencoderKL`, a local
    folder or a model-hub id. Settings other than the ones of an earlier,
    unfinished call on the same `out_dir` raise instead of mixing shards."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if batch_size < 1 or shard_size < 1 or resolution < 8:
        raise ValueError("batch_size and shard_size must be >= 1 and resolution >= 8")
    rank, world = rank_world()
    barrier = barrier_fn()
    classes, files, labels = scan_image_folder(image_folder)
    vae_name = vae if isinstance(vae, str) else type(vae).__name__
    if isinstance(vae, str):
        vae = load_vae(vae, dtype=vae_dtype)
    vae_digest = weights_digest(vae)
    dev = (
        torch.device(device)
        if device is not None
        else (torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu"))
    )
    vae = vae.to(dev).eval()
    param = next(vae.parameters())
    if scaling_factor is None:
        scaling_factor = float(getattr(getattr(vae, "config", None), "scaling_factor", 0.18215))
    settings = {
        "resolution": resolution,
        "flip": bool(flip),
        "vae": vae_name,
        "scaling_factor": scaling_factor,
        "shard_size": shard_size,
        "dtype": dtype,
        "store_std": bool(store_std),
        "num_files": len(files),
        "vae_digest": vae_digest,
        "vae_dtype": str(param.dtype).replace("torch.", ""),
        "files_digest": files_digest(image_folder, files),
    }
    _check_settings(out_dir, settings, rank, barrier)

    items = [(i, f) for i in range(len(files)) for f in ((False, True) if flip else (False,))]
    images = ImageFolderDataset(image_folder, resolution, items=items, files=files, labels=labels)
    num_shards = (len(items) + shard_size - 1) // shard_size
    counts = [min(shard_size, len(items) - k * shard_size) for k in range(num_shards)]
    mine = [k for k in range(num_shards) if k % world == rank]
    todo = [k for k in mine if not _shard_done(os.path.join(out_dir, _shard_file(k)), counts[k])]
    bar = progress_bar(
        progress and rank == 0, total=len(mine), initial=len(mine) - len(todo), desc="encoding", unit="shard"
    )
    for k in todo:
        lo, hi = k * shard_size, k * shard_size + counts[k]
        means, stds = [], []
        for b in range(lo, hi, batch_size):
            x = torch.stack([images.image(i) for i in range(b, min(b + batch_size, hi))])
            posterior = vae.encode(x.to(dev, param.dtype)).latent_dist
            means.append((posterior.mean.float() * scaling_factor).to(_DTYPES[dtype]).cpu())
            stds.append((posterior.std.float() * scaling_factor).to(_DTYPES[dtype]).cpu())
        tensors = {
            "latents": torch.cat(means).contiguous(),
            "labels": torch.tensor([labels[items[i][0]] for i in range(lo, hi)], dtype=torch.int64),
            "source": torch.tensor([items[i][0] for i in range(lo, hi)], dtype=torch.int64),
            "flip": torch.tensor([items[i][1] for i in range(lo, hi)], dtype=torch.uint8),
        }
        if store_std:
            tensors["std"] = torch.cat(stds).contiguous()
        from safetensors.torch import save_file

        atomic_write_checked(
            os.path.join(out_dir, _shard_file(k)), lambda tmp, t=tensors: save_file(t, tmp), overwrite=True
        )  # absent or failed its check
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    barrier()
    index_path = os.path.join(out_dir, INDEX_NAME)
    if rank == 0:
        shards = []
        for k in range(num_shards):  # every rank's shards, before the index says the dataset is complete
            path = os.path.join(out_dir, _shard_file(k))
            check_shard(path, counts[k], root=out_dir)
            digest = read_checksum(path)  # verified (skipped) or hashed as written by the rank that owns it
            if digest is None:
                raise DatasetError(f"latent shard {path} has no checksum sidecar; re-run extract_latents")
            shards.append({"file": _shard_file(k), "num": counts[k], "bytes": os.path.getsize(path), "sha256": digest})
        index = dict(
            settings,
            format="ddt_fast.latents/1",
            classes=classes,
            files=files,
            labels=labels,
            num_items=len(items),
            shards=shards,
        )
        atomic_write_text(index_path, json.dumps(index) + "\n", overwrite=True)
    barrier()
    return index_path


def _check_settings(out_dir: str, settings: dict, rank: int, barrier) -> None:
    path = os.path.join(out_dir, SETTINGS_NAME)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        unrecorded = sorted(k for k in settings if k not in old and k in _SETTING_NAMES)
        if unrecorded:  # an extraction started before these were recorded
            logger.warning(
                "%s records no %s (written by an earlier version): not compared", path, ", ".join(unrecorded)
            )
        diff = {k: (old.get(k), v) for k, v in settings.items() if k not in unrecorded and old.get(k) != v}
        if diff:
            what = "; ".join(
                f"{k}"
                + (f" ({_SETTING_NAMES[k]})" if k in _SETTING_NAMES else "")
                + f": {old.get(k)!r} then, {v!r} now"
                for k, v in diff.items()
            )
            raise ValueError(
                f"{out_dir} holds latents extracted with other settings (earlier, now): {what}. "
                "Mixing them would give a dataset of two kinds: use another out_dir, restore the "
                "earlier settings (VAE, images), or delete the folder to start over"
            )
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(
            f"{out_dir} exists and is not a latent extraction folder; nothing is overwritten "
            "without asking: choose an empty or new out_dir"
        )
    barrier()
    if rank == 0:  # before any shard is written
        removed = remove_stale_temps(os.path.join(out_dir, "shards"))
        removed += remove_stale_temps(out_dir, [INDEX_NAME, SETTINGS_NAME])
        if removed:
            logger.warning("removed %d file(s) that killed writes left: %s", len(removed), ", ".join(removed))
        if not os.path.exists(path):
            atomic_write_text(path, json.dumps(settings, indent=1) + "\n", overwrite=False)
    barrier()
