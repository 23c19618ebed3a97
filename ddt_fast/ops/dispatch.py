"""The single dispatch rule of the ops layer.

Elementwise/norm ops: the fused kernel if the extension is loaded and has an
implementation for the tensor's device, else the reference. On CUDA, `auto`
additionally requires the op to be GPU-verified and not measured slower than
the reference there (ops/verified.py).
`DDT_FAST_BACKEND=auto|fused|reference` (or `set_backend`) overrides.

Attention: `ddt` (our kernel) | `flash_attn` (if importable and the case is
supported) | `sdpa`, by the same rule; `DDT_FAST_ATTENTION=auto|ddt|flash_attn|sdpa`
overrides.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

from ddt_fast import _extension
from ddt_fast.ops.verified import auto_on_gpu

BACKENDS = ("auto", "fused", "reference")
ATTENTION_BACKENDS = ("auto", "ddt", "flash_attn", "sdpa")


def _from_env(name: str, allowed, default: str) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


_state = {
    "backend": _from_env("DDT_FAST_BACKEND", BACKENDS, "auto"),
    "attention": _from_env("DDT_FAST_ATTENTION", ATTENTION_BACKENDS, "auto"),
}


def get_backend() -> str:
    return _state["backend"]


def set_backend(backend: str) -> None:
    """Choose `auto`, `fused` or `reference` for every op (process-wide)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _state["backend"] = backend


def get_attention_backend() -> str:
    return _state["attention"]


def set_attention_backend(backend: str) -> None:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    _state["attention"] = backend


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, attention: Optional[str] = None) -> Iterator[None]:
    """Temporarily force the op and/or attention backend: `with use_backend("reference"): ...`."""
    saved = dict(_state)
    try:
        if backend is not None:
            set_backend(backend)
        if attention is not None:
            set_attention_backend(attention)
        yield
    finally:
        _state.update(saved)


# (op, device type) pairs with a compiled kernel, read once from the dispatcher
# (a plain set, so torch.compile can trace the dispatch decision).
_FUSED_KERNELS = frozenset(
    (op, device_type)
    for op in _extension.registered_ops()
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if _extension.has_kernel(op, key)
)


def _has_fused(op: str, device_type: str) -> bool:
    return (op, device_type) in _FUSED_KERNELS


def use_fused(op: str, device: torch.device) -> bool:
    """Whether `op` on `device` runs the fused kernel under the current backend."""
    backend = _state["backend"]
    if backend == "reference" or not _has_fused(op, device.type):
        return False
    if backend == "fused" or device.type != "cuda":
        return True
    return auto_on_gpu(op)


_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def flash_attn_importable() -> bool:
    return _FLASH_ATTN


def _flash_attn_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    return (mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.dtype == k.dtype == v.dtype and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def _ddt_case(device: torch.device, dtype: torch.dtype, head_dim: int, mask, op: str) -> bool:
    """Whether our CUDA kernel `op` (flash_attention or qkv_attention) handles this case."""
    return (mask is None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim in (64, 72, 128) and _has_fused(op, "cuda"))


def attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> str:
    """`ddt`, `flash_attn` or `sdpa` for this call. A forced backend that cannot
    run this case (CPU tensors, a mask, an unsupported head dim) falls back to `sdpa`."""
    choice = _state["attention"]
    ddt_ok = _ddt_case(q.device, q.dtype, q.shape[-1], mask, "flash_attention")
    flash_ok = flash_attn_importable() and _flash_attn_supports(q, k, v, mask)
    if choice == "ddt":
        return "ddt" if ddt_ok else "sdpa"
    if choice == "flash_attn":
        return "flash_attn" if flash_ok else "sdpa"
    if choice == "sdpa":
        return "sdpa"
    if ddt_ok and auto_on_gpu("flash_attention"):
        return "ddt"
    return "flash_attn" if flash_ok else "sdpa"


def use_fused_qkv_attention(qkv: torch.Tensor, num_heads: int, mask=None) -> bool:
    """Whether the model's attention runs as one kernel from the packed `qkv`
    (q/k norm + rotary fused into the flash-attention prologue). It replaces
    both the qk_norm_rope op and the attention op, so it needs the fused op
    backend (not `reference`) and the `ddt` attention backend (forced, or
    `auto` once GPU-verified)."""
    choice = _state["attention"]
    if _state["backend"] == "reference" or choice in ("sdpa", "flash_attn"):
        return False
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if not _ddt_case(qkv.device, qkv.dtype, head_dim, mask, "qkv_attention"):
        return False
    return choice == "ddt" or auto_on_gpu("qkv_attention")
