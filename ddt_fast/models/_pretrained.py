"""Reading and writing DDT weights, and the `save_pretrained` /
`from_pretrained` methods of the model class; none of it imports the model
(ddt.py inherits `PretrainedMixin` from here, and `checkpoint.py`, which
does import it, is the public face of the functions).

Reads: the published Lightning checkpoints (`state_dict` holding `denoiser.`,
`ema_denoiser.` and `diffusion_trainer.` entries; EMA by default), a plain
state dict saved with `torch.save`, a safetensors file, and `save_pretrained`
folders (`config.json` + `model.safetensors`). Prefixes left by
`torch.compile` (`_orig_mod.`) and DDP (`module.`) are stripped.

The architecture is inferred from the weights. Two things cannot be: the
encoder/decoder split (every block has the same parameters) and, when the
patch has `F` input features, how `F` factors into `in_channels * p * p`.
The split comes from, in order: the caller, the file's own config, or the
published preset with that architecture; `in_channels` defaults to 4 (SD-VAE
latents) when that factors.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ddt_fast._io import atomic_write, atomic_write_text, checksum_path, exists_error, read_checksum, sha256_file
from ddt_fast._version import __version__
from ddt_fast.models._architectures import PRESETS, match_preset

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "EMA_PREFIX",
    "MODEL_PREFIX",
    "PROJ_PREFIX",
    "CheckpointError",
    "verify_checksum",
    "split_state_dict",
    "read_state_dict",
    "infer_config",
    "load_into",
    "load_checkpoint_as",
    "PretrainedMixin",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_PREFIX = "ema_denoiser."
MODEL_PREFIX = "denoiser."
PROJ_PREFIX = "diffusion_trainer."
_STRIP = ("_orig_mod.", "module.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


# ---------------------------------------------------------------------------
# reading files


def verify_checksum(path: str) -> bool:
    """Check `path` against its sidecar: True when it matches, False when
    there is no sidecar (a file written before checksums; only checked for
    being a complete zip archive). CheckpointError naming the file, and what
    is wrong with it, otherwise. Reads the whole file once."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        expected = read_checksum(path)
        size = os.path.getsize(path)
        if size == 0:
            raise CheckpointError(f"checkpoint {path} is empty (0 bytes): its write was cut short")
        if expected is None:
            if not zipfile.is_zipfile(path):
                raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a complete zip archive)")
            return False
        actual = sha256_file(path)
    except ValueError as e:  # an unreadable sidecar
        raise CheckpointError(f"checkpoint {path}: {e}") from e
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e})") from e
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {path} fails its checksum (sha256 {actual[:16]}..., "
            f"{os.path.basename(checksum_path(path))} says {expected[:16]}...): the file changed "
            "after it was written (truncated, damaged on disk or in transfer)"
        )
    return True


