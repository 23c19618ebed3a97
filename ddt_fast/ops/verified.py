"""Fused CUDA kernels that have passed the `cuda`-marked test suite on a real GPU.

The machines this library is built on have no GPU, so a CUDA kernel can
compile long before it first runs. On CUDA devices the `auto` backend uses a
fused kernel only if it is listed here; everything else takes the reference
path (`DDT_FAST_BACKEND=fused` still forces the kernels, for testing).

Add a row only after `pytest -m cuda` passed for that op on that GPU, with
the commit that was tested.
"""
from typing import NamedTuple, Tuple


class Verified(NamedTuple):
    op: str
    gpu: str
    date: str
    commit: str


VERIFIED: Tuple[Verified, ...] = ()


def is_verified(op: str) -> bool:
    return any(row.op == op for row in VERIFIED)
