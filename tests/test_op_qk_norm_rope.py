"""q/k RMSNorm + 2D rotary + head split against the reference, on the CPU
and CUDA (`device`: tests/conftest.py)."""

import itertools

import pytest
import torch
from helpers import CPU, CUDA, loss_grads, on

from tolerances import close, close_relative

from ddt_fast import _extension
from ddt_fast.ops import reference

KERNEL = "qk_norm_rope"  # the `device` fixture skips devices without it
ops = torch.ops.ddt_fast if _extension.available() else None


def rope_table(hp, wp, D):
    return reference.rope_frequencies(hp, wp, D)


GRID = list(
    itertools.product(
        [torch.float32, torch.bfloat16, torch.float16],
        [1, 3],
        [(1, 1), (1, 7), (16, 16)],
        [(1, 8), (2, 36), (12, 64), (16, 72)],
    )
)


@pytest.mark.parametrize(
    "dtype,B,grid,heads_dim", GRID, ids=[f"{str(d)[6:]}-B{b}-L{g[0] * g[1]}-H{h[0]}xD{h[1]}" for d, b, g, h in GRID]
)
@on(CPU)
def test_qk_norm_rope_forward_grid(device, dtype, B, grid, heads_dim):
    H, D = heads_dim
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype) * 2
    qw, kw = (1 + 0.2 * torch.randn(D)).to(dtype), (1 + 0.2 * torch.randn(D)).to(dtype)
    freqs = rope_table(*grid, D)
    q, k, v = ops.qk_norm_rope(qkv, qw, kw, H, torch.view_as_real(freqs), 1e-6)
    q_ref, k_ref, v_ref = reference.qk_norm_rope(qkv, qw, kw, H, freqs, 1e-6)
    assert q.shape == (B, H, L, D) and q.is_contiguous()
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)
    assert torch.equal(v, v_ref)


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_fp32_weights(device, dtype):
    qkv = torch.randn(2, 12, 3 * 2 * 72, dtype=dtype)
    qw, kw = 1 + 0.2 * torch.randn(72), 1 + 0.2 * torch.randn(72)
    freqs = rope_table(3, 4, 72)
    q, k, _ = ops.qk_norm_rope(qkv, qw, kw, 2, torch.view_as_real(freqs), 1e-6)
    q_ref, k_ref, _ = reference.qk_norm_rope(qkv, qw, kw, 2, freqs, 1e-6)
    assert q.dtype == dtype  # the reference promotes to float32; attention casts it back
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)
    rope = torch.view_as_real(freqs)
    _, grads = loss_grads(lambda x, a, b: ops.qk_norm_rope(x, a, b, 2, rope, 1e-6), (qkv, qw, kw))
    _, grads_ref = loss_grads(lambda x, a, b: reference.qk_norm_rope(x, a, b, 2, freqs, 1e-6), (qkv, qw, kw))
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype
        close_relative(a, b, dtype, 4.0)


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_16bit_rounding_points(device, dtype):
    """The normalised q/k rounded to the input dtype before the weight, the
    weight and rotation in float32, one rounding at the store (emulated in
    float32; see test_op_norm_modulate.test_16bit_rounding_points)."""
    B, H, D, grid = 2, 4, 72, (8, 8)
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype) * 2
    qw, kw = (1 + 0.2 * torch.randn(D)).to(dtype), (1 + 0.2 * torch.randn(D)).to(dtype)
    freqs = rope_table(*grid, D)
    q, k, _ = ops.qk_norm_rope(qkv, qw, kw, H, torch.view_as_real(freqs), 1e-6)
    for part, got, w in [(0, q, qw), (1, k, kw)]:
        xf = qkv.view(B, L, 3, H, D)[:, :, part].transpose(1, 2).float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).float() * w.float()
        c = n.view(B, H, L, D // 2, 2)
        cos, sin = freqs.real.view(1, 1, L, D // 2), freqs.imag.view(1, 1, L, D // 2)
        expect = torch.stack([c[..., 0] * cos - c[..., 1] * sin, c[..., 0] * sin + c[..., 1] * cos], -1)
        expect = expect.view(B, H, L, D).to(dtype)
        assert (got == expect).float().mean().item() > 0.995
        close(got, expect, dtype)


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qk_norm_rope_nan_and_inf_propagate_like_the_reference(device, dtype):
    """NaN and inf in q and k, and a float32 weight holding a NaN with low
    mantissa bits set (0x7fffffff, which bfloat16 rounding without a NaN test
    would turn into -0): NaN and inf exactly where the reference has them."""
    B, H, D, grid = 2, 3, 72, (2, 3)
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype)
    qkv[0, 1, 5] = float("nan")  # q, head 0
    qkv[1, 4, H * D + D + 7] = float("inf")  # k, head 1
    qw = 1 + 0.2 * torch.randn(D)
    qw.view(torch.int32)[9] = 0x7FFFFFFF
    kw = 1 + 0.2 * torch.randn(D)
    freqs = rope_table(*grid, D)
    for weights in ((qw, kw), (qw.to(dtype), kw.to(dtype))):
        outs = ops.qk_norm_rope(qkv, *weights, H, torch.view_as_real(freqs), 1e-6)
        refs = reference.qk_norm_rope(qkv, *weights, H, freqs, 1e-6)
        for a, b in zip(outs, refs):
            a, b = a.float(), b.float()
            assert torch.equal(a.isnan(), b.isnan())
            assert torch.equal(a.isinf(), b.isinf())
            finite = a.isfinite()
            close(a[finite], b[finite], dtype)
        assert outs[0][..., 8:10].isnan().all()  # the NaN weight's rotary pair, every token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,grid,H,D", [(1, (1, 1), 1, 8), (2, (3, 5), 4, 72), (2, (16, 16), 2, 64), (1, (2, 3), 3, 36)]
)
@on(CPU)
def test_qk_norm_rope_backward_matches_reference(device, dtype, B, grid, H, D):
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype)
    qw, kw = (1 + 0.2 * torch.randn(D)).to(dtype), (1 + 0.2 * torch.randn(D)).to(dtype)
    freqs = rope_table(*grid, D)
    fused = lambda x, a, b: ops.qk_norm_rope(x, a, b, H, torch.view_as_real(freqs), 1e-6)
    ref = lambda x, a, b: reference.qk_norm_rope(x, a, b, H, freqs, 1e-6)
    outs, grads = loss_grads(fused, (qkv, qw, kw))
    outs_ref, grads_ref = loss_grads(ref, (qkv, qw, kw))
    for a, b in zip(outs, outs_ref):
        close(a, b, dtype)
    for a, b in zip(grads, grads_ref):
        close_relative(a, b, dtype, 2.0 if dtype == torch.bfloat16 else 4.0)


