"""Every raw op (torch.ops.ddt_fast.*) and every ddt_fast.ops function
refuses what it cannot compute, with an error that names the argument.

One table of bad inputs over the raw ops: wrong rank, dtype (integer ones
too), device (a meta tensor among CPU ones: the dispatcher then picks the
fake implementation, which must check devices rather than hand back empty
tensors), width, head dim, a missing optional tensor for the mode, eps,
num_heads, scale, k_max, non-finite similarities. The CPU ops are called with
CPU tensors (bad argument mixed in); the CUDA-only attention ops, which have
no CPU kernel, with meta tensors, through their fake implementations (and
with CPU tensors they must raise too). Every case runs in this process: none
may crash it. A second table: the Python op layer with tensors that are not
floating-point, on every backend.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddt_fast import _extension, ops

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("rms_norm_modulate", "CPU"), reason="ddt_fast._C with the CPU kernels is not built"
)

ERRORS = (RuntimeError, ValueError, TypeError)
NAN, INF = float("nan"), float("inf")

# The schema order of every raw op's arguments.
SIGNATURES = {
    "rms_norm_modulate": ("x", "weight", "shift", "scale", "eps"),
    "layer_norm_modulate": ("x", "shift", "scale", "eps"),
    "gated_residual": ("x", "gate", "y"),
    "gated_residual_rms_norm_modulate": ("x", "gate", "y", "weight", "shift", "scale", "eps"),
    "norm_modulate_backward": (
        "grad_out",
        "grad_x_out",
        "x",
        "gate",
        "y",
        "weight",
        "shift",
        "scale",
        "eps",
        "kind",
        "residual",
    ),
    "qk_norm_rope": ("qkv", "q_weight", "k_weight", "num_heads", "rope", "eps"),
    "qk_norm_rope_backward": ("grad_q", "grad_k", "grad_v", "qkv", "q_weight", "k_weight", "num_heads", "rope", "eps"),
    "swiglu": ("a", "b"),
    "swiglu_backward": ("grad_out", "a", "b"),
    "flash_attention": ("q", "k", "v", "scale"),
    "flash_attention_backward": ("grad_out", "q", "k", "v", "out", "lse", "scale"),
    "qkv_attention": ("qkv", "q_weight", "k_weight", "num_heads", "rope", "eps", "scale"),
    "dp_schedule_solve": ("sim", "k_max"),
}
CUDA_ONLY = ("flash_attention", "flash_attention_backward", "qkv_attention")

B, L, C = 2, 4, 8  # norm family
H, D = 2, 8  # q/k norm + rotary: qkv [B, L, 3 * H * D]
AH, AL, AD = 2, 8, 64  # attention: [B, AH, AL, AD]


def valid_args(op: str) -> dict:
    """A call of `op` that succeeds: CPU tensors, meta ones for the CUDA-only ops."""
    r = torch.randn
    if op in (
        "rms_norm_modulate",
        "layer_norm_modulate",
        "gated_residual",
        "gated_residual_rms_norm_modulate",
        "norm_modulate_backward",
    ):
        return dict(
            x=r(B, L, C),
            weight=r(C),
            shift=r(B, 1, C),
            scale=r(B, 1, C),
            gate=r(B, 1, C),
            y=r(B, L, C),
            eps=1e-6,
            grad_out=r(B, L, C),
            grad_x_out=r(B, L, C),
            kind=1,
            residual=True,
        )
    if op in ("qk_norm_rope", "qk_norm_rope_backward"):
        return dict(
            qkv=r(B, L, 3 * H * D),
            q_weight=r(D),
            k_weight=r(D),
            num_heads=H,
            rope=r(L, D // 2, 2),
            eps=1e-6,
            grad_q=r(B, H, L, D),
            grad_k=r(B, H, L, D),
            grad_v=r(B, H, L, D),
        )
    if op in ("swiglu", "swiglu_backward"):
        return dict(a=r(3, 5), b=r(3, 5), grad_out=r(3, 5))
    if op in ("flash_attention", "flash_attention_backward"):
        q = torch.empty(B, AH, AL, AD, dtype=torch.bfloat16, device="meta")
        return dict(
            q=q,
            k=q.clone(),
            v=q.clone(),
            out=q.clone(),
            grad_out=q.clone(),
            lse=torch.empty(B, AH, AL, device="meta"),
            scale=AD**-0.5,
        )
    if op == "qkv_attention":
        return dict(
            qkv=torch.empty(B, AL, 3 * AH * AD, dtype=torch.bfloat16, device="meta"),
            q_weight=torch.empty(AD, device="meta"),
            k_weight=torch.empty(AD, device="meta"),
            num_heads=AH,
            rope=torch.empty(AL, AD // 2, 2, device="meta"),
            eps=1e-6,
            scale=AD**-0.5,
        )
    if op == "dp_schedule_solve":
        return dict(sim=torch.rand(2, 6, 6), k_max=3)
    raise KeyError(op)


def call(op: str, changes: dict):
    """`op` on its valid arguments with `changes` applied: a value, or a
    function of the valid argument."""
    args = valid_args(op)
    for name, change in changes.items():
        args[name] = change(args[name]) if callable(change) else change
    return getattr(torch.ops.ddt_fast, op)(*(args[name] for name in SIGNATURES[op]))


def meta(t):
    return t.to("meta")


def cpu(t):
    return torch.empty(t.shape, dtype=t.dtype)  # (meta tensors have no values to copy)


def to_int(t):
    return cpu(t).int() if t.is_meta else t.int()


def wider(t):
    return torch.randn(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)


def nan_at(b, i, j):
    def change(sim):
        sim = sim.clone()
        sim[b, i, j] = NAN
        return sim

    return change


# (op, changes, pattern the message must match: it names the argument)
CASES = [
    # rms_norm_modulate
    ("rms_norm_modulate", dict(x=torch.randn(B, C)), r"x must be \[B, L, C\]"),
    ("rms_norm_modulate", dict(x=to_int), r"x has dtype Int; supported"),
    ("rms_norm_modulate", dict(weight=to_int), r"weight must be the dtype of x"),
    ("rms_norm_modulate", dict(weight=meta), r"weight is on meta but x is on cpu"),
    ("rms_norm_modulate", dict(shift=meta), r"shift is on meta but x is on cpu"),
    ("rms_norm_modulate", dict(x=meta), r"shift is on cpu but x is on meta"),
    ("rms_norm_modulate", dict(weight=wider), r"weight must be \[C\] = \[8\], got \[9\]"),
    ("rms_norm_modulate", dict(shift=wider), r"shift must be \[B, 1, C\]"),
    (
        "rms_norm_modulate",
        dict(scale=lambda t: torch.randn(B, 1, 2 * C, device=t.device)[..., ::2]),
        r"scale must be contiguous in its last dim",
    ),
    ("rms_norm_modulate", dict(eps=-1.0), r"eps must be a finite number >= 0, got -1"),
    ("rms_norm_modulate", dict(eps=NAN), r"eps must be a finite number >= 0, got nan"),
    ("rms_norm_modulate", dict(eps=INF), r"eps must be a finite number >= 0, got inf"),
    # layer_norm_modulate
    ("layer_norm_modulate", dict(x=torch.randn(B, L, C, 1)), r"x must be \[B, L, C\]"),
    ("layer_norm_modulate", dict(shift=lambda t: t.long()), r"shift must be the dtype of x"),
    ("layer_norm_modulate", dict(scale=meta), r"scale is on meta but x is on cpu"),
    ("layer_norm_modulate", dict(scale=wider), r"scale must be \[B, 1, C\]"),
    ("layer_norm_modulate", dict(eps=NAN), r"eps must be a finite number"),
    ("layer_norm_modulate", dict(eps=-INF), r"eps must be a finite number"),
    # gated_residual
    ("gated_residual", dict(x=torch.randn(L, C)), r"x must be \[B, L, C\]"),
    ("gated_residual", dict(gate=to_int), r"gate must be the dtype of x"),
    ("gated_residual", dict(y=to_int), r"y must match x"),
    ("gated_residual", dict(y=meta), r"y must match x .*meta"),
    ("gated_residual", dict(gate=meta), r"gate is on meta but x is on cpu"),
    ("gated_residual", dict(gate=wider), r"gate must be \[B, 1, C\]"),
    ("gated_residual", dict(y=wider), r"y must match x"),
    # gated_residual_rms_norm_modulate
    ("gated_residual_rms_norm_modulate", dict(weight=meta), r"weight is on meta"),
    ("gated_residual_rms_norm_modulate", dict(x=meta), r"y must match x"),
    ("gated_residual_rms_norm_modulate", dict(weight=wider), r"weight must be \[C\] = \[8\]"),
    (
        "gated_residual_rms_norm_modulate",
        dict(
            x=lambda t: t.bfloat16(),
            y=lambda t: t.bfloat16(),
            gate=lambda t: t.bfloat16(),
            weight=lambda t: t.bfloat16(),
            scale=lambda t: t.bfloat16(),
        ),
        r"shift, scale and gate must share one dtype, got BFloat16 and Float \(shift\)",
    ),
    (
        "gated_residual_rms_norm_modulate",
        dict(x=lambda t: t.bool(), y=lambda t: t.bool()),
        r"x has dtype Bool; supported",
    ),
    ("gated_residual_rms_norm_modulate", dict(eps=-1e-6), r"eps must be a finite number"),
    # norm_modulate_backward: a missing optional tensor the mode needs
    ("norm_modulate_backward", dict(weight=None), r"norm kind 1 \(rms\) needs weight"),
    ("norm_modulate_backward", dict(shift=None), r"norm kind 1 \(rms\) needs shift"),
    ("norm_modulate_backward", dict(scale=None), r"norm kind 1 \(rms\) needs scale"),
    ("norm_modulate_backward", dict(kind=2, scale=None), r"norm kind 2 \(layer\) needs scale"),
    ("norm_modulate_backward", dict(kind=2, shift=None, scale=None), r"norm kind 2 \(layer\) needs shift"),
    ("norm_modulate_backward", dict(gate=None), r"residual=True needs gate"),
    ("norm_modulate_backward", dict(kind=0, gate=None), r"residual=True needs gate"),
    ("norm_modulate_backward", dict(y=None), r"residual=True needs y"),
    ("norm_modulate_backward", dict(grad_out=None), r"needs grad_out"),
    # ... devices, dtypes and shapes of everything it is given
    ("norm_modulate_backward", dict(grad_out=meta), r"grad_out is on meta but x is on cpu"),
    ("norm_modulate_backward", dict(grad_x_out=meta), r"grad_x_out is on meta but x is on cpu"),
    ("norm_modulate_backward", dict(kind=0, residual=False, weight=meta), r"weight is on meta but x is on cpu"),
    ("norm_modulate_backward", dict(x=meta), r"grad_out is on cpu but x is on meta"),
    ("norm_modulate_backward", dict(grad_out=to_int), r"grad_out has dtype Int; supported"),
    (
        "norm_modulate_backward",
        dict(grad_x_out=lambda t: t.to(torch.complex64)),
        r"grad_x_out has dtype ComplexFloat; supported",
    ),
    ("norm_modulate_backward", dict(grad_out=wider), r"grad_out must be \[2, 4, 8\], got \[2, 4, 9\]"),
    ("norm_modulate_backward", dict(grad_x_out=wider), r"grad_x_out must be \[2, 4, 8\], got \[2, 4, 9\]"),
    ("norm_modulate_backward", dict(x=lambda t: t[0]), r"x must be \[B, L, C\]"),
    ("norm_modulate_backward", dict(weight=wider), r"weight must be \[C\]"),
    ("norm_modulate_backward", dict(kind=3), r"kind must be 0 \(none\), 1 \(rms\) or 2 \(layer\), got 3"),
    ("norm_modulate_backward", dict(kind=-1), r"kind must be 0"),
    ("norm_modulate_backward", dict(eps=NAN), r"eps must be a finite number"),
    # qk_norm_rope
    ("qk_norm_rope", dict(qkv=lambda t: t[0]), r"qkv must be \[B, L, 3C\]"),
    ("qk_norm_rope", dict(qkv=to_int), r"qkv has dtype Int; supported"),
    ("qk_norm_rope", dict(q_weight=to_int), r"q_weight: q/k norm weights must have qkv's dtype"),
    ("qk_norm_rope", dict(k_weight=wider), r"k_weight: q/k norm weights must be \[head_dim\] = \[8\], got \[9\]"),
    ("qk_norm_rope", dict(q_weight=meta), r"q_weight is on meta but qkv is on cpu"),
    ("qk_norm_rope", dict(rope=meta), r"rope is on meta but qkv is on cpu"),
    ("qk_norm_rope", dict(qkv=meta), r"q_weight is on cpu but qkv is on meta"),
    ("qk_norm_rope", dict(rope=lambda t: t.double()), r"rope must be float32 \[L, D/2, 2\]"),
    ("qk_norm_rope", dict(rope=lambda t: t[1:]), r"rope must be float32 \[L, D/2, 2\] = \[4, 4, 2\]"),
    (
        "qk_norm_rope",
        dict(qkv=lambda t: t.bfloat16(), q_weight=lambda t: t.bfloat16()),
        r"q_weight and k_weight differ in dtype",
    ),
    (
        "qk_norm_rope",
        dict(qkv=torch.randn(B, L, 3 * H * 6), q_weight=torch.randn(6), k_weight=torch.randn(6)),
        r"head dim 6 must be a multiple of 4",
    ),
    ("qk_norm_rope", dict(num_heads=0), r"num_heads must be > 0, got 0"),
    ("qk_norm_rope", dict(num_heads=-2), r"num_heads must be > 0, got -2"),
    ("qk_norm_rope", dict(num_heads=5), r"is not 3 \* num_heads \(5\) \* head_dim"),
    ("qk_norm_rope", dict(eps=-1.0), r"eps must be a finite number"),
    ("qk_norm_rope", dict(eps=NAN), r"eps must be a finite number"),
    # qk_norm_rope_backward
    ("qk_norm_rope_backward", dict(grad_q=meta), r"grad_q is on meta but qkv is on cpu"),
    ("qk_norm_rope_backward", dict(grad_v=meta), r"grad_v is on meta but qkv is on cpu"),
    ("qk_norm_rope_backward", dict(grad_k=to_int), r"grad_k has dtype Int; supported"),
    ("qk_norm_rope_backward", dict(grad_v=wider), r"grad_v: qk_norm_rope gradients must be \[B, H, L, D\]"),
    ("qk_norm_rope_backward", dict(grad_q=lambda t: t[0]), r"grad_q: qk_norm_rope gradients must be"),
    ("qk_norm_rope_backward", dict(rope=meta), r"rope is on meta"),
    ("qk_norm_rope_backward", dict(num_heads=0), r"num_heads must be > 0"),
    ("qk_norm_rope_backward", dict(eps=INF), r"eps must be a finite number"),
    # swiglu
    ("swiglu", dict(a=torch.tensor(1.0), b=torch.tensor(1.0)), r"swiglu needs a and b of one shape"),
    ("swiglu", dict(b=wider), r"swiglu needs a and b of one shape"),
    ("swiglu", dict(a=to_int, b=to_int), r"a has dtype Int; supported"),
    ("swiglu", dict(b=lambda t: t.double()), r"a and b of one dtype"),
    ("swiglu", dict(b=meta), r"b is on meta but a is on cpu"),
    ("swiglu", dict(a=meta), r"b is on cpu but a is on meta"),
    # swiglu_backward
    ("swiglu_backward", dict(grad_out=meta), r"grad_out is on meta but a is on cpu"),
    ("swiglu_backward", dict(grad_out=to_int), r"grad_out has dtype Int; supported"),
    ("swiglu_backward", dict(grad_out=wider), r"grad_out must be \[3, 5\], got \[3, 6\]"),
    ("swiglu_backward", dict(b=meta), r"b is on meta"),
    # flash_attention (meta tensors: the fake implementation checks as the kernel does)
    ("flash_attention", dict(k=cpu), r"k is on cpu"),
    ("flash_attention", dict(q=cpu), r"q is on cpu"),
    ("flash_attention", dict(k=lambda t: t[0]), r"attention expects k as \[B, H, L, D\]"),
    ("flash_attention", dict(v=lambda t: t.half()), r"attention inputs differ in dtype \(v is"),
    (
        "flash_attention",
        dict(q=lambda t: t.float(), k=lambda t: t.float(), v=lambda t: t.float()),
        r"q has dtype Float; the flash-attention kernel takes bfloat16 or float16",
    ),
    (
        "flash_attention",
        dict(q=lambda t: t.int(), k=lambda t: t.int(), v=lambda t: t.int()),
        r"q has dtype Int; the flash-attention kernel takes bfloat16 or float16",
    ),
    (
        "flash_attention",
        dict(q=lambda t: t[..., :32], k=lambda t: t[..., :32], v=lambda t: t[..., :32]),
        r"head dims 64, 72 and 128, got 32",
    ),
    ("flash_attention", dict(v=lambda t: t[:, :, :3]), r"k and v differ in length"),
    ("flash_attention", dict(k=lambda t: t[:, :1]), r"k has shape \[2, 1, 8, 64\], incompatible with q"),
    ("flash_attention", dict(scale=NAN), r"scale must be finite, got nan"),
    ("flash_attention", dict(scale=-INF), r"scale must be finite, got -inf"),
    # flash_attention_backward
    ("flash_attention_backward", dict(lse=cpu), r"lse is on cpu but q is on meta"),
    ("flash_attention_backward", dict(out=cpu), r"out is on cpu"),
    ("flash_attention_backward", dict(grad_out=cpu), r"grad_out is on cpu"),
    ("flash_attention_backward", dict(lse=lambda t: t.half()), r"lse must be float32 \[B, H, Lq\]"),
    ("flash_attention_backward", dict(lse=lambda t: t[:, :, :3]), r"lse must be float32 \[B, H, Lq\]"),
    ("flash_attention_backward", dict(grad_out=lambda t: t[:, :, :3]), r"grad_out must be shaped like q"),
    ("flash_attention_backward", dict(out=lambda t: t.half()), r"attention inputs differ in dtype \(out is"),
    ("flash_attention_backward", dict(scale=INF), r"scale must be finite"),
    # qkv_attention
    ("qkv_attention", dict(qkv=cpu), r"qkv_attention runs on CUDA tensors; qkv is on cpu"),
    ("qkv_attention", dict(q_weight=cpu), r"q_weight is on cpu but qkv is on meta"),
    ("qkv_attention", dict(rope=cpu), r"rope is on cpu but qkv is on meta"),
    ("qkv_attention", dict(qkv=lambda t: t[0]), r"qkv must be \[B, L, 3C\]"),
    ("qkv_attention", dict(q_weight=lambda t: t.int()), r"q_weight: q/k norm weights must have qkv's dtype"),
    ("qkv_attention", dict(k_weight=lambda t: t[1:]), r"k_weight: q/k norm weights must be \[head_dim\]"),
    ("qkv_attention", dict(rope=lambda t: t.double()), r"rope must be float32"),
    ("qkv_attention", dict(num_heads=0), r"num_heads must be > 0"),
    ("qkv_attention", dict(num_heads=-1), r"num_heads must be > 0"),
    ("qkv_attention", dict(num_heads=5), r"3 \* num_heads \(5\)"),
    ("qkv_attention", dict(num_heads=4), r"head dims 64, 72 and 128, got 32"),
    ("qkv_attention", dict(eps=NAN), r"eps must be a finite number"),
    ("qkv_attention", dict(eps=-1.0), r"eps must be a finite number"),
    ("qkv_attention", dict(scale=NAN), r"scale must be finite"),
    # dp_schedule_solve
    (
        "dp_schedule_solve",
        dict(sim=nan_at(0, 1, 4)),
        r"sim\[0\] \(problem 0\) has a non-finite similarity nan at \[1, 4\].*nan_to_num",
    ),
    (
        "dp_schedule_solve",
        dict(sim=lambda s: torch.where(torch.arange(36).view(6, 6) == 9, -INF, s)),
        r"sim\[0\] \(problem 0\) has a non-finite similarity -inf at \[1, 3\]",
    ),
    (
        "dp_schedule_solve",
        dict(sim=lambda s: torch.cat([s[:1], s[1:].fill_(INF)]).float()),
        r"sim\[1\] \(problem 1\) has a non-finite similarity inf at \[0, 0\]",
    ),
    ("dp_schedule_solve", dict(k_max=0), r"k_max must be in 1..N = 1..6, got 0"),
    ("dp_schedule_solve", dict(k_max=7), r"k_max must be in 1..N = 1..6, got 7"),
    ("dp_schedule_solve", dict(k_max=-1), r"k_max must be in 1..N"),
    ("dp_schedule_solve", dict(sim=lambda s: s.long()), r"sim must be float32 or float64"),
    ("dp_schedule_solve", dict(sim=lambda s: s.half()), r"sim must be float32 or float64"),
    ("dp_schedule_solve", dict(sim=lambda s: s[0]), r"sim must be 3-D \[B, N, N\], got 2-D"),
    ("dp_schedule_solve", dict(sim=lambda s: s[:, :5]), r"sim must be square"),
    ("dp_schedule_solve", dict(sim=torch.ones(1, 0, 0)), r"sim needs at least one step \(N >= 1\)"),
]


def _case_id(case) -> str:
    op, changes, _ = case
    parts = []
    for name, change in changes.items():
        if change is None or isinstance(change, (int, float)):
            how = repr(change)
        elif getattr(change, "__name__", "<lambda>") not in ("<lambda>", "change"):
            how = change.__name__
        else:
            how = "bad"
        parts.append(f"{name}={how}")
    return f"{op}-{','.join(parts)}"


_IDS = [_case_id(c) for c in CASES]
_IDS = [f"{i}-{n}" if _IDS.count(i) > 1 else i for n, i in enumerate(_IDS)]


def test_every_raw_op_is_in_the_table():
    assert set(_extension.registered_ops()) == set(SIGNATURES)
    assert {op for op, _, _ in CASES} == set(SIGNATURES)


@pytest.mark.parametrize("op", sorted(SIGNATURES))
def test_valid_arguments_run(op):
    """The starting point of every case is a call that works."""
    call(op, {})


@pytest.mark.parametrize("op, changes, match", CASES, ids=_IDS)
def test_raw_op_refuses(op, changes, match):
    with pytest.raises(ERRORS, match=match):
        call(op, changes)


def _all_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


# Cases the fake implementations can judge too: on meta tensors (no values, so
# not the non-finite similarities; and not a device mix, which is no longer one).
_SHAPE_CASES = [
    (op, changes, match)
    for op, changes, match in CASES
    if op not in CUDA_ONLY and "non-finite" not in match and not any(c is meta or c is cpu for c in changes.values())
]


@pytest.mark.parametrize("op, changes, match", _SHAPE_CASES, ids=[_IDS[CASES.index(c)] for c in _SHAPE_CASES])
def test_fake_refuses_the_same(op, changes, match):
    """The same bad input on meta tensors dispatches to the fake (meta)
    implementation, which refuses it with the kernel's message."""
    args = {name: _all_meta(v) for name, v in valid_args(op).items()}
    for name, change in changes.items():
        args[name] = _all_meta(change(args[name]) if callable(change) else change)
    with pytest.raises(ERRORS, match=match):
        getattr(torch.ops.ddt_fast, op)(*(args[name] for name in SIGNATURES[op]))


