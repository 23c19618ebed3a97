"""From latents to what users keep: images through the Stable Diffusion VAE,
PNG files, a grid, the `.npz` the ADM evaluation suite reads for FID
(uint8 `[N, H, W, 3]` under `arr_0`), and the plot of a calibration's
cost-vs-budget curve."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ddt_fast._io import atomic_write
from ddt_fast.models.vae import SD_VAE, SD_VAE_SCALING, load_vae

__all__ = [
    "SD_VAE",
    "SD_VAE_SCALING",
    "load_vae",
    "decode_latents",
    "save_png",
    "make_grid",
    "save_npz",
    "plot_cost_curve",
]


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae, scaling_factor: float = SD_VAE_SCALING) -> np.ndarray:
    """uint8 images `[N, H, W, 3]` from latents `[N, 4, h, w]` (scaled by `scaling_factor`)."""
    param = next(vae.parameters())
    x = vae.decode(latents.to(param.device, param.dtype) / scaling_factor).sample
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_png(image: np.ndarray, path: str, overwrite: bool = False) -> None:
    """A uint8 image as a PNG file, crash-safe; an existing `path` is replaced only with `overwrite=True`."""
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), overwrite=overwrite)


def make_grid(images: np.ndarray, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """One uint8 image tiling `images` `[N, H, W, 3]` in rows of `nrow`."""
    n, h, w, c = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[
            k
        ]
    return grid


def save_npz(path: str, arr_0: np.ndarray, overwrite: bool = False, **extra) -> None:
    """`np.savez` under `arr_0` (what the ADM FID suite reads), written crash-safe;
    an existing `path` is replaced only with `overwrite=True`."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr_0, **extra)

    atomic_write(path, write, overwrite=overwrite)


def plot_cost_curve(
    curve: Sequence[Tuple[int, float]],
    path: str,
    points: Optional[Dict[str, List[Tuple[int, float]]]] = None,
    title: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """The DP cost-vs-budget curve (log scale) as a PNG, with optional labelled
    points (e.g. the uniform schedules' costs under the same statistic)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting the cost curve needs matplotlib: pip install matplotlib") from e

    def positive(pts):  # a log axis: leave out zero costs (K = N)
        return [k for k, c in pts if c > 0], [c for k, c in pts if c > 0]

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(*positive(curve), label="DP (optimal)")
    for (label, pts), marker in zip((points or {}).items(), "os^v"):
        ax.plot(*positive(pts), marker, label=label)
    ax.set_xlabel("encoder runs (budget K)")
    ax.set_ylabel("schedule cost (sum of 1 - similarity)")
    ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    if points:
        ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120), overwrite=overwrite)
    finally:
        plt.close(fig)