@on(CPU)
@pytest.mark.slow
def test_qk_norm_rope_gradcheck_float64(device):
    B, L, H, D = 2, 6, 2, 8
    freqs = rope_table(2, 3, D)
    rope = torch.view_as_real(freqs).contiguous()
    qkv = torch.randn(B, L, 3 * H * D, dtype=torch.float64, requires_grad=True)
    qw = (1 + 0.2 * torch.randn(D, dtype=torch.float64)).requires_grad_(True)
    kw = (1 + 0.2 * torch.randn(D, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: ops.qk_norm_rope(x, a, b, H, rope, 1e-6), (qkv, qw, kw), eps=1e-6, atol=1e-5
    )


def test_qk_norm_rope_opcheck(device):
    B, L, H, D = 2, 6, 2, 8
    rope = torch.view_as_real(reference.rope_frequencies(2, 3, D, device)).contiguous()
    qkv = torch.randn(B, L, 3 * H * D, device=device, requires_grad=True)
    qw = torch.randn(D, device=device, requires_grad=True)
    kw = torch.randn(D, device=device, requires_grad=True)
    torch.library.opcheck(ops.qk_norm_rope, (qkv, qw, kw, H, rope, 1e-6))


@on(CPU)
def test_qk_norm_rope_errors(device):
    B, L, H, D = 2, 6, 2, 8
    rope = torch.view_as_real(rope_table(2, 3, D)).contiguous()
    qkv = torch.randn(B, L, 3 * H * D)
    qw, kw = torch.randn(D), torch.randn(D)
    with pytest.raises(RuntimeError, match="not 3 \\* num_heads"):
        ops.qk_norm_rope(torch.randn(B, L, 50), qw, kw, H, rope, 1e-6)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        ops.qk_norm_rope(torch.randn(B, L, 3 * H * 6), torch.randn(6), torch.randn(6), H, rope, 1e-6)
    with pytest.raises(RuntimeError, match=r"rope must be float32 \[L, D/2, 2\]"):
        ops.qk_norm_rope(qkv, qw, kw, H, rope[:5], 1e-6)
    with pytest.raises(RuntimeError, match=r"weights must be \[head_dim\]"):
        ops.qk_norm_rope(qkv, torch.randn(D + 1), kw, H, rope, 1e-6)


@on(CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,grid,H,D", [(1, (1, 1), 1, 8), (3, (1, 7), 2, 36), (2, (16, 16), 12, 64), (2, (16, 16), 16, 72)]
)
def test_qk_norm_rope_matches_reference_and_cpu_kernels(device, dtype, B, grid, H, D):
    """Forward against the reference on the GPU; backward against the CPU kernels."""
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype, device=device)
    qw = (1 + 0.2 * torch.randn(D, device=device)).to(dtype)
    kw = (1 + 0.2 * torch.randn(D, device=device)).to(dtype)
    freqs = reference.rope_frequencies(*grid, D, device)
    q, k, v = ops.qk_norm_rope(qkv, qw, kw, H, torch.view_as_real(freqs), 1e-6)
    qr, kr, vr = reference.qk_norm_rope(qkv, qw, kw, H, freqs, 1e-6)
    close(q, qr, dtype)
    close(k, kr, dtype)
    assert torch.equal(v, vr)
    gq, gk, gv = (torch.randn_like(q) for _ in range(3))
    rope = torch.view_as_real(freqs).contiguous()
    got = ops.qk_norm_rope_backward(gq, gk, gv, qkv, qw, kw, H, rope, 1e-6)
    cpu = ops.qk_norm_rope_backward(gq.cpu(), gk.cpu(), gv.cpu(), qkv.cpu(), qw.cpu(), kw.cpu(), H, rope.cpu(), 1e-6)
    for a, b in zip(got, cpu):
        mag = max(b.float().abs().max().item(), 1.0)
        close(a.cpu() / mag, b / mag, dtype, 2.0)
