"""Training checkpoints: everything a run needs to continue exactly.

One file per checkpoint, `OUT/checkpoints/step_00001000.ckpt`, written to a
temporary file and renamed (a crash never leaves half a checkpoint), holding:

- `state_dict`: the weights in the published Lightning layout, `denoiser.*`
  (training weights), `ema_denoiser.*` (EMA) and `diffusion_trainer.proj.*`
  (REPA projector), so `ddt_fast.load_checkpoint` and tools written for the
  published checkpoints read it;
- `optimizer` (full, keyed by parameter name), `step`, `data` (stream
  position), `rng` (python, numpy, torch and CUDA generator states of every
  process), `config` (the `TrainConfig`), `inputs` (digests of the dataset,
  init_from and feature encoder weights: see `Trainer`), `hyper_parameters`
  (the DDT constructor arguments).

Files are opened with `torch.load(weights_only=True)`: nothing in them
needs pickled Python objects.

Checksums: beside every checkpoint a sidecar `step_00001000.ckpt.sha256`
(one `sha256sum` line: digest, two spaces, file name; `sha256sum -c` checks
it) is written before the checkpoint is renamed into place, so a checkpoint
without one predates checksums (it is loaded with a warning). Loading
verifies it; `find_resumable` falls back past checkpoints that fail
(empty, truncated, bit-flipped, unreadable) and moves them aside as
`step_XXXXXXXX.ckpt.corrupt` (with their sidecar), where no listing,
resume or prune sees them again; they are kept for inspection, never deleted.
"""

from __future__ import annotations

import logging
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ddt_fast._io import (
    atomic_write,
    atomic_write_checked,
    checksum_path,
    remove_stale_temps,
)
from ddt_fast.models.checkpoint import EMA_PREFIX, MODEL_PREFIX, PROJ_PREFIX, CheckpointError, verify_checksum

__all__ = [
    "FORMAT",
    "CKPT_DIR",
    "CORRUPT_SUFFIX",
    "checkpoint_path",
    "list_checkpoints",
    "prune",
    "clean_checkpoint_dir",
    "rng_state",
    "set_rng_state",
    "lightning_state_dict",
    "save_checkpoint",
    "load_training_checkpoint",
    "move_aside",
    "find_resumable",
    "newest_verified",
    "split_weights",
    "save_lightning",
    "export_lightning",
    "verify_checksum",
]

logger = logging.getLogger("ddt_fast")
FORMAT = "ddt_fast.train/1"
CKPT_DIR = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"
_NAME = re.compile(r"^step_(\d{8,})\.ckpt$")
_SIDECAR = re.compile(r"^step_(\d{8,})\.ckpt\.sha256$")


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CKPT_DIR, f"step_{step:08d}.ckpt")


def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """`(step, path)` of the checkpoints in `out_dir`, oldest first."""
    folder = os.path.join(out_dir, CKPT_DIR)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder) if (m := _NAME.match(name))]
    return sorted(found)


def prune(out_dir: str, keep_last: int) -> List[str]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all) and
    their sidecars; returns the checkpoints deleted. Checkpoints moved aside
    as corrupt are not listed, so they never count among the kept ones."""
    if keep_last <= 0:
        return []
    old = [path for _, path in list_checkpoints(out_dir)[:-keep_last]]
    for path in old:
        os.remove(path)
        try:
            os.remove(checksum_path(path))
        except FileNotFoundError:
            pass
    return old


def clean_checkpoint_dir(out_dir: str) -> List[str]:
    """Delete what killed writes left in `out_dir/checkpoints`: temporary
    files and sidecars whose checkpoint was never renamed into place. Call it
    on one process, before that run writes anything; returns what was deleted."""
    folder = os.path.join(out_dir, CKPT_DIR)
    removed = remove_stale_temps(folder)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            m = _SIDECAR.match(name)
            if m and not os.path.exists(os.path.join(folder, name[: -len(".sha256")])):
                os.remove(os.path.join(folder, name))
                removed.append(os.path.join(folder, name))
    return removed


# ---------------------------------------------------------------------------
# random number generators


def rng_state() -> Dict[str, Any]:
    """This process's generator states, in types `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------
# files


def lightning_state_dict(
    model: Dict[str, torch.Tensor], ema: Dict[str, torch.Tensor], proj: Optional[Dict[str, torch.Tensor]] = None
) -> Dict[str, torch.Tensor]:
    """Weights keyed as in the published Lightning checkpoints."""
    out = {MODEL_PREFIX + k: v for k, v in model.items()}
    out.update({EMA_PREFIX + k: v for k, v in ema.items()})
    if proj:
        out.update({PROJ_PREFIX + "proj." + k: v for k, v in proj.items()})
    return out


def save_checkpoint(path: str, payload: Dict[str, Any]) -> str:
    """Write `payload` (see the module docstring) crash-safe, with its
    checksum sidecar written before the checkpoint is renamed into place."""
    payload = dict(payload, format=FORMAT)
    atomic_write_checked(path, lambda tmp: torch.save(payload, tmp), overwrite=True)  # the run's own folder
    return path


