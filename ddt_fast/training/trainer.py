"""The training loop: `Trainer(TrainConfig(...)).fit()`.

One optimizer step: the global batch's random draws (noise, t, label
dropout) from the step's generator, this process's micro-batches forward and
backward (gradients synchronised on the last), optional clipping, AdamW,
EMA. Rank 0 logs and writes checkpoints; every process reads the same
checkpoint to resume. See `TrainConfig` for the settings.

Integrity. At start, rank 0 deletes what killed writes left in out_dir
(temporary files, checksum sidecars without their checkpoint) before writing
anything. Resuming takes the newest checkpoint that verifies against its
checksum (see `checkpointing`): damaged newer ones are moved aside with a
warning naming both files, and when none is good the run stops with a
CheckpointError. A torn last line of metrics.jsonl (a killed write) is
dropped with a warning; a damaged line before it stops the resume with the
file, line number and fix.

What a run records. Beyond its `TrainConfig`, the content of a run is
determined by its inputs: the dataset (`digest` of the dataset: for a latent
folder, a hash of its index.json without the per-shard checksums, i.e. the
extraction settings, VAE weights digest and source file list; for the digits,
a hash of the arrays), the `init_from` weights (`weights_digest` of the model
right after loading them) and the REPA feature encoder's weights. They are
written to `inputs.json` and into every checkpoint (`inputs`); resuming with
any of them changed is refused, naming what differs, unless
`allow_changed_inputs=True`. A custom dataset without a `digest` attribute is
recorded as None and not compared.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from ddt_fast._io import atomic_write_text, remove_stale_temps
from ddt_fast._progress import progress_bar
from ddt_fast.models import CheckpointError, create, load_checkpoint, weights_digest
from ddt_fast.models.ddt import DDT
from ddt_fast.training import checkpointing as ckpt
from ddt_fast.training import distributed as dist
from ddt_fast.training.config import TrainConfig
from ddt_fast.training.data import SampleOrder, StepBatches, open_dataset
from ddt_fast.training.ema import EMA
from ddt_fast.training.objective import DiffusionTrainer, StepDraws, TrainModule
from ddt_fast.training.repa import check_align_layer, load_feature_encoder

__all__ = [
    "Trainer",
    "train",
    "NonFiniteLossError",
    "MetricsLogError",
    "CONFIG_NAME",
    "METRICS_NAME",
    "INPUTS_NAME",
    "LIGHTNING_PATH",
]

logger = logging.getLogger("ddt_fast")
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
INPUTS_NAME = "inputs.json"
LIGHTNING_PATH = os.path.join("lightning", "last.ckpt")
# what each recorded input is, for messages
_INPUT_NAMES = {
    "dataset": "the dataset's content",
    "init_from": "the init_from weights",
    "feature_encoder": "the REPA feature encoder's weights",
}


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before updating the weights."""


class MetricsLogError(ValueError):
    """metrics.jsonl is damaged (beyond a torn last line); the message names the line and the fix."""


