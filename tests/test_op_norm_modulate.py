"""The fused norm + modulate family (RMSNorm / LayerNorm + modulate, gated
residual, gated residual + RMSNorm + modulate) against the pure-PyTorch
reference, on the CPU and CUDA (`device`: tests/conftest.py)."""

import itertools

import pytest
import torch
from helpers import CPU, CUDA, loss_grads, offset_view, on

from tolerances import close, close_relative

from ddt_fast import _extension
from ddt_fast.ops import reference

KERNEL = "rms_norm_modulate"  # the `device` fixture skips devices without it
ops = torch.ops.ddt_fast if _extension.available() else None


def mods(B, L, C, dtype, per_token, k=6, device="cpu"):
    """shift/scale/gate as chunk views of one [B, L|1, k*C] tensor (strided, no copies)."""
    t = torch.randn(B, L if per_token else 1, k * C, dtype=dtype, device=device) * 0.5
    return t.chunk(k, dim=-1)


GRID = list(
    itertools.product(
        [torch.float32, torch.bfloat16, torch.float16], [1, 3], [1, 7, 256], [8, 72, 768, 1152], [False, True]
    )
)


def _id(p):
    dtype, B, L, C, per_token = p
    return f"{str(dtype)[6:]}-B{B}-L{L}-C{C}-{'tok' if per_token else 'smp'}"


def _grid(values, ids, fast):
    """`values` as test parameters, the ones `fast` rejects marked slow: `make test`
    runs the whole grid, `make test-fast` the representative part."""
    return [pytest.param(*v, id=i, marks=() if fast(*v) else pytest.mark.slow) for v, i in zip(values, ids)]


# Per dtype: the one-row edge, a small per-token case, and the model's widths
# 768 and 1152 over many rows, in both modulation layouts.
FAST_FORWARD = {(1, 1, 8, False), (3, 7, 72, True), (1, 256, 768, True), (3, 7, 1152, False)}


@pytest.mark.parametrize(
    "dtype,B,L,C,per_token", _grid(GRID, [_id(p) for p in GRID], lambda dtype, *shape: shape in FAST_FORWARD)
)
def test_forward_grid(device, dtype, B, L, C, per_token):
    x = torch.randn(B, L, C, dtype=dtype, device=device) * 2
    y = torch.randn(B, L, C, dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
    shift, scale, gate, *_ = mods(B, L, C, dtype, per_token, device=device)
    close(
        ops.rms_norm_modulate(x, weight, shift, scale, 1e-6),
        reference.rms_norm_modulate(x, weight, shift, scale, 1e-6),
        dtype,
    )
    close(ops.layer_norm_modulate(x, shift, scale, 1e-6), reference.layer_norm_modulate(x, shift, scale, 1e-6), dtype)
    close(ops.gated_residual(x, gate, y), reference.gated_residual(x, gate, y), dtype)
    xo, out = ops.gated_residual_rms_norm_modulate(x, gate, y, weight, shift, scale, 1e-6)
    xo_ref, out_ref = reference.gated_residual_rms_norm_modulate(x, gate, y, weight, shift, scale, 1e-6)
    close(xo, xo_ref, dtype)
    close(out, out_ref, dtype, scale=2.0)
    if device != CPU:  # the GPU kernels agree with the CPU kernels on the same inputs
        close(
            ops.rms_norm_modulate(x, weight, shift, scale, 1e-6).cpu(),
            ops.rms_norm_modulate(x.cpu(), weight.cpu(), shift.cpu(), scale.cpu(), 1e-6),
            dtype,
        )


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [False, True])
def test_autocast_dtypes_fp32_weight(device, dtype, per_token):
    """Under autocast x/mods are 16-bit and the norm weight is a float32 parameter."""
    B, L, C = 2, 9, 72
    x = torch.randn(B, L, C, dtype=dtype)
    weight = 1 + 0.1 * torch.randn(C)
    shift, scale, gate, *_ = mods(B, L, C, dtype, per_token)
    out = ops.rms_norm_modulate(x, weight, shift, scale, 1e-6)
    assert out.dtype == dtype  # stored in x's dtype; the reference promotes to float32
    close(out, reference.rms_norm_modulate(x, weight, shift, scale, 1e-6), dtype)
    s32, c32 = shift.float(), scale.float()
    close(
        ops.rms_norm_modulate(x, weight, s32, c32, 1e-6), reference.rms_norm_modulate(x, weight, s32, c32, 1e-6), dtype
    )
    # backward, float32 weight with 16-bit modulation (autocast) and with
    # float32 modulation
    y, g32 = torch.randn(B, L, C, dtype=dtype), gate.float()
    rms = (lambda *a: ops.rms_norm_modulate(*a, 1e-6), lambda *a: reference.rms_norm_modulate(*a, 1e-6))
    grn = (
        lambda *a: ops.gated_residual_rms_norm_modulate(*a, 1e-6),
        lambda *a: reference.gated_residual_rms_norm_modulate(*a, 1e-6),
    )
    for (fused, ref), inputs in [
        (rms, (x, weight, shift, scale)),
        (grn, (x, gate, y, weight, shift, scale)),
        (rms, (x, weight, s32, c32)),
        (grn, (x, g32, y, weight, s32, c32)),
    ]:
        _, grads = loss_grads(fused, inputs)
        _, grads_ref = loss_grads(ref, inputs)
        for a, b in zip(grads, grads_ref):
            assert a.dtype == b.dtype
            close_relative(a, b, dtype, 2.0)


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_rounding_points(device, dtype):
    """The spec's rounding points, element for element: x' stored in x's dtype
    before its statistics, the normalised value rounded to it before the weight,
    everything after in float32 and rounded once. Emulated in float32 here; only
    the order of the row sums differs, so almost every element must be equal
    (skipping a rounding point leaves about 73% equal)."""
    B, L, C = 2, 64, 1152
    x, y = torch.randn(B, L, C, dtype=dtype) * 2, torch.randn(B, L, C, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C)).to(dtype)
    sh, sc, gate = (torch.randn(B, L, 3 * C, dtype=dtype) * 0.5).chunk(3, -1)

    def emulate(xs):
        xf = xs.float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float()
        return (n * w.float() * (1 + sc.float()) + sh.float()).to(dtype)

    x_res = (x.float() + gate.float() * y.float()).to(dtype)
    xo, out_res = ops.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6)
    assert torch.equal(xo, x_res)
    for out, expect in [(ops.rms_norm_modulate(x, w, sh, sc, 1e-6), emulate(x)), (out_res, emulate(x_res))]:
        assert (out == expect).float().mean().item() > 0.995
        close(out, expect, dtype)