def load_training_checkpoint(path: str, verify: bool = True) -> Dict[str, Any]:
    """A checkpoint written by the trainer, or CheckpointError saying what is
    wrong with it. `verify`: check the file against its sidecar first (a
    file without one, from before checksums, is loaded with a warning)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if verify and not verify_checksum(path):
        logger.warning(
            "checkpoint %s has no checksum file (%s; written before checksums were recorded): loading it unverified",
            path,
            os.path.basename(checksum_path(path)),
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: many types
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Resuming falls back to the checkpoint before it; or start a new run in another out_dir."
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a ddt_fast training checkpoint (format "
            f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}, "
            f"expected {FORMAT!r}); to start from its weights use init_from=..."
        )
    missing = [k for k in ("state_dict", "optimizer", "step", "rng", "data", "config") if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it cannot be resumed from")
    m = _NAME.match(os.path.basename(path))
    if m and int(m.group(1)) != obj["step"]:
        raise CheckpointError(f"checkpoint {path} holds step {obj['step']}, not the step its name says")
    return obj


def move_aside(path: str) -> str:
    """Rename a corrupt checkpoint (and its sidecar) to `NAME.corrupt`
    (`.corrupt.2`, ... when taken), out of every listing; returns the new path."""
    target, n = path + CORRUPT_SUFFIX, 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}{CORRUPT_SUFFIX}.{n}"
    os.replace(path, target)
    if os.path.exists(checksum_path(path)):
        os.replace(checksum_path(path), checksum_path(target))
    return target


def find_resumable(out_dir: str, move_corrupt: bool = True) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The newest checkpoint in `out_dir` that verifies and loads, as `(path,
    loaded checkpoint)`; `(None, None)` when there is none at all. Newer ones
    that are damaged (fail their checksum, or without a sidecar do not load)
    are logged (both files named) and, with `move_corrupt`, moved aside
    (`move_aside`). CheckpointError listing every failure when none is good
    (then nothing is moved), and for a file that verifies but does not load
    (written by another version: not damage, nothing to fall back past)."""
    found = list_checkpoints(out_dir)
    failed: List[Tuple[str, CheckpointError]] = []
    for _, path in reversed(found):
        try:
            verified = verify_checksum(path)
        except CheckpointError as e:
            failed.append((path, e))
            continue
        try:
            state = load_training_checkpoint(path, verify=False)
        except CheckpointError as e:
            if verified:  # the bytes are the ones written: not damage, so no falling back past it
                raise CheckpointError(f"{e} (its checksum verifies: the file is as it was written)") from e
            failed.append((path, e))
            continue
        if not verified:
            logger.warning(
                "checkpoint %s has no checksum file (written before checksums were recorded): "
                "resuming from it unverified",
                path,
            )
        for bad, err in failed:
            where = move_aside(bad) if move_corrupt else bad
            logger.warning(
                "%s; resuming from %s instead (the corrupt file %s)",
                err,
                path,
                f"is moved aside to {where}" if move_corrupt else "is left in place",
            )
        return path, state
    if failed:
        raise CheckpointError(
            f"no checkpoint in {os.path.join(out_dir, CKPT_DIR)} can be resumed from:\n"
            + "\n".join(f"  {e}" for _, e in failed)
            + "\nRestore a good copy of one of them, or start a new run in another out_dir (nothing was moved "
            "or deleted)."
        )
    return None, None


def newest_verified(out_dir: str) -> Tuple[Optional[str], List[str]]:
    """`(path, failures)`: the newest checkpoint whose checksum verifies (or,
    without a sidecar, that is a complete archive), and one line for each
    newer one that does not. Moves nothing."""
    failures = []
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            verify_checksum(path)
            return path, failures
        except CheckpointError as e:
            failures.append(str(e))
    return None, failures


def split_weights(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict, Dict, Dict]:
    """`(model, ema, proj)` weights from a Lightning-layout state dict."""

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

    return part(MODEL_PREFIX), part(EMA_PREFIX), part(PROJ_PREFIX + "proj.")


def save_lightning(
    path: str,
    model: Dict[str, torch.Tensor],
    ema: Dict[str, torch.Tensor],
    proj: Optional[Dict[str, torch.Tensor]] = None,
    *,
    global_step: int = 0,
    hyper_parameters: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
    checksum: bool = False,
    **extra,
) -> str:
    """Write weights as a published-style Lightning checkpoint (`state_dict`
    with `denoiser.`, `ema_denoiser.`, `diffusion_trainer.proj.`, plus
    `global_step`, `epoch` and `hyper_parameters`), crash-safe. An existing
    `path` is replaced only with `overwrite=True`. `checksum`: also write the
    sidecar `path.sha256` (before the file is renamed into place)."""
    payload = {
        "state_dict": lightning_state_dict(model, ema, proj),
        "global_step": int(global_step),
        "epoch": 0,
        "hyper_parameters": hyper_parameters or {},
        **extra,
    }
    write = atomic_write_checked if checksum else atomic_write
    write(path, lambda tmp: torch.save(payload, tmp), overwrite=overwrite)
    return path


def export_lightning(checkpoint: str, out_path: str, overwrite: bool = False, checksum: bool = False) -> str:
    """Write the weights of a training checkpoint (a path, verified on
    loading, or a loaded one) as a published-style Lightning checkpoint (see
    `save_lightning`, also for `checksum`), for tools written for the
    published code."""
    ckpt = load_training_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    model, ema, proj = split_weights(ckpt["state_dict"])
    return save_lightning(
        out_path,
        model,
        ema,
        proj,
        global_step=ckpt["step"],
        hyper_parameters=ckpt.get("hyper_parameters", {}),
        ddt_fast_config=ckpt["config"],
        overwrite=overwrite,
        checksum=checksum,
    )
