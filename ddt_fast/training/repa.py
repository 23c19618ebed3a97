"""REPA: align an inner block's tokens with a frozen vision encoder's features.

The output of block index `align_layer - 1` (block 8 of the published model,
inside the encoder) goes through the projector
`Linear(C, C) -> SiLU -> Linear(C, C) -> SiLU -> Linear(C, D')` and is pulled
towards the feature encoder's patch features (resized to the token grid) by
`mean(1 - cos)`. The feature encoder is any frozen module mapping images in
[-1, 1] `[B, 3, H, W]` to patch features `[B, L', D']`; DINOv2 ViT-B/14 from
`torch.hub` is the published choice.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddt_fast.models.ddt import Linear

__all__ = [
    "Projector",
    "RepaHook",
    "DINOv2Features",
    "DINOV2_MODELS",
    "check_align_layer",
    "resize_features",
    "cosine_alignment_loss",
    "load_feature_encoder",
]

Tensor = torch.Tensor

DINOV2_MODELS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}


class Projector(nn.Sequential):
    """`Linear(C, C) -> SiLU -> Linear(C, C) -> SiLU -> Linear(C, out)` (keys 0, 2, 4)."""

    def __init__(self, hidden_size: int, out_dim: int):
        super().__init__(
            Linear(hidden_size, hidden_size),
            nn.SiLU(),
            Linear(hidden_size, hidden_size),
            nn.SiLU(),
            Linear(hidden_size, out_dim),
        )


def check_align_layer(align_layer: int, num_blocks: int) -> int:
    """The block index the hook goes on (`align_layer - 1`), or a clear error."""
    if not isinstance(align_layer, int) or not 1 <= align_layer <= num_blocks:
        raise ValueError(
            f"align_layer={align_layer!r} is out of range for a model with {num_blocks} blocks: it "
            f"is 1-based (the hook sits on block index align_layer - 1); pick 1..{num_blocks} "
            "(the published DDT-XL/2 uses 8, inside its 22-block encoder)"
        )
    return align_layer - 1


class RepaHook:
    """A forward hook on `model.blocks[align_layer - 1]` keeping its output `[B, L, C]`."""

    def __init__(self, model: nn.Module, align_layer: int):
        self.index = check_align_layer(align_layer, len(model.blocks))
        self.output: Optional[Tensor] = None
        self.handle = model.blocks[self.index].register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.output = output

    def clear(self) -> None:
        self.output = None

    def remove(self) -> None:
        self.handle.remove()


def resize_features(features: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Patch features `[B, L', D]` on a square `sqrt(L') x sqrt(L')` grid,
    bilinearly resized to the token grid `grid = (Hp, Wp)`: `[B, Hp*Wp, D]`."""
    if features.dim() != 3:
        raise ValueError(f"feature encoder output must be [B, L', D'] patch features, got {tuple(features.shape)}")
    B, L, D = features.shape
    Hp, Wp = grid
    if L == Hp * Wp:
        return features
    side = math.isqrt(L)
    if side * side != L:
        raise ValueError(
            f"cannot resize {L} patch features to the {Hp}x{Wp} token grid: {L} is not a square "
            "grid (drop class/register tokens from the encoder's output)"
        )
    f = features.transpose(1, 2).reshape(B, D, side, side).float()
    f = F.interpolate(f, size=(Hp, Wp), mode="bilinear", align_corners=False)
    return f.flatten(2).transpose(1, 2).to(features.dtype)


def cosine_alignment_loss(pred: Tensor, target: Tensor) -> Tensor:
    """`mean(1 - cos(pred, target))` over batch and tokens (cosine along the last dim)."""
    if pred.shape != target.shape:
        raise ValueError(
            f"projected tokens {tuple(pred.shape)} and encoder features {tuple(target.shape)} differ "
            "in shape: set repa_feature_dim to the encoder's feature size"
        )
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
    return (1.0 - cos).mean()


class DINOv2Features(nn.Module):
    """Frozen DINOv2 patch features: images in [-1, 1] -> `[B, L', D']`.

    Images are mapped to [0, 1], normalised with the ImageNet statistics and
    resized (bicubic) to `224 * (resolution // 256)` pixels (224 for 256 px
    training images, a 16 x 16 patch grid as in REPA).
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, model: nn.Module, feature_dim: int, resolution: int = 256):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.feature_dim = feature_dim
        self.input_size = 224 * max(1, resolution // 256)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # always frozen, always in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = (images.float() + 1) / 2
        x = (x - self.mean) / self.std
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return self.model.forward_features(x)["x_norm_patchtokens"]


def load_feature_encoder(
    name: str = "dinov2_vitb14", resolution: int = 256, device=None, repo: str = "facebookresearch/dinov2"
) -> DINOv2Features:
    """A DINOv2 feature encoder from `torch.hub` (the hub cache, or `repo` as a
    local clone of facebookresearch/dinov2 with `source="local"`).

    Raises RuntimeError with what to do when torch.hub cannot provide it
    (no network and nothing cached)."""
    if name not in DINOV2_MODELS:
        raise ValueError(
            f"unknown REPA feature encoder {name!r}; choose one of {', '.join(DINOV2_MODELS)} "
            "or pass a frozen module mapping images to [B, L', D'] features (feature_encoder=...)"
        )
    import os

    source = "local" if os.path.isdir(repo) else "github"
    try:
        model = torch.hub.load(repo, name, source=source, trust_repo=True)
    except Exception as e:  # network, missing cache, bad repo: many types
        raise RuntimeError(
            f"could not load the REPA feature encoder {name!r} through torch.hub from {repo!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). torch.hub needs network access "
            f"the first time (it caches under {torch.hub.get_dir()}); offline, copy that cache from a machine "
            "that has it, pass a local clone of facebookresearch/dinov2 as repo=..., pass your own frozen "
            "encoder as feature_encoder=..., or train without REPA (repa=False)."
        ) from e
    enc = DINOv2Features(model, DINOV2_MODELS[name], resolution)
    return enc.to(device) if device is not None else enc
