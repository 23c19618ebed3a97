"""Small helpers shared by tests: damaging files, a tiny DDT, a tiny VAE."""

import torch

from ddt_fast import models


def flip_bytes(path, offsets) -> None:
    """Invert the bytes of `path` at `offsets` (a bit-rot or transfer error)."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


def tiny_model(seed: int = 0):
    """DDT-tiny/2 with its zero-initialised layers perturbed, so every block matters."""
    torch.manual_seed(seed)
    m = models.create("DDT-tiny/2")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def tiny_vae(seed: int = 0):
    """A randomly initialised two-level `diffusers.AutoencoderKL` (16 px images, 4 latent
    channels); skips the calling test when diffusers is not installed."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