class Trainer:
    """Trains a DDT as `config` says.

    dataset: use this dataset instead of opening `config.data` (items as in
        `ddt_fast.training.data`: dicts with `x`, `y` and, for REPA, `image`).
    feature_encoder: a frozen module mapping images in [-1, 1] to patch
        features `[B, L', D']` for REPA, instead of loading `config.repa_encoder`.
    model: a DDT to train instead of building `config.model`.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        dataset=None,
        feature_encoder: Optional[nn.Module] = None,
        model: Optional[DDT] = None,
    ):
        self.config = cfg = config
        cfg.validate()
        self.device = dist.init_distributed(cfg.device)
        self.rank, self.world = dist.rank_world()
        if cfg.global_batch % (self.world * cfg.grad_accum):
            raise ValueError(
                f"global_batch {cfg.global_batch} is not divisible by world_size ({self.world}) x grad_accum "
                f"({cfg.grad_accum}) = {self.world * cfg.grad_accum}: every process takes an equal share of each "
                "step's batch. Pick a global batch that is a multiple of it (or change grad_accum)."
            )
        self.micro_batch = cfg.global_batch // (self.world * cfg.grad_accum)
        self._check_out_dir()

        # data (every shard checked here, before any training)
        self.dataset = dataset if dataset is not None else open_dataset(cfg.data, cfg.image_folder)
        first = self.dataset[0]
        self.sample_shape = tuple(first["x"].shape)
        if cfg.latent_sampling == "sample" and "std" not in first:
            raise ValueError(
                f"latent_sampling='sample' needs the posterior std in the dataset; {cfg.data} has "
                "none (extract with store_std=True, or use latent_sampling='mean')"
            )

        # model (same seed on every process: FSDP shards identical initial weights)
        torch.manual_seed(cfg.seed)
        if model is None:
            model = create(cfg.model, **cfg.model_args)
        if cfg.init_from:
            load_checkpoint(cfg.init_from, ema=cfg.init_ema, model=model)
        digest = getattr(self.dataset, "digest", None)
        self.inputs: Dict[str, Optional[str]] = {
            "dataset": digest() if callable(digest) else digest,
            "init_from": weights_digest(model) if cfg.init_from else None,
            "feature_encoder": None,
        }
        self._check_model_fits_data(model, first)
        proj_dim = None
        if cfg.repa:
            check_align_layer(cfg.align_layer, model.num_blocks)
            if "image" not in first:
                raise ValueError(
                    "REPA needs the raw images beside the latents: pass image_folder= (the tree "
                    "the latents were extracted from)"
                )
            if feature_encoder is None:
                feature_encoder = load_feature_encoder(cfg.repa_encoder, resolution=first["image"].shape[-1])
            dim = getattr(feature_encoder, "feature_dim", cfg.repa_feature_dim)
            if dim != cfg.repa_feature_dim:
                raise ValueError(
                    f"the feature encoder gives {dim}-dim features but repa_feature_dim is "
                    f"{cfg.repa_feature_dim}; set repa_feature_dim={dim}"
                )
            proj_dim = cfg.repa_feature_dim
            self.feature_encoder = feature_encoder.to(self.device).eval().requires_grad_(False)
            self.inputs["feature_encoder"] = weights_digest(self.feature_encoder)
        else:
            self.feature_encoder = None
        self.module = TrainModule(
            model, DiffusionTrainer(model.hidden_size, proj_dim, cfg.repa_weight), cfg.align_layer if cfg.repa else None
        ).to(self.device)
        self.wrapped = dist.wrap(self.module, cfg.strategy, self.device)
        self.ema = EMA(self.module.denoiser, cfg.ema_decay)
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps
        )
        if cfg.compile:
            self.wrapped.compile()
        self.step = 0
        self._resume()

    # -- set-up checks -------------------------------------------------------

    def _check_out_dir(self) -> None:
        cfg = self.config
        found = ckpt.list_checkpoints(cfg.out_dir)
        if found and not cfg.resume:
            raise FileExistsError(
                f"{cfg.out_dir} already holds {len(found)} checkpoint(s) (newest: step {found[-1][0]}); nothing "
                "is overwritten without asking: pass resume=True to continue that run, or choose another out_dir"
            )
        metrics = os.path.join(cfg.out_dir, METRICS_NAME)
        if not found and os.path.exists(metrics) and not cfg.resume:
            raise FileExistsError(f"{metrics} exists from an earlier run; choose another out_dir or delete it")
        if self.rank == 0:  # before this run writes anything; only rank 0 ever writes here
            removed = ckpt.clean_checkpoint_dir(cfg.out_dir)
            removed += remove_stale_temps(
                os.path.dirname(os.path.join(cfg.out_dir, LIGHTNING_PATH)),
                [os.path.basename(LIGHTNING_PATH), os.path.basename(LIGHTNING_PATH) + ".sha256"],
            )
            removed += remove_stale_temps(cfg.out_dir, [CONFIG_NAME, METRICS_NAME, INPUTS_NAME])
            if removed:
                logger.warning("removed %d file(s) that killed writes left: %s", len(removed), ", ".join(removed))

    def _check_model_fits_data(self, model: DDT, item: Dict[str, torch.Tensor]) -> None:
        c, h, w = self.sample_shape
        if c != model.in_channels:
            raise ValueError(
                f"the data has {c} channels but the model takes in_channels={model.in_channels}; "
                f"set model_args={{'in_channels': {c}, ...}}"
            )
        if h % model.patch_size or w % model.patch_size:
            raise ValueError(f"data of size {h}x{w} is not divisible by the model's patch size {model.patch_size}")
        n = getattr(self.dataset, "num_classes", None)
        if n is not None and n > model.num_classes:
            raise ValueError(
                f"the data has {n} classes but the model only {model.num_classes}; set "
                f"model_args={{'num_classes': {n}, ...}}"
            )

    # -- checkpoints -----------------------------------------------------------

    def _resume(self) -> None:
        cfg = self.config
        metrics_path = os.path.join(cfg.out_dir, METRICS_NAME)
        if not (cfg.resume and ckpt.list_checkpoints(cfg.out_dir)):
            if cfg.resume and self.rank == 0 and os.path.exists(metrics_path):
                atomic_write_text(metrics_path, "", overwrite=True)  # killed before its first checkpoint: start over
            self._write_config()
            return
        # rank 0 picks the checkpoint (verifying it, moving damaged newer ones
        # aside) and reads the metrics log, then tells the others (which read
        # the same checkpoint), so that every process fails alike
        path = state = error = metrics = None
        if self.rank == 0:
            try:
                path, state = ckpt.find_resumable(cfg.out_dir)
                if state is not None:
                    metrics = _metrics_up_to(metrics_path, int(state["step"]))
            except (CheckpointError, MetricsLogError) as e:
                error = (type(e).__name__, str(e))
        path, error = dist.broadcast_object((path, error))
        if error is not None:
            raise (MetricsLogError if error[0] == MetricsLogError.__name__ else CheckpointError)(error[1])
        if path is None:  # every checkpoint vanished meanwhile
            raise CheckpointError(f"no checkpoint left in {cfg.out_dir} to resume from")
        if state is None:
            state = ckpt.load_training_checkpoint(path, verify=False)  # rank 0 verified these bytes
        stored = state["config"]
        changed = {
            k: (stored.get(k), v)
            for k, v in cfg.to_dict().items()
            if k in TrainConfig.RESUME_FIXED and _norm(stored.get(k)) != _norm(v)
        }
        recorded = state.get("inputs") or {}
        if not (recorded.get("dataset") and self.inputs["dataset"]) and stored.get("data") != cfg.data:
            changed["data"] = (stored.get("data"), cfg.data)  # no content digest on one side: the path decides
        if changed:
            raise CheckpointError(
                f"cannot resume {path}: these settings differ from the run that wrote it "
                f"(checkpoint, now): {changed}; restore them or start a new out_dir"
            )
        self._check_inputs(path, recorded)
        if state["data"]["position"] != state["step"] * cfg.global_batch:
            raise CheckpointError(
                f"{path}: data position {state['data']['position']} does not match step "
                f"{state['step']} x global batch {cfg.global_batch}"
            )
        model_sd, ema_sd, proj_sd = ckpt.split_weights(state["state_dict"])
        full = {"denoiser." + k: v for k, v in model_sd.items()}
        full.update({"diffusion_trainer.proj." + k: v for k, v in proj_sd.items()})
        try:
            dist.load_model_state(self.module, full)
            self.ema.load_state_dict(ema_sd)
            dist.load_optimizer_state(self.module, self.optimizer, state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(
                f"cannot resume from {path}: its weights or optimizer state do not fit this model ({e})"
            ) from e
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.rank] if len(rngs) == self.world else rngs[0])
        self.step = int(state["step"])
        self._write_config()
        if self.rank == 0:
            if metrics is not None:  # the lines logged after the checkpoint are about to be redone
                atomic_write_text(metrics_path, metrics, overwrite=True)
            logger.info("resumed from %s (step %d)", path, self.step)

    def _check_inputs(self, path: str, recorded: Dict[str, Optional[str]]) -> None:
        """Refuse (or, with allow_changed_inputs, warn about) inputs that differ from the checkpoint's."""
        if not recorded:
            logger.warning(
                "checkpoint %s records no inputs (written before they were recorded): the dataset and "
                "init_from weights of this resume are not compared with the run's",
                path,
            )
            return
        differ = []
        for key, now in self.inputs.items():
            then = recorded.get(key)
            if then is not None and now is not None and then != now:
                differ.append(f"{_INPUT_NAMES[key]} (sha256 {then[:16]}... in the checkpoint, {now[:16]}... now)")
            elif (then is None) != (now is None):
                logger.warning(
                    "%s: %s is recorded %s, so it is not compared",
                    path,
                    _INPUT_NAMES[key],
                    "only in the checkpoint" if now is None else "only now",
                )
        if not differ:
            return
        what = "; ".join(differ)
        if self.config.allow_changed_inputs:
            logger.warning("resuming %s with changed inputs (allow_changed_inputs=True): %s", path, what)
            return
        raise CheckpointError(
            f"cannot resume {path}: {what}. The run would continue on other inputs than it started with. "
            "Restore them (data, init_from, init_ema, the feature encoder), pass allow_changed_inputs=True to "
            "continue on the new ones deliberately, or start a new out_dir."
        )

    def _write_config(self) -> None:
        if self.rank == 0:
            atomic_write_text(
                os.path.join(self.config.out_dir, CONFIG_NAME), self.config.to_json() + "\n", overwrite=True
            )
            atomic_write_text(
                os.path.join(self.config.out_dir, INPUTS_NAME),
                json.dumps(self.inputs, indent=1, sort_keys=True) + "\n",
                overwrite=True,
            )

    def state(self) -> Dict[str, Any]:
        """The checkpoint payload (complete on rank 0; every process must call it)."""
        full = dist.model_state(self.module)
        model_sd = {k[len("denoiser.") :]: v for k, v in full.items() if k.startswith("denoiser.")}
        proj_sd = {
            k[len("diffusion_trainer.proj.") :]: v for k, v in full.items() if k.startswith("diffusion_trainer.proj.")
        }
        return {
            "step": self.step,
            "state_dict": ckpt.lightning_state_dict(model_sd, self.ema.state_dict(), proj_sd),
            "optimizer": dist.optimizer_state(self.module, self.optimizer),
            "rng": dist.gather_objects(ckpt.rng_state()),
            "data": {"position": self.step * self.config.global_batch},
            "config": self.config.to_dict(),
            "inputs": dict(self.inputs),
            "hyper_parameters": {"model_config": self.module.denoiser.config},
            "world_size": self.world,
        }

    def save(self) -> Optional[str]:
        """Write a checkpoint of the current step (rank 0 writes; all processes must call)."""
        payload = self.state()
        path = None
        if self.rank == 0:
            cfg = self.config
            path = ckpt.save_checkpoint(ckpt.checkpoint_path(cfg.out_dir, self.step), payload)
            ckpt.prune(cfg.out_dir, cfg.keep_last)
            if cfg.export_lightning:
                ckpt.export_lightning(
                    payload | {"format": ckpt.FORMAT},
                    os.path.join(cfg.out_dir, LIGHTNING_PATH),
                    overwrite=True,
                    checksum=True,
                )
        dist.barrier_fn()()
        return path

    def ema_model(self) -> DDT:
        """A DDT holding the EMA weights (what to sample with)."""
        model = DDT(**self.module.denoiser.config)
        return self.ema.copy_to(model)

    # -- the loop ------------------------------------------------------------

    def _lr(self, step: int) -> float:
        cfg = self.config
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        return cfg.lr

    def _sync(self, last_micro: bool):
        """Gradient synchronisation only on the last micro-batch of a step."""
        if self.wrapped is not self.module and hasattr(self.wrapped, "no_sync") and not last_micro:
            return self.wrapped.no_sync()
        if hasattr(self.module, "set_requires_gradient_sync"):  # FSDP2
            self.module.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def train_step(self, micro_batches) -> Dict[str, float]:
        """One optimizer step over this process's micro-batches (a list of dicts)."""
        cfg, dev = self.config, self.device
        draws = StepDraws.draw(
            cfg.seed,
            self.step,
            cfg.global_batch,
            self.sample_shape,
            time_sampling=cfg.time_sampling,
            label_dropout=cfg.label_dropout,
            posterior=cfg.latent_sampling == "sample",
            device=dev,
        )
        per_rank = cfg.global_batch // self.world
        totals: Dict[str, torch.Tensor] = {}
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        for m, batch in enumerate(micro_batches):
            start = self.rank * per_rank + m * self.micro_batch
            d = draws.slice(start, start + self.micro_batch)
            x0 = batch["x"].to(dev, non_blocking=True)
            if d.eps is not None:
                x0 = x0 + batch["std"].to(dev, non_blocking=True) * d.eps
            y = batch["y"].to(dev, non_blocking=True)
            features = None
            if self.feature_encoder is not None:
                with torch.no_grad(), autocast:
                    features = self.feature_encoder(batch["image"].to(dev, non_blocking=True))
            with self._sync(m == len(micro_batches) - 1):
                with autocast:
                    out = self.wrapped(x0, y, d, features)
                # outside autocast, as PyTorch recommends: the backward runs in the
                # dtypes the forward chose, and explicit float32 work in a backward
                # (ops.linear's CPU path) is not cast back to bf16
                (out["loss"] / len(micro_batches)).backward()
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / len(micro_batches)
        names = sorted(totals)
        values = dist.all_reduce_mean(torch.stack([totals[k] for k in names])).tolist()
        metrics = dict(zip(names, values))
        if not math.isfinite(metrics["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"the loss is {metrics['loss']} at step {self.step}; the run stopped before updating the "
                f"weights. {self._last_good()} Resume from it (resume=True) with a lower lr, grad_clip set "
                "(e.g. 1.0), or precision='fp32', and check the data for NaN/inf."
            )
        if cfg.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
            metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = self._lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.module.denoiser)
        self.step += 1
        metrics["lr"] = lr
        return metrics

    def _last_good(self) -> str:
        """A sentence naming the newest checkpoint that verifies (rank 0 reads the files)."""
        if self.rank != 0:
            return "Rank 0's error names the newest checkpoint that verifies."
        path, failures = ckpt.newest_verified(self.config.out_dir)
        text = f"Newest checkpoint that verifies: {path or 'none yet'}."
        if failures:
            text += " Newer ones fail their check and are skipped when resuming: " + "; ".join(failures) + "."
        return text

    def fit(self) -> Dict[str, Any]:
        """Train until `config.steps`; returns the final step, last metrics and checkpoint path."""
        cfg = self.config
        order = SampleOrder(len(self.dataset), cfg.seed)
        sampler = StepBatches(order, cfg.global_batch, self.rank, self.world, cfg.grad_accum, self.step, cfg.steps)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda"
        )
        log = _Logger(cfg, self.rank, self.step) if self.rank == 0 else None
        metrics: Dict[str, float] = {}
        path = None
        micro = []
        try:
            for batch in loader:
                micro.append(batch)
                if len(micro) < cfg.grad_accum:
                    continue
                metrics = self.train_step(micro)
                micro = []
                if log is not None:
                    log.step(self.step, metrics)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                    path = self.save()
        finally:
            if log is not None:
                log.close()
        if path is None and self.step == cfg.steps and ckpt.list_checkpoints(cfg.out_dir):
            path = ckpt.list_checkpoints(cfg.out_dir)[-1][1]
        return {"step": self.step, "metrics": metrics, "checkpoint": path, "out_dir": cfg.out_dir}


