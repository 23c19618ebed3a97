"""Tolerances for comparing fused kernels with the PyTorch reference.

16-bit rows differ from eager PyTorch by about one ulp (the kernels keep
float32 between the spec's rounding points; eager rounds after every op).
"""

import torch

TOL = {
    torch.float32: dict(atol=3e-5, rtol=3e-5),
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}


def close(actual, expected, dtype, scale=1.0):
    """assert_close in float32 with `dtype`'s tolerance, widened by `scale`."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol["atol"] * scale, rtol=tol["rtol"] * scale)


def close_relative(actual, expected, dtype, scale=1.0):
    """close() after dividing both by the expected tensor's largest magnitude (at least 1):
    for 16-bit gradients summed over many rows, which carry the rounding of each addend."""
    mag = max(expected.float().abs().max().item(), 1.0)
    close(actual / mag, expected / mag, dtype, scale)
