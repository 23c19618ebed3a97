"""`TrainConfig`: every setting of a training run, as one flat dataclass.

A command line or a script fills it (`TrainConfig(...)` or
`TrainConfig.from_dict(d)`); the trainer writes it as `config.json` beside
the checkpoints and inside every checkpoint, so a run can be reproduced and
resumed from its files alone. Defaults follow the published DDT recipe
(AdamW lr 1e-4, betas (0.9, 0.95), no weight decay, log-normal t, label
dropout 0.1, EMA 0.9999, REPA weight 0.5 at block 8).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

__all__ = ["TrainConfig", "TIME_SAMPLINGS", "PRECISIONS", "STRATEGIES", "LATENT_SAMPLINGS"]

TIME_SAMPLINGS = ("lognorm", "uniform")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("ddp", "fsdp")
LATENT_SAMPLINGS = ("mean", "sample")


@dataclass
class TrainConfig:
    """Settings of a training run (see docs/training.md, "Settings").

    Model
      model: a preset name (`ddt_fast.models.PRESETS`, e.g. "DDT-XL/2").
      model_args: constructor overrides for the preset, e.g.
        `{"in_channels": 1, "num_classes": 10}` for the digits.
      init_from: a checkpoint (published Lightning .ckpt, ddt_fast checkpoint,
        safetensors, save_pretrained folder) to start from instead of random
        weights (fine-tuning, e.g. 256 -> 512); its architecture must match.
      init_ema: take the EMA weights of `init_from` (True) or the training ones.
    Data
      data: "digits" (the 8x8 digits that ship with scikit-learn, pixel
        space) or a latent dataset folder written by `extract_latents`.
      image_folder: the image tree the latents were extracted from; needed
        for REPA on a latent dataset (the feature encoder reads raw images).
      latent_sampling: "mean" uses the VAE posterior mean, "sample" draws
        `mean + std * eps` each step (needs latents extracted with std).
      num_workers: DataLoader worker processes (0: load in the main process).
    Objective
      time_sampling: "lognorm" (`t = sigmoid(randn)`) or "uniform".
      label_dropout: probability of replacing a label by the null class.
      repa: add the REPA alignment loss.
      repa_weight, align_layer: its weight and the block (1-based) whose
        output is aligned (the hook sits on block index `align_layer - 1`).
      repa_encoder: the frozen feature encoder: "dinov2_vitb14" (torch.hub)
        or any `dinov2_*` hub name; a module can be passed to the trainer instead.
      repa_feature_dim: its feature size (the projector's output, 768 for ViT-B).
    Optimisation
      global_batch: samples per optimizer step over all processes and
        accumulation steps together (must divide by world_size * grad_accum).
      grad_accum: micro-batches per optimizer step on each process.
      lr, betas, weight_decay, eps: AdamW; warmup_steps: linear warm-up.
      grad_clip: clip the global gradient norm to this (None: no clipping).
      ema_decay: EMA of the weights, updated after every optimizer step.
      precision: "fp32" or "bf16" (autocast; weights stay float32).
      compile: `torch.compile` the training module.
      strategy: "ddp" or "fsdp" (FSDP2 `fully_shard`) under torchrun.
    Run
      steps: optimizer steps to train for (total, counting resumed ones).
      out_dir: where checkpoints, config.json and metrics.jsonl go.
      resume: continue from the newest checkpoint in out_dir that verifies
        (newer, damaged ones are moved aside with a warning). Without it a
        run refuses an out_dir that already holds checkpoints.
      allow_changed_inputs: resume even when the dataset's content, the
        init_from weights or the REPA feature encoder's weights differ from
        the ones the run started with (a warning names them); by default
        such a resume is refused (see `Trainer`'s "What a run records").
      ckpt_every, keep_last: checkpoint interval (steps) and how many to keep
        (0 keeps all); a checkpoint is always written at the last step.
      export_lightning: also write `lightning/last.ckpt` in the published
        Lightning layout at every checkpoint.
      log_every: steps between metric lines; tensorboard: also log there
        (when installed); progress: show a progress bar on rank 0.
      seed: every random draw of the run derives from it.
      device: "cpu", "cuda", "cuda:1"... (default: cuda when available;
        under torchrun each process takes cuda:LOCAL_RANK).
    """

    # model
    model: str = "DDT-XL/2"
    model_args: Dict[str, Any] = field(default_factory=dict)
    init_from: Optional[str] = None
    init_ema: bool = True
    # data
    data: str = "digits"
    image_folder: Optional[str] = None
    latent_sampling: str = "mean"
    num_workers: int = 0
    # objective
    time_sampling: str = "lognorm"
    label_dropout: float = 0.1
    repa: bool = False
    repa_weight: float = 0.5
    align_layer: int = 8
    repa_encoder: str = "dinov2_vitb14"
    repa_feature_dim: int = 768
    # optimisation
    global_batch: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    ema_decay: float = 0.9999
    precision: str = "fp32"
    compile: bool = False
    strategy: str = "ddp"
    # run
    steps: int = 1000
    out_dir: str = "runs/ddt"
    resume: bool = False
    allow_changed_inputs: bool = False
    ckpt_every: int = 1000
    keep_last: int = 3
    export_lightning: bool = False
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    seed: int = 0
    device: Optional[str] = None

    # settings that must not change when a run is resumed (the rest may:
    # more steps, another logging interval, ...). What the settings name is
    # checked by content, not here: the dataset (a digest of its index, so a
    # moved folder may be given another `data` path; the path itself is
    # compared only for checkpoints that record no digest), the init_from and
    # feature encoder weights (see `Trainer`).
    RESUME_FIXED = (
        "model",
        "model_args",
        "time_sampling",
        "label_dropout",
        "repa",
        "align_layer",
        "repa_feature_dim",
        "global_batch",
        "seed",
        "strategy",
        "latent_sampling",
    )

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.model_args = dict(self.model_args)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting and how to fix it."""

        def choice(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")

        choice("time_sampling", TIME_SAMPLINGS)
        choice("precision", PRECISIONS)
        choice("strategy", STRATEGIES)
        choice("latent_sampling", LATENT_SAMPLINGS)
        for name in ("global_batch", "grad_accum", "steps", "ckpt_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("keep_last", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None (no clipping), got {self.grad_clip}")
        if self.align_layer < 1:
            raise ValueError(f"align_layer is 1-based (block index align_layer - 1); got {self.align_layer}")
        if self.global_batch % self.grad_accum:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by grad_accum "
                f"{self.grad_accum}; pick a global batch that is a multiple of it"
            )

    # -- (de)serialisation ---------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training setting(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
