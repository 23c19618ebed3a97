"""DDT models: the model class, named presets, checkpoint I/O, the VAE loader."""

from ddt_fast.models.checkpoint import (
    CheckpointError,
    from_pretrained,
    infer_config,
    load_checkpoint,
    read_state_dict,
    save_pretrained,
    weights_digest,
)
from ddt_fast.models.ddt import DDT, DDTBlock, ModulationCache
from ddt_fast.models.presets import PRESETS, constructor_args, create, match_preset, preset_config, preset_names
from ddt_fast.models.vae import load_vae

__all__ = [
    "DDT",
    "DDTBlock",
    "ModulationCache",
    "PRESETS",
    "create",
    "match_preset",
    "preset_config",
    "preset_names",
    "constructor_args",
    "CheckpointError",
    "load_checkpoint",
    "read_state_dict",
    "infer_config",
    "save_pretrained",
    "from_pretrained",
    "weights_digest",
    "load_vae",
]


def __dir__():
    """Only the API (PEP 562): not the modules and helpers used to build it."""
    return sorted(__all__)
