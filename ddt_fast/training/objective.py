"""The published DDT training objective: linear flow matching (+ REPA).

Time runs from noise (t = 0) to data (t = 1), as in the samplers:
`x_t = t * x0 + (1 - t) * noise`, and the network regresses the constant
velocity `v = x0 - noise` with `mean((v_pred - v)^2)`. `t` is log-normal
(`sigmoid(randn)`) or uniform; labels are replaced by the null class
`num_classes` with probability `label_dropout` (for classifier-free guidance).

The random draws of a step (noise, t, label dropout, posterior samples) are
made for the whole global batch from one generator seeded by `(seed, step)`,
and each process takes its slice. So a step's numbers do not depend on the
number of processes or accumulation steps, and a resumed run draws exactly
what the uninterrupted one would have drawn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddt_fast.training.repa import Projector, RepaHook, cosine_alignment_loss, resize_features

__all__ = ["DiffusionTrainer", "TrainModule", "StepDraws", "step_seed", "sample_time", "interpolate"]

Tensor = torch.Tensor


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the random draws of optimizer step `step`."""
    digest = hashlib.sha256(f"ddt_fast.train:{int(seed)}:{int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_time(n: int, mode: str, generator: torch.Generator, device) -> Tensor:
    """`n` times in (0, 1): `sigmoid(randn)` ("lognorm") or `rand` ("uniform")."""
    if mode == "lognorm":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device))
    if mode == "uniform":
        return torch.rand(n, generator=generator, device=device)
    raise ValueError(f"time sampling must be 'lognorm' or 'uniform', got {mode!r}")


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """`(x_t, v)`: `x_t = t x0 + (1 - t) noise`, `v = x0 - noise`."""
    tb = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return tb * x0 + (1 - tb) * noise, x0 - noise


@dataclass
class StepDraws:
    """The random draws of one optimizer step, for the whole global batch."""

    noise: Tensor  # [G, C, H, W]
    t: Tensor  # [G]
    drop: Tensor  # [G] bool: label replaced by the null class
    eps: Optional[Tensor]  # [G, C, H, W] posterior noise (latent_sampling="sample"), else None

    @classmethod
    def draw(
        cls,
        seed: int,
        step: int,
        global_batch: int,
        sample_shape,
        *,
        time_sampling: str,
        label_dropout: float,
        posterior: bool,
        device,
    ) -> "StepDraws":
        device = torch.device(device)
        g = torch.Generator(device=device).manual_seed(step_seed(seed, step))
        noise = torch.randn((global_batch, *sample_shape), generator=g, device=device)
        t = sample_time(global_batch, time_sampling, g, device)
        drop = torch.rand(global_batch, generator=g, device=device) < label_dropout
        eps = torch.randn((global_batch, *sample_shape), generator=g, device=device) if posterior else None
        return cls(noise, t, drop, eps)

    def slice(self, start: int, stop: int) -> "StepDraws":
        return StepDraws(
            self.noise[start:stop],
            self.t[start:stop],
            self.drop[start:stop],
            None if self.eps is None else self.eps[start:stop],
        )


class DiffusionTrainer(nn.Module):
    """The loss module (the published `diffusion_trainer`): flow matching and,
    when `repa_dim` is set, the REPA projector `proj` whose weights are saved
    under `diffusion_trainer.proj.` like the published checkpoints."""

    def __init__(self, hidden_size: int, repa_dim: Optional[int] = None, repa_weight: float = 0.5):
        super().__init__()
        self.repa_weight = float(repa_weight)
        self.proj = Projector(hidden_size, repa_dim) if repa_dim else None

    def forward(
        self,
        denoiser: nn.Module,
        x0: Tensor,
        y: Tensor,
        draws: StepDraws,
        features: Optional[Tensor] = None,
        hook: Optional[RepaHook] = None,
    ) -> Dict[str, Tensor]:
        num_classes = denoiser.num_classes
        y = torch.where(draws.drop, torch.full_like(y, num_classes), y)
        x_t, v = interpolate(x0, draws.noise, draws.t)
        if hook is not None:
            hook.clear()
        v_pred, _ = denoiser(x_t, draws.t, y)
        fm = F.mse_loss(v_pred.float(), v.float())
        out = {"loss_fm": fm}
        if self.proj is not None and features is not None:
            if hook is None or hook.output is None:
                raise RuntimeError("REPA is on but the alignment hook saw no block output")
            h = hook.output
            p = denoiser.patch_size
            grid = (x0.shape[-2] // p, x0.shape[-1] // p)
            target = resize_features(features, grid)
            repa = cosine_alignment_loss(self.proj(h), target)
            out["loss_repa"] = repa
            out["loss"] = fm + self.repa_weight * repa
        else:
            out["loss"] = fm
        return out


class TrainModule(nn.Module):
    """What the optimizer trains and DDP/FSDP wraps: the `denoiser` (a DDT)
    and the `diffusion_trainer` (loss + REPA projector). Its state-dict keys
    are the published Lightning ones (`denoiser.`, `diffusion_trainer.proj.`)."""

    def __init__(self, denoiser: nn.Module, diffusion_trainer: DiffusionTrainer, align_layer: Optional[int] = None):
        super().__init__()
        self.denoiser = denoiser
        self.diffusion_trainer = diffusion_trainer
        self.hook = RepaHook(denoiser, align_layer) if diffusion_trainer.proj is not None else None

    def forward(self, x0: Tensor, y: Tensor, draws: StepDraws, features: Optional[Tensor] = None):
        return self.diffusion_trainer(self.denoiser, x0, y, draws, features, self.hook)