@pytest.mark.parametrize("op", sorted(SIGNATURES))
def test_valid_arguments_on_meta_run(op):
    args = {name: _all_meta(v) for name, v in valid_args(op).items()}
    getattr(torch.ops.ddt_fast, op)(*(args[name] for name in SIGNATURES[op]))


@pytest.mark.parametrize("op", CUDA_ONLY)
def test_cuda_only_ops_refuse_cpu_tensors(op):
    """No CPU kernel: CPU tensors raise (NotImplementedError, a RuntimeError)."""
    args = {name: cpu(v) if isinstance(v, torch.Tensor) else v for name, v in valid_args(op).items()}
    with pytest.raises(ERRORS, match=op):
        getattr(torch.ops.ddt_fast, op)(*(args[name] for name in SIGNATURES[op]))


def _cuda(v):
    if not isinstance(v, torch.Tensor):
        return v
    return torch.randn(v.shape, dtype=v.dtype, device="cuda") if v.is_meta else v.cuda()


_DEVICE_MIX = [
    (op, name)
    for op in sorted(SIGNATURES)
    if op != "dp_schedule_solve"
    for name, v in valid_args(op).items()
    if isinstance(v, torch.Tensor) and name in SIGNATURES[op]
]


@pytest.mark.cuda
@pytest.mark.parametrize("op, name", _DEVICE_MIX, ids=[f"{op}-{name}" for op, name in _DEVICE_MIX])
def test_cuda_op_refuses_one_cpu_tensor(op, name):
    """On CUDA the kernel itself is dispatched: one CPU tensor among CUDA
    ones (gradients and lse included) must raise, not reach the kernel."""
    args = {n: _cuda(v) for n, v in valid_args(op).items()}
    args[name] = args[name].cpu()
    with pytest.raises(ERRORS, match=rf"(?s)(?=.*\b{name}\b)(?=.*\bcpu\b)"):
        getattr(torch.ops.ddt_fast, op)(*(args[n] for n in SIGNATURES[op]))