@on(CPU)
@pytest.mark.parametrize("C", [73, 1155, 1152])
def test_bfloat16_odd_widths_and_misaligned_rows(device, C):
    """bfloat16 rows of odd and even widths against the reference, with every
    modulation row starting at an odd element (views of a [B, L, 6C + 1]
    tensor past its first column), so no row is 4-byte aligned."""
    B, L, dtype = 2, 9, torch.bfloat16
    x, y = torch.randn(B, L, C, dtype=dtype) * 2, torch.randn(B, L, C, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C)).to(dtype)
    for per_token in (False, True):
        t = torch.randn(B, L if per_token else 1, 6 * C + 1, dtype=dtype) * 0.5
        sh, sc, gate, *_ = t[..., 1:].chunk(6, dim=-1)
        assert sh.storage_offset() % 2 == 1
        close(ops.rms_norm_modulate(x, w, sh, sc, 1e-6), reference.rms_norm_modulate(x, w, sh, sc, 1e-6), dtype)
        close(ops.layer_norm_modulate(x, sh, sc, 1e-6), reference.layer_norm_modulate(x, sh, sc, 1e-6), dtype)
        close(ops.gated_residual(x, gate, y), reference.gated_residual(x, gate, y), dtype)
        for a, b in zip(
            ops.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6),
            reference.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6),
        ):
            close(a, b, dtype, scale=2.0)


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [72, 73])
def test_nan_and_inf_propagate_like_the_reference(device, dtype, C):
    """NaN and inf in x, y, gate and shift, and a float32 weight holding a NaN
    whose low mantissa bits are set (0x7fffffff): every output is NaN (or inf)
    exactly where the reference's is. Rounding that NaN to bfloat16 without a
    NaN test would carry into the sign and give -0."""
    B, L = 2, 6
    x, y = torch.randn(B, L, C, dtype=dtype), torch.randn(B, L, C, dtype=dtype)
    sh, sc, gate = (t.contiguous() for t in mods(B, L, C, dtype, True, k=3))
    x[0, 1, 3] = float("nan")
    x[1, 2, 5] = float("inf")
    y[0, 3, 7] = float("nan")
    gate[1, 4, 2] = float("inf")
    sh[0, 5, 11] = float("nan")
    sh[1, 0, 9] = float("-inf")
    w = 1 + 0.1 * torch.randn(C)
    w.view(torch.int32)[13] = 0x7FFFFFFF
    for weight in (w, w.to(dtype)):
        outs = [
            ops.rms_norm_modulate(x, weight, sh, sc, 1e-6),
            ops.layer_norm_modulate(x, sh, sc, 1e-6),
            ops.gated_residual(x, gate, y),
            *ops.gated_residual_rms_norm_modulate(x, gate, y, weight, sh, sc, 1e-6),
        ]
        refs = [
            reference.rms_norm_modulate(x, weight, sh, sc, 1e-6),
            reference.layer_norm_modulate(x, sh, sc, 1e-6),
            reference.gated_residual(x, gate, y),
            *reference.gated_residual_rms_norm_modulate(x, gate, y, weight, sh, sc, 1e-6),
        ]
        for i, (a, b) in enumerate(zip(outs, refs)):
            a, b = a.float(), b.float()
            assert torch.equal(a.isnan(), b.isnan()), (i, a.isnan().sum().item(), b.isnan().sum().item())
            assert torch.equal(a.isinf(), b.isinf()), i
            assert torch.equal(a[a.isinf()], b[b.isinf()]), i
            finite = a.isfinite()
            close(a[finite], b[finite], dtype, scale=2.0)
        assert outs[0][..., 13].isnan().all() and outs[4][..., 13].isnan().all()