def train(config: TrainConfig, **kwargs) -> Dict[str, Any]:
    """`Trainer(config, **kwargs).fit()`."""
    return Trainer(config, **kwargs).fit()


# ---------------------------------------------------------------------------
# logging


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _metrics_up_to(path: str, step: int) -> Optional[str]:
    """The lines of the metrics log `path` up to `step` (None when there is
    no log). A last line that does not parse is what a killed write leaves:
    it is dropped with a warning; one before it is damage: MetricsLogError
    naming the file, the line and the fix."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    numbered = [(n, ln) for n, ln in enumerate(raw, 1) if ln.strip()]
    kept = []
    for i, (n, ln) in enumerate(numbered):
        try:
            entry = json.loads(ln)
            if not isinstance(entry, dict):
                raise ValueError(f"a JSON {type(entry).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == len(numbered) - 1:
                logger.warning("%s: line %d is cut short (a write was killed); dropping it", path, n)
                break
            raise MetricsLogError(
                f"{path}, line {n}: not a metrics line ({e}). Only the last line can be torn by a killed "
                f"write, so this file was damaged otherwise: delete line {n} (or every line from it on; "
                "those metrics are lost), then resume again"
            ) from None
        if entry.get("step", 0) <= step:
            kept.append(ln.decode() + "\n")
    return "".join(kept)


class _Logger:
    """Rank 0's progress bar, JSON-lines metrics and (when installed) TensorBoard."""

    def __init__(self, cfg: TrainConfig, rank: int, start_step: int):
        self.cfg = cfg
        self.path = os.path.join(cfg.out_dir, METRICS_NAME)
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.file = open(self.path, "a")
        self.t0, self.s0, self.start = time.perf_counter(), start_step, time.perf_counter()
        self.bar = progress_bar(cfg.progress, total=cfg.steps, initial=start_step, desc="training", unit="step")
        self.tb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
            except ImportError:
                pass

    def step(self, step: int, metrics: Dict[str, float]) -> None:
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(1)
        if step % self.cfg.log_every and step != self.cfg.steps:
            return
        ips = self.cfg.global_batch * (step - self.s0) / max(now - self.t0, 1e-9)
        self.t0, self.s0 = now, step
        line = {
            "step": step,
            **{k: round(v, 7) for k, v in metrics.items()},
            "images_per_s": round(ips, 3),
            "elapsed_s": round(now - self.start, 3),
        }
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{ips:.1f}")
        if self.tb is not None:
            for k, v in line.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.file.close()
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
