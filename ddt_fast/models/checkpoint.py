"""Loading and saving DDT weights: `load_checkpoint`, `from_pretrained`,
`save_pretrained`, `weights_digest`, and the lower-level pieces (reading a
state dict, inferring the architecture, loading into a model).

The file formats themselves are read and written in `_pretrained.py`, below
the model class (which inherits `save_pretrained` / `from_pretrained` from
there); this module builds `DDT`s from them. See `_pretrained.py` for the
formats and how the architecture is inferred.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

from ddt_fast.models._pretrained import (
    CONFIG_NAME,
    EMA_PREFIX,
    MODEL_PREFIX,
    PROJ_PREFIX,
    WEIGHTS_NAME,
    CheckpointError,
    infer_config,
    load_checkpoint_as,
    load_into,
    read_state_dict,
    split_state_dict,
    verify_checksum,
)
from ddt_fast.models.ddt import DDT

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "EMA_PREFIX",
    "MODEL_PREFIX",
    "PROJ_PREFIX",
    "CheckpointError",
    "weights_digest",
    "verify_checksum",
    "read_state_dict",
    "split_state_dict",
    "infer_config",
    "load_into",
    "load_checkpoint",
    "save_pretrained",
    "from_pretrained",
]


def weights_digest(model_or_state_dict) -> str:
    """Hex SHA-256 over a module's (or state dict's) tensors: names, dtypes,
    shapes and bytes, in name order. Outputs record it, so a re-run with other
    weights is told apart from a resume. Equal for the same weights on any
    device; reads every parameter once (a few seconds for DDT-XL)."""
    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module) else model_or_state_dict
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_checkpoint(
    path: str,
    ema: bool = True,
    num_encoder_blocks: Optional[int] = None,
    in_channels: Optional[int] = None,
    patch_size: Optional[int] = None,
    model: Optional[DDT] = None,
    map_location: Any = "cpu",
    strict: bool = True,
    allow_pickle: bool = False,
) -> DDT:
    """A DDT with the weights of `path` (published Lightning .ckpt, plain state
    dict, .safetensors, or a save_pretrained folder).

    ema: take the EMA weights (`ema_denoiser.`, what the published code samples
        with) from a Lightning checkpoint; False takes `denoiser.`.
    num_encoder_blocks: the encoder/decoder split; needed unless the file
        records it or the architecture is a published preset.
    model: load into this model instead of building one.
    allow_pickle: open files that hold more than tensors (only for trusted files).
    """
    return load_checkpoint_as(
        DDT,
        path,
        ema=ema,
        num_encoder_blocks=num_encoder_blocks,
        in_channels=in_channels,
        patch_size=patch_size,
        model=model,
        map_location=map_location,
        strict=strict,
        allow_pickle=allow_pickle,
    )


def save_pretrained(model: DDT, folder: str, overwrite: bool = False) -> None:
    """`model.save_pretrained(folder, overwrite)`: `config.json` +
    `model.safetensors`, written atomically; existing files are replaced only
    with `overwrite=True`."""
    model.save_pretrained(folder, overwrite=overwrite)


def from_pretrained(
    name_or_path: str, ema: bool = True, revision: Optional[str] = None, cache_dir: Optional[str] = None, **kwargs
) -> DDT:
    """`DDT.from_pretrained`: a save_pretrained folder, a checkpoint file, or a
    model-hub repository id (fetched with `huggingface_hub`, which needs
    network access the first time)."""
    return DDT.from_pretrained(name_or_path, ema=ema, revision=revision, cache_dir=cache_dir, **kwargs)