CASES = {
    "rms": (
        lambda x, y, w, sh, sc, g: (x, w, sh, sc),
        lambda x, w, sh, sc: ops.rms_norm_modulate(x, w, sh, sc, 1e-6),
        lambda x, w, sh, sc: reference.rms_norm_modulate(x, w, sh, sc, 1e-6),
    ),
    "layer": (
        lambda x, y, w, sh, sc, g: (x, sh, sc),
        lambda x, sh, sc: ops.layer_norm_modulate(x, sh, sc, 1e-6),
        lambda x, sh, sc: reference.layer_norm_modulate(x, sh, sc, 1e-6),
    ),
    "residual": (
        lambda x, y, w, sh, sc, g: (x, g, y),
        lambda x, g, y: ops.gated_residual(x, g, y),
        lambda x, g, y: reference.gated_residual(x, g, y),
    ),
    "residual_rms": (
        lambda x, y, w, sh, sc, g: (x, g, y, w, sh, sc),
        lambda x, g, y, w, sh, sc: ops.gated_residual_rms_norm_modulate(x, g, y, w, sh, sc, 1e-6),
        lambda x, g, y, w, sh, sc: reference.gated_residual_rms_norm_modulate(x, g, y, w, sh, sc, 1e-6),
    ),
}


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKWARD_GRID = [
    (case, dtype, per_token, B, L, C)
    for B, L, C in [(1, 1, 8), (3, 7, 72), (2, 256, 768), (3, 37, 1155)]
    for per_token in (False, True)
    for dtype in DTYPES
    for case in CASES
]


def _fast_backward(case, dtype, per_token, B, L, C):
    """The small shapes, and the odd width over many rows (per-token layout)."""
    return C <= 72 or (C == 1155 and per_token)


@on(CPU)
@pytest.mark.parametrize(
    "case,dtype,per_token,B,L,C",
    _grid(
        BACKWARD_GRID,
        [f"{B}-{L}-{C}-{t}-dtype{DTYPES.index(d)}-{c}" for c, d, t, B, L, C in BACKWARD_GRID],
        _fast_backward,
    ),
)
def test_backward_matches_reference(device, case, dtype, per_token, B, L, C):
    pick, fused, ref = CASES[case]
    x = torch.randn(B, L, C, dtype=dtype)
    y = torch.randn(B, L, C, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C)).to(dtype)
    sh, sc, g = (t.contiguous() for t in mods(B, L, C, dtype, per_token, k=3))
    inputs = pick(x, y, w, sh, sc, g)
    outs, grads = loss_grads(fused, inputs)
    outs_ref, grads_ref = loss_grads(ref, inputs)
    # 16-bit gradients summed over many rows (weight, per-sample modulation) carry
    # the rounding of each addend: compare them relative to their size.
    scale = 1.0 if dtype == torch.float32 else 2.0
    for a, b in zip(outs, outs_ref):
        close(a, b, dtype, scale)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        assert a is not None and a.shape == b.shape and a.dtype == b.dtype, i
        close_relative(a, b, dtype, scale * (4.0 if dtype == torch.float32 and L * B > 100 else 1.0))


