"""The single dispatch rule of the ops layer, and the backend switches it reads.

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

Where the switches live: the three environment variables are read once, when
this module is imported, into the process defaults; `set_backend`,
`set_attention_backend` and `set_cpu_linear` change those defaults for every
thread. `use_backend(...)` overrides them for the code it wraps, through
`contextvars`: the override belongs to the thread (or asyncio task) that
entered it, so it never leaks into another one, and nested blocks restore the
enclosing choice on exit. torch.compile reads the effective values while it
traces and guards on them, so a compiled model retraces when it is called
under another choice instead of replaying a stale one.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Iterator, NamedTuple, Optional, Union

import torch

from ddt_fast import _extension
from ddt_fast.ops.verified import auto_on_gpu

__all__ = [
    "BACKENDS",
    "ATTENTION_BACKENDS",
    "CPU_LINEAR_MODES",
    "Backends",
    "get_backend",
    "set_backend",
    "get_attention_backend",
    "set_attention_backend",
    "get_cpu_linear",
    "set_cpu_linear",
    "current",
    "use_backend",
    "has_fused_kernel",
    "auto_uses_fused",
    "use_fused",
    "flash_attn_importable",
    "attention_backend",
    "use_fused_qkv_attention",
    "cpu_has_native_matmul",
    "FLOAT32_LINEAR_MIN_ROWS",
    "float32_linear_applies",
    "use_float32_linear",
]

BACKENDS = ("auto", "fused", "reference")
ATTENTION_BACKENDS = ("auto", "ddt", "flash_attn", "sdpa")
CPU_LINEAR_MODES = ("auto", "float32", "native")


class Backends(NamedTuple):
    """The three switches as they apply here and now (`current()`)."""

    backend: str
    attention: str
    cpu_linear: str


def _checked(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return value


def _from_env(name: str, allowed, default: str) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")
    return value


# Process defaults: the environment at import, then set_backend & co. A plain
# dict of strings, which torch.compile guards on by value.
_defaults = {
    "backend": _from_env("DDT_FAST_BACKEND", BACKENDS, "auto"),
    "attention": _from_env("DDT_FAST_ATTENTION", ATTENTION_BACKENDS, "auto"),
    "cpu_linear": _from_env("DDT_FAST_CPU_LINEAR", CPU_LINEAR_MODES, "auto"),
}

# use_backend's overrides, one per switch (None: the process default applies).
# Module-level ContextVars of strings: torch.compile traces `.get()` and guards
# on the value it read, without a graph break.
_backend_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ddt_fast_backend", default=None)
_attention_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("ddt_fast_attention", default=None)
_cpu_linear_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "ddt_fast_cpu_linear", default=None
)


def get_backend() -> str:
    """The op backend in effect here: `use_backend`'s override, else the process default."""
    value = _backend_override.get()
    return _defaults["backend"] if value is None else value


def set_backend(backend: str) -> None:
    """Choose `auto`, `fused` or `reference` for every op: the process default,
    seen by every thread outside a `use_backend` block that sets the backend."""
    _defaults["backend"] = _checked(backend, BACKENDS, "backend")


def get_attention_backend() -> str:
    value = _attention_override.get()
    return _defaults["attention"] if value is None else value


def set_attention_backend(backend: str) -> None:
    """The process default of the attention backend (see `set_backend`)."""
    _defaults["attention"] = _checked(backend, ATTENTION_BACKENDS, "attention backend")


def get_cpu_linear() -> str:
    value = _cpu_linear_override.get()
    return _defaults["cpu_linear"] if value is None else value


def set_cpu_linear(mode: str) -> None:
    """How 16-bit linear layers run on the CPU, as the process default (see
    `set_backend`): `auto` (float32 where the CPU has no 16-bit matrix
    instructions), `float32` (always) or `native` (PyTorch's 16-bit kernels)."""
    _defaults["cpu_linear"] = _checked(mode, CPU_LINEAR_MODES, "CPU linear mode")


def current() -> Backends:
    """The op backend, attention backend and CPU linear mode in effect here."""
    return Backends(get_backend(), get_attention_backend(), get_cpu_linear())


@contextlib.contextmanager
def use_backend(
    backend: Optional[str] = None, attention: Optional[str] = None, cpu_linear: Optional[str] = None
) -> Iterator[None]:
    """Force the op, attention and/or CPU linear backend for the code inside:
    `with use_backend("reference"): ...`. The override is local to this
    thread or asyncio task (a `contextvars` context); blocks nest, and each
    restores the enclosing choice on exit. Switches left as None keep theirs."""
    changes = [
        (var, _checked(value, allowed, what))
        for var, value, allowed, what in (
            (_backend_override, backend, BACKENDS, "backend"),
            (_attention_override, attention, ATTENTION_BACKENDS, "attention backend"),
            (_cpu_linear_override, cpu_linear, CPU_LINEAR_MODES, "CPU linear mode"),
        )
        if value is not None
    ]
    tokens = [(var, var.set(value)) for var, value in changes]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


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
    backend = get_backend()
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
    choice = get_attention_backend()
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
    choice = get_attention_backend()
    if get_backend() == "reference" or choice in ("sdpa", "flash_attn"):
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
    mode = get_cpu_linear()
    if mode == "native" or get_backend() == "reference" or device.type != "cpu" or dtype not in _NATIVE_MATMUL_FEATURES:
        return False
    return mode == "float32" or not cpu_has_native_matmul(dtype)


def use_float32_linear(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """`float32_linear_applies` to x's device, and x has at least
    FLOAT32_LINEAR_MIN_ROWS rows."""
    return x.numel() >= FLOAT32_LINEAR_MIN_ROWS * max(1, x.shape[-1]) and float32_linear_applies(x.device, dtype)
