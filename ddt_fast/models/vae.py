"""The Stable Diffusion VAE (`diffusers.AutoencoderKL`) the DDT latents live in:
loaded here for sampling (decoding latents to images) and for training
(encoding images to latents)."""

from __future__ import annotations

import os

import torch

__all__ = ["SD_VAE", "SD_VAE_SCALING", "load_vae"]

SD_VAE = "stabilityai/sd-vae-ft-ema"
SD_VAE_SCALING = 0.18215


def load_vae(name_or_path: str = SD_VAE, device=None, dtype: torch.dtype = torch.float32):
    """`diffusers.AutoencoderKL` from a local folder or a model-hub id."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(
            "decoding latents to images needs diffusers: pip install diffusers (or sample latents only, with vae=None)"
        ) from e
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        where = "folder" if os.path.isdir(name_or_path) else "model-hub id"
        raise RuntimeError(
            f"could not load the VAE from {where} {name_or_path!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}). Pass a local folder holding sd-vae-ft-ema, or sample "
            "latents only (vae=None)."
        ) from e
    return vae.to(device).eval() if device is not None else vae.eval()
