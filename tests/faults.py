"""Helpers of the fault-injection tests: damaging files, a small model."""

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