@on(CPU)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_token", [False, True])
def test_gradcheck_float64(device, case, per_token):
    pick, fused, _ = CASES[case]
    B, L, C = 2, 3, 8
    x = torch.randn(B, L, C, dtype=torch.float64)
    y = torch.randn(B, L, C, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(C, dtype=torch.float64)
    sh, sc, g = (t.contiguous() for t in mods(B, L, C, torch.float64, per_token, k=3))
    inputs = tuple(t.requires_grad_(True) for t in pick(x, y, w, sh, sc, g))
    assert torch.autograd.gradcheck(fused, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
def test_opcheck(device, per_token):
    B, L, C = 2, 5, 16
    x, y = torch.randn(B, L, C, device=device), torch.randn(B, L, C, device=device)
    w = torch.randn(C, device=device)
    sh, sc, g = mods(B, L, C, torch.float32, per_token, k=3, device=device)
    sh, sc, g = (t.contiguous().requires_grad_(True) for t in (sh, sc, g))
    x.requires_grad_(True), y.requires_grad_(True), w.requires_grad_(True)
    for op, args in [
        (ops.rms_norm_modulate, (x, w, sh, sc, 1e-6)),
        (ops.layer_norm_modulate, (x, sh, sc, 1e-6)),
        (ops.gated_residual, (x, g, y)),
        (ops.gated_residual_rms_norm_modulate, (x, g, y, w, sh, sc, 1e-6)),
    ]:
        torch.library.opcheck(op, args)


@on(CPU)
def test_noncontiguous_x_is_handled_and_bad_mods_rejected(device):
    B, L, C = 2, 4, 8
    x = torch.randn(B, C, L).transpose(1, 2)  # non-contiguous
    w = torch.randn(C)
    sh, sc = torch.randn(B, 1, C), torch.randn(B, 1, C)
    close(ops.rms_norm_modulate(x, w, sh, sc, 1e-6), reference.rms_norm_modulate(x, w, sh, sc, 1e-6), torch.float32)
    with pytest.raises(RuntimeError, match=r"shift must be \[B, 1, C\].*\[2, 1\|4, 8\]"):
        ops.rms_norm_modulate(x, w, torch.randn(B, 3, C), sc, 1e-6)
    with pytest.raises(RuntimeError, match="contiguous in its last dim"):
        ops.rms_norm_modulate(x, w, torch.randn(B, 1, 2 * C)[..., ::2], sc, 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be \[C\]"):
        ops.rms_norm_modulate(x, torch.randn(C + 1), sh, sc, 1e-6)
    with pytest.raises(RuntimeError, match="supported: float32, float64, float16, bfloat16"):
        ops.rms_norm_modulate(x.int(), w, sh, sc, 1e-6)
    with pytest.raises(RuntimeError, match="must be .* or float32"):
        ops.rms_norm_modulate(x.bfloat16(), w.half(), sh.bfloat16(), sc.bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="y must match x"):
        ops.gated_residual(x, sh, torch.randn(B, L, C + 1))


@on(CPU)
@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_thread_counts(device, threads, case, per_token, dtype):
    """Each CPU thread takes one contiguous range of rows and runs each row's
    last pass together with the next row's first: uneven ranges, ranges of
    one row and empty ranges (4 rows over 5 threads) must not change a
    forward (rows are independent) and must keep the backward right."""
    pick, fused, ref = CASES[case]
    B, L, C = 2, 2, 72
    x, y = torch.randn(B, L, C, dtype=dtype), torch.randn(B, L, C, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C)).to(dtype)
    sh, sc, g = (t.contiguous() for t in mods(B, L, C, dtype, per_token, k=3))
    inputs = pick(x, y, w, sh, sc, g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            single = fused(*inputs)
        torch.set_num_threads(threads)
        with torch.no_grad():
            many = fused(*inputs)
        outs, grads = loss_grads(fused, inputs)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(single if isinstance(single, tuple) else (single,), many if isinstance(many, tuple) else (many,)):
        assert torch.equal(a, b)
    outs_ref, grads_ref = loss_grads(ref, inputs)
    for a, b in zip(outs, outs_ref):
        close(a, b, dtype)
    for a, b in zip(grads, grads_ref):
        close(a, b, dtype, 4.0)


@on(CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("B,L,C", [(1, 1, 8), (3, 7, 72), (2, 256, 1152)])
def test_backward_matches_the_cpu_kernels(device, dtype, per_token, B, L, C):
    x, y = torch.randn(B, L, C, dtype=dtype), torch.randn(B, L, C, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C)).to(dtype)
    sh, sc, g = (torch.randn(B, L if per_token else 1, C, dtype=dtype) for _ in range(3))
    grad_out, grad_xo = torch.randn(B, L, C, dtype=dtype), torch.randn(B, L, C, dtype=dtype)
    for kind, residual in [(1, False), (2, False), (0, True), (1, True)]:
        args = lambda d: [
            t.to(d) if t is not None else None
            for t in (
                grad_out if kind else None,
                grad_xo if residual else None,
                x,
                g if residual else None,
                y if residual else None,
                w if kind == 1 else None,
                sh if kind else None,
                sc if kind else None,
            )
        ]
        cpu = ops.norm_modulate_backward(*args("cpu"), 1e-6, kind, residual)
        got = ops.norm_modulate_backward(*args(device), 1e-6, kind, residual)
        for a, b in zip(got, cpu):
            assert a.shape == b.shape
            if b.numel():
                mag = max(b.float().abs().max().item(), 1.0)
                close(a.cpu() / mag, b / mag, dtype, 2.0)


def _backward_args(dtype, device, B, L, C, per_token, kind, residual, with_grad_xo, offset=0):
    """norm_modulate_backward's arguments with shift/scale/gate as chunk views of
    one [B, L or 1, 6C] modulation tensor (the model's layout), on `device`."""
    g = torch.Generator().manual_seed(B * 1000 + L * 10 + C)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)
    x, y, grad_out, grad_xo = (rnd(B, L, C) for _ in range(4))
    w = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype)
    mod = rnd(B, L if per_token else 1, 6 * C) * 0.5
    x, y, grad_out, grad_xo, w, mod = (t.to(device) for t in (x, y, grad_out, grad_xo, w, mod))
    sh, sc, gate, *_ = mod.chunk(6, -1)
    x, y, grad_out = (offset_view(t, offset) for t in (x, y, grad_out))
    return (
        grad_out if kind else None,
        grad_xo if residual and with_grad_xo else None,
        x,
        gate if residual else None,
        y if residual else None,
        w if kind == 1 else None,
        sh if kind else None,
        sc if kind else None,
        1e-6,
        kind,
        residual,
    )


BACKWARD_CASES = [
    (kind, residual, with_grad_xo)
    for kind, residual in [(1, False), (2, False), (0, True), (1, True)]
    for with_grad_xo in ([True, False] if residual else [True])
]


@on(CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize(
    "B,L,C,offset", [(2, 33, 768, 0), (2, 70, 1152, 0), (2, 33, 1152, 1), (1, 5, 1280, 0), (2, 9, 2048, 0)]
)
def test_backward_packed_and_scalar_paths(device, dtype, per_token, B, L, C, offset):
    """The packed CUDA backward (aligned rows of up to 40 elements per lane:
    16-bit C <= 1280, float32 C <= 1024; column sums on chip) and the scalar
    one (misaligned rows, longer rows) agree with the CPU kernels, with the
    modulation as strided chunk views and with and without grad_x_out."""
    for case in BACKWARD_CASES:
        cpu = ops.norm_modulate_backward(*_backward_args(dtype, "cpu", B, L, C, per_token, *case))
        got = ops.norm_modulate_backward(*_backward_args(dtype, device, B, L, C, per_token, *case, offset=offset))
        for a, b in zip(got, cpu):
            assert a.shape == b.shape, case
            if b.numel():
                mag = max(b.float().abs().max().item(), 1.0)
                close(a.cpu() / mag, b / mag, dtype, 2.0)


@on(CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [12, 1152, 2056, 4096])
def test_forward_packed_and_scalar_paths(device, dtype, C):
    """The packed CUDA forward (aligned rows that fit in registers) and the
    scalar one (misaligned rows, C not a multiple of the pack, rows too long)
    both match the reference, per token and per sample, with and without the
    residual."""
    B, L = 2, 33
    x, y = torch.randn(B, L, C, dtype=dtype, device=device) * 2, torch.randn(B, L, C, dtype=dtype, device=device)
    w = (1 + 0.1 * torch.randn(C, device=device)).to(dtype)
    for per_token in (False, True):
        sh, sc, gate = (torch.randn(B, L if per_token else 1, 3 * C, dtype=dtype, device=device) * 0.5).chunk(3, -1)
        expected = (
            reference.rms_norm_modulate(x, w, sh, sc, 1e-6),
            reference.layer_norm_modulate(x, sh, sc, 1e-6),
            *reference.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6),
        )
        for offset in (0, 1):
            xs, ys = offset_view(x, offset), offset_view(y, offset)
            got = (
                ops.rms_norm_modulate(xs, w, sh, sc, 1e-6),
                ops.layer_norm_modulate(xs, sh, sc, 1e-6),
                *ops.gated_residual_rms_norm_modulate(xs, gate, ys, w, sh, sc, 1e-6),
            )
            for a, e in zip(got, expected):
                close(a, e, dtype, 2.0)


# The GPU benchmark switches inside the GPU-verified norm kernels (read once per
# process, so each variant runs in a process of its own); see
# docs/backends-and-kernels.md, "GPU-verified kernels".
_SWITCH_CASES = [(dtype, per_token) for dtype in (torch.float32, torch.bfloat16, torch.float16) for per_token in (0, 1)]
_SWITCH_SHAPES = ((2, 33, 1152), (3, 7, 72), (2, 16, 768), (1, 4, 4096))

_FORWARD_SCRIPT = """
import sys, torch
import test_op_norm_modulate as t
f, out = torch.ops.ddt_fast, {}
for dtype, per_token in t._SWITCH_CASES:
    for B, L, C in t._SWITCH_SHAPES:
        _, _, x, gate, y, w, sh, sc, eps, _, _ = t._backward_args(dtype, "cuda", B, L, C, per_token, 1, True, True)
        outs = [f.rms_norm_modulate(x, w, sh, sc, eps), f.layer_norm_modulate(x, sh, sc, eps),
                f.gated_residual(x, gate, y), *f.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, eps)]
        out[(str(dtype), per_token, B, L, C)] = [a.cpu() for a in outs]
torch.save(out, sys.argv[1])
"""

_BACKWARD_SCRIPT = """
import sys, torch
import test_op_norm_modulate as t
f, out = torch.ops.ddt_fast, {}
for dtype, per_token in t._SWITCH_CASES:
    for B, L, C in t._SWITCH_SHAPES:
        for case in t.BACKWARD_CASES:
            args = t._backward_args(dtype, "cuda", B, L, C, per_token, *case)
            out[(str(dtype), per_token, B, L, C, case)] = [a.cpu() for a in f.norm_modulate_backward(*args)]
torch.save(out, sys.argv[1])
"""


@on(CUDA)
@pytest.mark.slow
def test_forward_switch_variants_are_identical(device, tmp_path):
    """DDT_FAST_NORM_FORWARD=raw (default), raw_stream and widened compute the
    same values bit for bit."""
    from helpers import fresh_process_outputs

    runs = {
        v: fresh_process_outputs(_FORWARD_SCRIPT, tmp_path / f"{v}.pt", {"DDT_FAST_NORM_FORWARD": v})
        for v in ("raw", "raw_stream", "widened")
    }
    for v in ("raw_stream", "widened"):
        assert runs[v].keys() == runs["raw"].keys()
        for key in runs["raw"]:
            for i, (a, b) in enumerate(zip(runs["raw"][key], runs[v][key])):
                assert torch.equal(a, b), (v, key, i)


@on(CUDA)
@pytest.mark.slow
def test_backward_rows_switch_agrees(device, tmp_path):
    """DDT_FAST_NORM_BACKWARD=rows (the scalar row kernel plus a column pass
    everywhere) gives the packed backward's values up to summation order."""
    from helpers import fresh_process_outputs

    packed = fresh_process_outputs(_BACKWARD_SCRIPT, tmp_path / "packed.pt", {"DDT_FAST_NORM_BACKWARD": "packed"})
    rows = fresh_process_outputs(_BACKWARD_SCRIPT, tmp_path / "rows.pt", {"DDT_FAST_NORM_BACKWARD": "rows"})
    assert packed.keys() == rows.keys()
    for key in packed:
        for a, b in zip(packed[key], rows[key]):
            if b.numel():
                mag = max(b.float().abs().max().item(), 1.0)
                close(a / mag, b / mag, a.dtype, 2.0)
