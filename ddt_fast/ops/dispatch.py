"""The single dispatch rule of the ops layer.

Elementwise/norm ops: the fused kernel if the extension is loaded and has an
implementation for the tensor's device, else the reference. On CUDA, `auto`
additionally requires the op to be GPU-verified and not measured slower than
the reference there (ops/verified.py).
`DDT_FAST_BACKEND=auto|fused|reference` (or `set_backend`) overrides.

Attention: `ddt` (our kernel) | `flash_attn` (if importable and the case is
supported) | `sdpa`, by the same rule; `DDT_FAST_ATTENTION=auto|ddt|flash_attn|sdpa`
overrides.

Linear layers with 16-bit inputs on the CPU: PyTorch's bfloat16/float16
matrix products run 5-7x slower than float32 ones on CPUs without 16-bit
matrix instructions (AVX2, AVX-512 without BF16/FP16), so `auto` computes
them in float32 there (exact products, float32 accumulation, rounded once:
what the native kernel computes, up to summation order);
`DDT_FAST_CPU_LINEAR=auto|float32|native` overrides.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator, Optional, Union

import torch

from ddt_fast import _extension
from ddt_fast.ops.verified import auto_on_gpu

BACKENDS = ("auto", "fused", "reference")
ATTENTION_BACKENDS = ("auto", "ddt", "flash_attn", "sdpa")
CPU_LINEAR_MODES = ("auto", "float32", "native")


def _from_env(name: str, allowed, default: str) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


_state = {
    "backend": _from_env("DDT_FAST_BACKEND", BACKENDS, "auto"),
    "attention": _from_env("DDT_FAST_ATTENTION", ATTENTION_BACKENDS, "auto"),
    "cpu_linear": _from_env("DDT_FAST_CPU_LINEAR", CPU_LINEAR_MODES, "auto"),
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


def get_cpu_linear() -> str:
    return _state["cpu_linear"]


def set_cpu_linear(mode: str) -> None:
    """How 16-bit linear layers run on the CPU: `auto` (float32 where the CPU
    has no 16-bit matrix instructions), `float32` (always) or `native`
    (PyTorch's 16-bit kernels)."""
    if mode not in CPU_LINEAR_MODES:
        raise ValueError(f"CPU linear mode must be one of {CPU_LINEAR_MODES}, got {mode!r}")
    _state["cpu_linear"] = mode


@contextlib.contextmanager
def use_backend(
    backend: Optional[str] = None, attention: Optional[str] = None, cpu_linear: Optional[str] = None
) -> Iterator[None]:
    """Temporarily force the op, attention and/or CPU linear backend:
    `with use_backend("reference"): ...`."""
    saved = dict(_state)
    try:
        if backend is not None:
            set_backend(backend)
        if attention is not None:
            set_attention_backend(attention)
        if cpu_linear is not None:
            set_cpu_linear(cpu_linear)
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


def _device_type(device: Union[torch.device, str]) -> str:
    return device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]


def has_fused_kernel(op: str, device: Union[torch.device, str]) -> bool:
    """Whether the extension has a compiled kernel of `op` (a name of
    `KERNEL_OPS`) for `device` (a device, or a device type such as "cuda")."""
    return (op, _device_type(device)) in _FUSED_KERNELS


def auto_uses_fused(op: str, device: Union[torch.device, str]) -> bool:
    """Whether the `auto` backend runs the compiled kernel of `op` on `device`:
    one exists and, on CUDA, it is GPU-verified and not measured slower
    (ops/verified.py)."""
    if not has_fused_kernel(op, device):
        return False
    return _device_type(device) != "cuda" or auto_on_gpu(op)


def use_fused(op: str, device: torch.device) -> bool:
    """Whether `op` on `device` runs the fused kernel under the current backend."""
    backend = _state["backend"]
    if backend == "reference":
        return False
    if backend == "fused":
        return has_fused_kernel(op, device)
    return auto_uses_fused(op, device)


_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


def flash_attn_importable() -> bool:
    return _FLASH_ATTN


def _flash_attn_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    return (
        mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
    )


def _ddt_case(device: torch.device, dtype: torch.dtype, head_dim: int, mask, op: str) -> bool:
    """Whether our CUDA kernel `op` (flash_attention or qkv_attention) handles this case."""
    return (
        mask is None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and head_dim in (64, 72, 128)
        and has_fused_kernel(op, "cuda")
    )


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


def _cpu_capabilities() -> dict:
    get = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.9
    try:
        return dict(get()) if get is not None else {}
    except Exception:  # cpuinfo failed to initialise: nothing known
        return {}


# CPU features with which PyTorch's 16-bit matrix products run at least at
# float32 speed (x86: AVX-512 BF16/FP16 or AMX; ARM: the BF16 and FP16
# arithmetic extensions).
_NATIVE_MATMUL_FEATURES = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16", "fp16_arith"),
}


@functools.cache
def cpu_has_native_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU has matrix instructions for `dtype` (bfloat16/float16).
    Unknown (an older PyTorch without `torch.cpu.get_capabilities`): True, so
    `auto` leaves PyTorch's kernels alone."""
    caps = _cpu_capabilities()
    if not caps:
        return True
    return any(caps.get(feature) is True for feature in _NATIVE_MATMUL_FEATURES.get(dtype, ()))


# Below this many rows (tokens x batch) converting the weight to float32 costs
# more than the 16-bit product saves (measured crossover on a Zen 3: 4-8 rows
# for 1152-wide layers); the encoder's per-sample modulation is such a product.
FLOAT32_LINEAR_MIN_ROWS = 16


def float32_linear_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether linear layers with `dtype` operands (their own dtype, or
    autocast's) on `device` compute in float32 when large enough: CPU,
    bfloat16/float16, not the reference backend (the published path), and
    `float32` mode or `auto` without native 16-bit matrix instructions."""
    mode = _state["cpu_linear"]
    if (
        mode == "native"
        or _state["backend"] == "reference"
        or device.type != "cpu"
        or dtype not in _NATIVE_MATMUL_FEATURES
    ):
        return False
    return mode == "float32" or not cpu_has_native_matmul(dtype)


def use_float32_linear(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """`float32_linear_applies` to x's device, and x has at least
    FLOAT32_LINEAR_MIN_ROWS rows."""
    return x.numel() >= FLOAT32_LINEAR_MIN_ROWS * max(1, x.shape[-1]) and float32_linear_applies(x.device, dtype)
