"""Fused CUDA kernels that have passed the `cuda`-marked test suite on a real GPU.

The machines this library is built on have no GPU, so a CUDA kernel can
compile long before it first runs. On CUDA devices the `auto` backend uses a
fused kernel only if it is listed here; everything else takes the reference
path (`DDT_FAST_BACKEND=fused` still forces the kernels, for testing).

Add a row only after `pytest -m cuda` passed for that op on that GPU, with
the commit that was tested.
"""

from typing import Dict, NamedTuple, Tuple

__all__ = ["Verified", "VERIFIED", "SLOWER_ON_GPU", "is_verified", "auto_on_gpu"]


class Verified(NamedTuple):
    op: str
    gpu: str
    date: str
    commit: str


# The `cuda`-marked suites passed on an NVIDIA H200 (torch 2.11, CUDA 13.0):
# tests/test_cuda_fused.py + tests/test_schedule.py (187 passed) at 272d009;
# the whole cuda suite at 145c578 (467 passed; test_bad_input_errors failed:
# a TORCH_CHECK crash on that machine, see docs/backends-and-kernels.md,
# "Known issue"), after the packed norm/SwiGLU kernels and the two-tile
# attention forward; and
# tests/test_cuda_fused.py again at 4a97509 (194 passed) after SwiGLU's flat grid;
# every cuda suite but the (unchanged) attention file at 3179e79 (247 passed)
# and tests/test_cuda_fused.py at 20c8c8a (228 passed), after the norm
# family's raw-register packed forward and one-pass packed backward.
VERIFIED: Tuple[Verified, ...] = (
    Verified("rms_norm_modulate", "NVIDIA H200", "2026-11-26", "20c8c8a"),
    Verified("layer_norm_modulate", "NVIDIA H200", "2026-11-26", "20c8c8a"),
    Verified("gated_residual", "NVIDIA H200", "2026-11-26", "20c8c8a"),
    Verified("gated_residual_rms_norm_modulate", "NVIDIA H200", "2026-11-26", "20c8c8a"),
    Verified("swiglu", "NVIDIA H200", "2026-11-26", "4a97509"),
    Verified("qk_norm_rope", "NVIDIA H200", "2026-11-26", "145c578"),
    Verified("flash_attention", "NVIDIA H200", "2026-11-26", "145c578"),
    Verified("qkv_attention", "NVIDIA H200", "2026-11-26", "145c578"),
    Verified("dp_schedule_solve", "NVIDIA H200", "2026-11-26", "145c578"),
)

# Verified kernels that `auto` still leaves off on CUDA because the GPU
# benchmarks measured them slower than what they replace (op -> why). They
# stay available through DDT_FAST_BACKEND=fused / DDT_FAST_ATTENTION=ddt.
SLOWER_ON_GPU: Dict[str, str] = {
    "flash_attention": "below SDPA's cuDNN kernels on an H200 and about level with its flash kernel "
    "(benchmarks/results/attention_nvidia_h200.json, nvidia_h200_notes.md); the fused "
    "qkv_attention, which also fuses the q/k norm and rotary, is used for sampling instead",
}


def is_verified(op: str) -> bool:
    return any(row.op == op for row in VERIFIED)


def auto_on_gpu(op: str) -> bool:
    """Whether `auto` dispatch uses the CUDA kernel of `op`: verified and not measured slower."""
    return is_verified(op) and op not in SLOWER_ON_GPU
