"""Training DDT models: flow matching with REPA, EMA, exact resume, DDP/FSDP2
under torchrun, the built-in digits, latent shard datasets and their extraction.

    from ddt_fast.training import TrainConfig, Trainer
    Trainer(TrainConfig(model="DDT-tiny/2", model_args={"in_channels": 1}, data="digits",
                        global_batch=64, steps=500, out_dir="runs/digits")).fit()
"""

from ddt_fast.training.checkpointing import (
    export_lightning,
    list_checkpoints,
    load_training_checkpoint,
    save_lightning,
    verify_checksum,
)
from ddt_fast.training.config import TrainConfig
from ddt_fast.training.data import (
    DatasetError,
    DigitsDataset,
    ImageFolderDataset,
    LatentDataset,
    SampleOrder,
    open_dataset,
)
from ddt_fast.training.distributed import init_distributed
from ddt_fast.training.ema import EMA
from ddt_fast.training.latents import extract_latents
from ddt_fast.training.objective import DiffusionTrainer, StepDraws, TrainModule, interpolate, sample_time
from ddt_fast.training.repa import (
    DINOv2Features,
    Projector,
    RepaHook,
    cosine_alignment_loss,
    load_feature_encoder,
    resize_features,
)
from ddt_fast.training.trainer import MetricsLogError, NonFiniteLossError, Trainer, train

__all__ = [
    "TrainConfig",
    "Trainer",
    "train",
    "NonFiniteLossError",
    "MetricsLogError",
    "EMA",
    "DiffusionTrainer",
    "TrainModule",
    "StepDraws",
    "interpolate",
    "sample_time",
    "Projector",
    "RepaHook",
    "cosine_alignment_loss",
    "resize_features",
    "load_feature_encoder",
    "DINOv2Features",
    "DigitsDataset",
    "LatentDataset",
    "ImageFolderDataset",
    "SampleOrder",
    "open_dataset",
    "DatasetError",
    "extract_latents",
    "export_lightning",
    "save_lightning",
    "list_checkpoints",
    "load_training_checkpoint",
    "verify_checksum",
    "init_distributed",
]


def __dir__():
    """Only the API (PEP 562): not the modules and helpers used to build it."""
    return sorted(__all__)