def _load_file(path: str, allow_pickle: bool) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.exists(checksum_path(path)):  # written with a sidecar (training checkpoints): check it first
        verify_checksum(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"could not read safetensors file {path}: {e} (is it truncated or not a safetensors file?)"
            ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=False)
    except pickle.UnpicklingError as e:
        if allow_pickle:
            raise CheckpointError(f"could not unpickle {path}: {e}") from e
        raise CheckpointError(
            f"{path} holds Python objects beyond tensors, so it was not opened with "
            f"weights_only=True ({str(e).splitlines()[0]}). If you trust this file, pass "
            "allow_pickle=True (runs torch.load with weights_only=False, which can execute code)."
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: {e} (is the file truncated or not a PyTorch checkpoint?)") from e


def _find_key(tree: Any, key: str, depth: int = 0) -> Any:
    """The first value stored under `key` anywhere in nested dicts (hyper-parameters)."""
    if depth > 6 or not isinstance(tree, Mapping):
        return None
    if key in tree:
        return tree[key]
    for value in tree.values():
        found = _find_key(value, key, depth + 1)
        if found is not None:
            return found
    return None


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for wrapper in _STRIP:
            if key.startswith(wrapper):
                key, changed = key[len(wrapper) :], True
            elif "." + wrapper in key:
                key, changed = key.replace("." + wrapper, "."), True
    return key


def split_state_dict(raw: Mapping[str, Any], ema: bool = True) -> Tuple[Dict[str, torch.Tensor], str]:
    """The model's weights from a (possibly Lightning-wrapped) state dict.

    Returns the stripped state dict and a short description of where it came from.
    """
    tensors = {_strip_wrappers(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    has_ema = any(k.startswith(EMA_PREFIX) for k in tensors)
    has_model = any(k.startswith(MODEL_PREFIX) for k in tensors)
    if has_ema or has_model:
        prefix = EMA_PREFIX if ema else MODEL_PREFIX
        if not any(k.startswith(prefix) for k in tensors):
            other = "ema=False" if ema else "ema=True"
            raise CheckpointError(
                f"no '{prefix}*' weights in this checkpoint; "
                f"it has '{EMA_PREFIX if has_ema else MODEL_PREFIX}*' (pass {other})"
            )
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, prefix.rstrip(".")
    return tensors, "plain state dict"


def read_state_dict(
    path: str, ema: bool = True, allow_pickle: bool = False
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """`(state_dict, meta)` from any supported file or `save_pretrained` folder.

    `meta` holds `source` (which weights were taken) and `config` (an
    architecture config stored in the file, if any).
    """
    config: Dict[str, Any] = {}
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{path} is a folder without {WEIGHTS_NAME} (expected a save_pretrained folder)")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        path = weights
    obj = _load_file(path, allow_pickle)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    raw = obj.get("state_dict", obj) if isinstance(obj.get("state_dict", None), Mapping) else obj
    state_dict, source = split_state_dict(raw, ema=ema)
    if not state_dict:
        raise CheckpointError(f"{path} contains no tensors")
    hparams = obj.get("hyper_parameters")
    split = _find_key(hparams, "num_encoder_blocks")
    if isinstance(split, int) and "num_encoder_blocks" not in config:
        config["num_encoder_blocks"] = split
    # ddt_fast's training checkpoints store the whole DDT config (patch layout included)
    ours = hparams.get("model_config") if isinstance(hparams, Mapping) else None
    if isinstance(ours, Mapping):
        config.update({k: v for k, v in ours.items() if k in ("in_channels", "patch_size") and k not in config})
    return state_dict, {"source": source, "config": config, "path": path}


# ---------------------------------------------------------------------------
# architecture inference


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    num_encoder_blocks: Optional[int] = None,
    in_channels: Optional[int] = None,
    patch_size: Optional[int] = None,
) -> Dict[str, Any]:
    """DDT constructor arguments implied by the weights (see module docstring)."""
    need = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "blocks.0.attn.q_norm.weight"]
    missing = [k for k in need if k not in state_dict]
    if missing:
        sample = ", ".join(sorted(state_dict)[:5])
        raise CheckpointError(f"these weights do not look like a DDT: missing {missing} (first keys present: {sample})")
    hidden, features = state_dict["x_embedder.proj.weight"].shape
    head_dim = state_dict["blocks.0.attn.q_norm.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_blocks = max(blocks) + 1
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the q_norm size {head_dim}")
    cin, p = _factor_patch(features, in_channels, patch_size)
    config = dict(
        in_channels=cin,
        num_groups=hidden // head_dim,
        hidden_size=hidden,
        num_blocks=num_blocks,
        patch_size=p,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
    )
    if num_encoder_blocks is None:
        preset = match_preset(config)
        if preset is None:
            raise CheckpointError(
                f"cannot infer the encoder/decoder split from weights (inferred {config}, which is "
                "no published preset); pass num_encoder_blocks=..."
            )
        num_encoder_blocks = PRESETS[preset]["num_encoder_blocks"]
    config["num_encoder_blocks"] = num_encoder_blocks
    return config


def _factor_patch(features: int, in_channels: Optional[int], patch_size: Optional[int]) -> Tuple[int, int]:
    if in_channels is not None and patch_size is not None:
        if in_channels * patch_size**2 != features:
            raise CheckpointError(
                f"in_channels={in_channels}, patch_size={patch_size} give "
                f"{in_channels * patch_size**2} patch features, the weights have {features}"
            )
        return in_channels, patch_size
    if patch_size is not None:
        if features % (patch_size**2):
            raise CheckpointError(f"{features} patch features are not divisible by patch_size^2")
        return features // patch_size**2, patch_size
    cin = in_channels or 4
    p = math.isqrt(features // cin) if features % cin == 0 else 0
    if p < 1 or cin * p * p != features:
        raise CheckpointError(
            f"{features} patch features do not factor as in_channels={cin} * p^2; pass in_channels= and patch_size="
        )
    return cin, p


# ---------------------------------------------------------------------------
# loading into a model


def load_into(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, context: str = ""
) -> None:
    """`model.load_state_dict` with errors that name the offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = []
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es), first: {'; '.join(wrong[:3])}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s), first: {missing[:5]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:5]}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit the model{context}: " + "; ".join(problems) + f". Model config: {model.config}"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)


def load_checkpoint_as(
    model_class: type,
    path: str,
    ema: bool = True,
    num_encoder_blocks: Optional[int] = None,
    in_channels: Optional[int] = None,
    patch_size: Optional[int] = None,
    model: Optional[torch.nn.Module] = None,
    map_location: Any = "cpu",
    strict: bool = True,
    allow_pickle: bool = False,
):
    """`ddt_fast.load_checkpoint` for any class built as `model_class(**config)`
    from the inferred architecture (`model`, when given, is loaded instead)."""
    state_dict, meta = read_state_dict(path, ema=ema, allow_pickle=allow_pickle)
    if model is None:
        split = num_encoder_blocks if num_encoder_blocks is not None else meta["config"].get("num_encoder_blocks")
        stored = meta["config"]
        config = infer_config(
            state_dict,
            split,
            in_channels if in_channels is not None else stored.get("in_channels"),
            patch_size if patch_size is not None else stored.get("patch_size"),
        )
        model = model_class(**config)
    load_into(model, state_dict, strict=strict, context=f" ({meta['path']}, {meta['source']})")
    return model.to(map_location) if map_location is not None else model


# ---------------------------------------------------------------------------
# save_pretrained / from_pretrained


class PretrainedMixin:
    """`save_pretrained` / `from_pretrained` of the DDT class (diffusers
    style): the architecture is `self.config`, and loading builds
    `cls(**config)` from the config a file stores or its weights imply."""

    def save_pretrained(self, folder: str, overwrite: bool = False) -> None:
        """`config.json` + `model.safetensors` in `folder` (created if needed); each
        file is written to a temporary name and renamed, so a crash never leaves a
        half-written file in place of a good one. Existing files are replaced only
        with `overwrite=True`."""
        from safetensors.torch import save_file

        if not overwrite:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                if os.path.lexists(os.path.join(folder, name)):
                    raise exists_error(
                        os.path.join(folder, name), "save_pretrained:", "pass overwrite=True to replace the saved model"
                    )
        os.makedirs(folder, exist_ok=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        atomic_write(
            os.path.join(folder, WEIGHTS_NAME),
            lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "library": "ddt_fast"}),
            overwrite=overwrite,
        )
        config = dict(self.config, architecture="DDT", ddt_fast_version=__version__)
        atomic_write_text(os.path.join(folder, CONFIG_NAME), json.dumps(config, indent=2), overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        ema: bool = True,
        revision: Optional[str] = None,
        cache_dir: Optional[str] = None,
        **kwargs,
    ):
        """Load a save_pretrained folder, a checkpoint file, or a model-hub repository id.

        A hub repository is fetched with `huggingface_hub` (needs network access
        the first time); it may hold `config.json` + `model.safetensors` or a
        published Lightning checkpoint (`*.ckpt`). `kwargs`: the options of
        `ddt_fast.load_checkpoint`.
        """
        if os.path.exists(name_or_path):
            return load_checkpoint_as(cls, name_or_path, ema=ema, **kwargs)
        return load_checkpoint_as(cls, _fetch_from_hub(name_or_path, revision, cache_dir), ema=ema, **kwargs)


def _fetch_from_hub(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> str:
    """The local path of the weights of hub repository `repo_id`: its
    save_pretrained folder, else its first checkpoint file."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise FileNotFoundError(f"{repo_id!r} is neither an existing path nor a hub id ('owner/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ImportError("loading from the model hub needs huggingface_hub: pip install 'ddt_fast[hub]'") from e
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=["*.json", "*.safetensors", "*.ckpt", "*.pt", "*.pth"],
        )
    except Exception as e:  # network errors come in many types
        raise CheckpointError(
            f"could not fetch {repo_id!r} from the model hub ({type(e).__name__}: {e}). "
            "If you are offline, download the checkpoint elsewhere and pass its local path."
        ) from e
    if os.path.exists(os.path.join(folder, WEIGHTS_NAME)):
        return folder
    candidates = sorted(f for f in os.listdir(folder) if f.endswith((".ckpt", ".pt", ".pth", ".safetensors")))
    if not candidates:
        raise CheckpointError(f"hub repository {repo_id!r} holds no weights file")
    return os.path.join(folder, candidates[0])