def test_fake_tensor_mode_refuses_bad_shapes():
    """Under FakeTensorMode (what torch.compile traces with) too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(B, L, C)
        with pytest.raises(ERRORS, match=r"weight must be \[C\] = \[8\], got \[9\]"):
            torch.ops.ddt_fast.rms_norm_modulate(x, torch.empty(C + 1), x[:, :1], x[:, :1], 1e-6)
        with pytest.raises(ERRORS, match=r"eps must be a finite number"):
            torch.ops.ddt_fast.layer_norm_modulate(x, x[:, :1], x[:, :1], -1.0)
        with pytest.raises(ERRORS, match=r"num_heads must be > 0"):
            torch.ops.ddt_fast.qk_norm_rope(
                torch.empty(B, L, 48), torch.empty(8), torch.empty(8), 0, torch.empty(L, 4, 2), 1e-6
            )


# The Python op layer ----------------------------------------------------------


def _op_args():
    r = torch.randn
    x, y, w = r(B, L, C), r(B, L, C), r(C)
    sh, sc, g = r(B, 1, C), r(B, 1, C), r(B, 1, C)
    qkv, qw, kw = r(B, L, 3 * H * D), r(D), r(D)
    freqs = ops.rope_frequencies(2, 2, D, torch.device("cpu"))
    q = r(B, H, L, D)
    return {
        "rms_norm_modulate": dict(x=x, weight=w, shift=sh, scale=sc),
        "layer_norm_modulate": dict(x=x, shift=sh, scale=sc),
        "gated_residual": dict(x=x, gate=g, y=y),
        "gated_residual_rms_norm_modulate": dict(x=x, gate=g, y=y, weight=w, shift=sh, scale=sc),
        "swiglu": dict(a=r(3, 5), b=r(3, 5)),
        "qk_norm_rope": dict(qkv=qkv, q_weight=qw, k_weight=kw, num_heads=H, freqs_cis=freqs),
        "attention": dict(q=q, k=q.clone(), v=q.clone()),
        "qkv_attention": dict(qkv=qkv, q_weight=qw, k_weight=kw, num_heads=H, freqs_cis=freqs),
    }


def _call_op(op, changes):
    args = _op_args()[op]
    for name, change in changes.items():
        args[name] = change(args[name]) if callable(change) else change
    return getattr(ops, op)(**args)


def _int(t):
    return t.int()


def _long(t):
    return t.long()


def _bool(t):
    return t > 0


def _complex(t):
    return t.to(torch.complex64)


# (function, changes, pattern): the message names the function and the argument
OPS_CASES = [
    ("rms_norm_modulate", dict(x=_int), r"ops.rms_norm_modulate: x has dtype torch.int32; supported: floating"),
    ("rms_norm_modulate", dict(weight=_int), r"rms_norm_modulate: weight has dtype torch.int32"),
    ("rms_norm_modulate", dict(shift=_long, scale=_long), r"rms_norm_modulate: shift has dtype torch.int64"),
    ("rms_norm_modulate", dict(x=_complex), r"rms_norm_modulate: x has dtype torch.complex64"),
    ("rms_norm_modulate", dict(eps=NAN), r"rms_norm_modulate: eps must be a finite number"),
    ("rms_norm_modulate", dict(eps=-1.0), r"rms_norm_modulate: eps must be a finite number"),
    ("layer_norm_modulate", dict(x=_long), r"layer_norm_modulate: x has dtype torch.int64"),
    ("layer_norm_modulate", dict(scale=_bool), r"layer_norm_modulate: scale has dtype torch.bool"),
    ("layer_norm_modulate", dict(eps=INF), r"layer_norm_modulate: eps must be a finite number"),
    ("gated_residual", dict(x=_int, gate=_int, y=_int), r"gated_residual: x has dtype torch.int32"),
    ("gated_residual", dict(y=_int), r"gated_residual: y has dtype torch.int32"),
    ("gated_residual_rms_norm_modulate", dict(gate=_int), r"gated_residual_rms_norm_modulate: gate has dtype"),
    (
        "gated_residual_rms_norm_modulate",
        dict(weight=None),
        r"gated_residual_rms_norm_modulate: weight must be a torch.Tensor, got NoneType",
    ),
    ("swiglu", dict(a=_int, b=_int), r"swiglu: a has dtype torch.int32"),
    ("swiglu", dict(a=_bool, b=_bool), r"swiglu: a has dtype torch.bool"),
    ("swiglu", dict(b=_long), r"swiglu: b has dtype torch.int64"),
    ("qk_norm_rope", dict(qkv=_int), r"qk_norm_rope: qkv has dtype torch.int32"),
    ("qk_norm_rope", dict(k_weight=_int), r"qk_norm_rope: k_weight has dtype torch.int32"),
    ("qk_norm_rope", dict(freqs_cis=torch.view_as_real), r"qk_norm_rope: freqs_cis must be a complex tensor"),
    ("qk_norm_rope", dict(num_heads=0), r"qk_norm_rope: num_heads must be > 0, got 0"),
    ("qk_norm_rope", dict(num_heads=5), r"qk_norm_rope: qkv's last dim 48 is not 3 \* num_heads \(5\)"),
    ("qk_norm_rope", dict(eps=NAN), r"qk_norm_rope: eps must be a finite number"),
    ("attention", dict(q=_int, k=_int, v=_int), r"attention: q has dtype torch.int32"),
    ("attention", dict(v=_bool), r"attention: v has dtype torch.bool"),
    ("qkv_attention", dict(qkv=_int), r"qkv_attention: qkv has dtype torch.int32"),
    ("qkv_attention", dict(num_heads=-1), r"qkv_attention: num_heads must be > 0"),
]


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
@pytest.mark.parametrize(
    "op, changes, match",
    OPS_CASES,
    ids=[f"{op}-{','.join(changes)}-{n}" for n, (op, changes, _) in enumerate(OPS_CASES)],
)
def test_ops_refuse_what_neither_path_computes(op, changes, match, backend):
    """Integer, bool or complex tensors are not sent to the reference (which
    would compute something in another dtype); nor are a bad eps or
    num_heads."""
    with ops.use_backend(backend), pytest.raises(ERRORS, match=match):
        _call_op(op, changes)


@pytest.mark.parametrize("op", sorted(_op_args()))
def test_ops_valid_arguments_run(op):
    for backend in ("auto", "reference"):
        with ops.use_backend(backend):
            out = _call_op(op, {})
        for t in out if isinstance(out, tuple) else (out,):
            assert t.is_floating_point() and bool(torch.isfinite(t).all())


def test_ops_float_promotion_still_takes_the_reference():
    """Floating dtypes the kernels do not take together (float64 x with a
    float32 weight) still run, on the reference path, as before."""
    a = _op_args()["rms_norm_modulate"]
    x64 = a["x"].double()
    out = ops.rms_norm_modulate(x64, a["weight"], a["shift"], a["scale"])
    assert out.dtype == torch.float64
    assert math.isfinite(float(out.sum()))
