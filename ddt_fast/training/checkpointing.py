"""Training checkpoints: everything a run needs to continue exactly.

One file per checkpoint, `OUT/checkpoints/step_00001000.ckpt`, written to a
temporary file and renamed (a crash never leaves half a checkpoint), holding:

- `state_dict`: the weights in the published Lightning layout, `denoiser.*`
  (training weights), `ema_denoiser.*` (EMA) and `diffusion_trainer.proj.*`
  (REPA projector), so `ddt_fast.load_checkpoint` and tools written for the
  published checkpoints read it;
- `optimizer` (full, keyed by parameter name), `step`, `data` (stream
  position), `rng` (python, numpy, torch and CUDA generator states of every
  process), `config` (the `TrainConfig`), `hyper_parameters` (the DDT
  constructor arguments).

Files are opened with `torch.load(weights_only=True)`: nothing in them
needs pickled Python objects.
"""
from __future__ import annotations

import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ddt_fast._io import atomic_write
from ddt_fast.models.checkpoint import EMA_PREFIX, MODEL_PREFIX, PROJ_PREFIX, CheckpointError

FORMAT = "ddt_fast.train/1"
CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8,})\.ckpt$")


def checkpoint_path(out_dir: str, step: int) -> str:
    return os.path.join(out_dir, CKPT_DIR, f"step_{step:08d}.ckpt")


def list_checkpoints(out_dir: str) -> List[Tuple[int, str]]:
    """`(step, path)` of the checkpoints in `out_dir`, oldest first."""
    folder = os.path.join(out_dir, CKPT_DIR)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := _NAME.match(name))]
    return sorted(found)


def prune(out_dir: str, keep_last: int) -> List[str]:
    """Delete all but the newest `keep_last` checkpoints (0 keeps all); returns what was deleted."""
    if keep_last <= 0:
        return []
    old = [path for _, path in list_checkpoints(out_dir)[:-keep_last]]
    for path in old:
        os.remove(path)
    return old


# ---------------------------------------------------------------------------
# random number generators


def rng_state() -> Dict[str, Any]:
    """This process's generator states, in types `torch.load(weights_only=True)` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------
# files


def lightning_state_dict(model: Dict[str, torch.Tensor], ema: Dict[str, torch.Tensor],
                         proj: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Weights keyed as in the published Lightning checkpoints."""
    out = {MODEL_PREFIX + k: v for k, v in model.items()}
    out.update({EMA_PREFIX + k: v for k, v in ema.items()})
    if proj:
        out.update({PROJ_PREFIX + "proj." + k: v for k, v in proj.items()})
    return out


def save_checkpoint(path: str, payload: Dict[str, Any]) -> str:
    """Write `payload` (see the module docstring) crash-safe."""
    payload = dict(payload, format=FORMAT)
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=True)  # the run's own folder
    return path


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by the trainer, or CheckpointError saying what is wrong with it."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, ...: many types
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Delete it to resume from the one before, or start a new run in another out_dir.") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ddt_fast training checkpoint (format "
                              f"{obj.get('format') if isinstance(obj, dict) else type(obj).__name__!r}, "
                              f"expected {FORMAT!r}); to start from its weights use init_from=...")
    missing = [k for k in ("state_dict", "optimizer", "step", "rng", "data", "config") if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it cannot be resumed from")
    return obj


def split_weights(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict, Dict, Dict]:
    """`(model, ema, proj)` weights from a Lightning-layout state dict."""
    def part(prefix):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    return part(MODEL_PREFIX), part(EMA_PREFIX), part(PROJ_PREFIX + "proj.")


def save_lightning(path: str, model: Dict[str, torch.Tensor], ema: Dict[str, torch.Tensor],
                   proj: Optional[Dict[str, torch.Tensor]] = None, *, global_step: int = 0,
                   hyper_parameters: Optional[Dict[str, Any]] = None, overwrite: bool = False, **extra) -> str:
    """Write weights as a published-style Lightning checkpoint (`state_dict`
    with `denoiser.`, `ema_denoiser.`, `diffusion_trainer.proj.`, plus
    `global_step`, `epoch` and `hyper_parameters`), crash-safe. An existing
    `path` is replaced only with `overwrite=True`."""
    payload = {"state_dict": lightning_state_dict(model, ema, proj), "global_step": int(global_step), "epoch": 0,
               "hyper_parameters": hyper_parameters or {}, **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=overwrite)
    return path


def export_lightning(checkpoint: str, out_path: str, overwrite: bool = False) -> str:
    """Write the weights of a training checkpoint as a published-style
    Lightning checkpoint (see `save_lightning`), for tools written for the
    published code."""
    ckpt = load_training_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    model, ema, proj = split_weights(ckpt["state_dict"])
    return save_lightning(out_path, model, ema, proj, global_step=ckpt["step"],
                          hyper_parameters=ckpt.get("hyper_parameters", {}), ddt_fast_config=ckpt["config"],
                          overwrite=overwrite)
