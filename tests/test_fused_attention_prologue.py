"""q/k norm + rotary + head split, and SwiGLU, against the reference."""

import itertools

import pytest
import torch

from tolerances import close, close_relative

from ddt_fast import _extension
from ddt_fast.ops import reference

pytestmark = pytest.mark.skipif(
    not _extension.has_kernel("qk_norm_rope", "CPU"),
    reason="ddt_fast._C with the qk_norm_rope/swiglu kernels is not built",
)
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
def test_qk_norm_rope_forward_grid(dtype, B, grid, heads_dim):
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_fp32_weights(dtype):
    qkv = torch.randn(2, 12, 3 * 2 * 72, dtype=dtype)
    qw, kw = 1 + 0.2 * torch.randn(72), 1 + 0.2 * torch.randn(72)
    freqs = rope_table(3, 4, 72)
    q, k, _ = ops.qk_norm_rope(qkv, qw, kw, 2, torch.view_as_real(freqs), 1e-6)
    q_ref, k_ref, _ = reference.qk_norm_rope(qkv, qw, kw, 2, freqs, 1e-6)
    assert q.dtype == dtype  # the reference promotes to float32; attention casts it back
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)
    rope = torch.view_as_real(freqs)
    _, grads = _loss_grads(lambda x, a, b: ops.qk_norm_rope(x, a, b, 2, rope, 1e-6), (qkv, qw, kw))
    _, grads_ref = _loss_grads(lambda x, a, b: reference.qk_norm_rope(x, a, b, 2, freqs, 1e-6), (qkv, qw, kw))
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype
        close_relative(a, b, dtype, 4.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qk_norm_rope_16bit_rounding_points(dtype):
    """The normalised q/k rounded to the input dtype before the weight, the
    weight and rotation in float32, one rounding at the store (emulated in
    float32; see test_fused_norm.test_16bit_rounding_points)."""
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qk_norm_rope_nan_and_inf_propagate_like_the_reference(dtype):
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


def _loss_grads(fn, inputs, seed=1):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
    return [o.detach() for o in outs], [t.grad for t in inputs if t.is_floating_point()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,grid,H,D", [(1, (1, 1), 1, 8), (2, (3, 5), 4, 72), (2, (16, 16), 2, 64), (1, (2, 3), 3, 36)]
)
def test_qk_norm_rope_backward_matches_reference(dtype, B, grid, H, D):
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype)
    qw, kw = (1 + 0.2 * torch.randn(D)).to(dtype), (1 + 0.2 * torch.randn(D)).to(dtype)
    freqs = rope_table(*grid, D)
    fused = lambda x, a, b: ops.qk_norm_rope(x, a, b, H, torch.view_as_real(freqs), 1e-6)
    ref = lambda x, a, b: reference.qk_norm_rope(x, a, b, H, freqs, 1e-6)
    outs, grads = _loss_grads(fused, (qkv, qw, kw))
    outs_ref, grads_ref = _loss_grads(ref, (qkv, qw, kw))
    for a, b in zip(outs, outs_ref):
        close(a, b, dtype)
    for a, b in zip(grads, grads_ref):
        close_relative(a, b, dtype, 2.0 if dtype == torch.bfloat16 else 4.0)


@pytest.mark.slow
def test_qk_norm_rope_gradcheck_float64():
    B, L, H, D = 2, 6, 2, 8
    freqs = rope_table(2, 3, D)
    rope = torch.view_as_real(freqs).contiguous()
    qkv = torch.randn(B, L, 3 * H * D, dtype=torch.float64, requires_grad=True)
    qw = (1 + 0.2 * torch.randn(D, dtype=torch.float64)).requires_grad_(True)
    kw = (1 + 0.2 * torch.randn(D, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, a, b: ops.qk_norm_rope(x, a, b, H, rope, 1e-6), (qkv, qw, kw), eps=1e-6, atol=1e-5
    )


def test_qk_norm_rope_opcheck_and_errors():
    B, L, H, D = 2, 6, 2, 8
    rope = torch.view_as_real(rope_table(2, 3, D)).contiguous()
    qkv = torch.randn(B, L, 3 * H * D, requires_grad=True)
    qw, kw = torch.randn(D, requires_grad=True), torch.randn(D, requires_grad=True)
    torch.library.opcheck(ops.qk_norm_rope, (qkv, qw, kw, H, rope, 1e-6))
    with pytest.raises(RuntimeError, match="not 3 \\* num_heads"):
        ops.qk_norm_rope(torch.randn(B, L, 50), qw, kw, H, rope, 1e-6)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        ops.qk_norm_rope(torch.randn(B, L, 3 * H * 6), torch.randn(6), torch.randn(6), H, rope, 1e-6)
    with pytest.raises(RuntimeError, match=r"rope must be float32 \[L, D/2, 2\]"):
        ops.qk_norm_rope(qkv, qw, kw, H, rope[:5], 1e-6)
    with pytest.raises(RuntimeError, match=r"weights must be \[head_dim\]"):
        ops.qk_norm_rope(qkv, torch.randn(D + 1), kw, H, rope, 1e-6)


SWIGLU_GRID = list(
    itertools.product(
        [torch.float32, torch.bfloat16, torch.float16], [(1, 1, 8), (3, 7, 72), (2, 3, 301), (2, 256, 3072)]
    )
)


@pytest.mark.parametrize("dtype,shape", SWIGLU_GRID, ids=[f"{str(d)[6:]}-{s}" for d, s in SWIGLU_GRID])
def test_swiglu_forward_backward(dtype, shape):
    a, b = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)
    close(ops.swiglu(a, b), reference.swiglu(a, b), dtype)
    outs, grads = _loss_grads(lambda x, y: ops.swiglu(x, y), (a, b))
    outs_ref, grads_ref = _loss_grads(reference.swiglu, (a, b))
    for x, y in zip(grads, grads_ref):
        close(x, y, dtype, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width,start", [(299, 0), (300, 0), (300, 1)])
def test_swiglu_packed_halves_are_views_not_copies(dtype, width, start):
    """a and b as the two halves of one packed GEMM output; odd widths, and
    halves starting at an odd element (rows not 4-byte aligned)."""
    h = torch.randn(2, 5, 2 * width + start, dtype=dtype) * 3
    a, b = h[..., start : start + width], h[..., start + width :]
    assert not a.is_contiguous()
    close(ops.swiglu(a, b), reference.swiglu(a, b), dtype)
    _, grads = _loss_grads(lambda x, y: ops.swiglu(x, y), (a, b))
    _, grads_ref = _loss_grads(reference.swiglu, (a, b))
    for x, y in zip(grads, grads_ref):
        close(x, y, dtype, 2.0)
    t = torch.randn(4, 3, 10).transpose(0, 1)  # leading dims that do not collapse: copied
    close(ops.swiglu(t, t), reference.swiglu(t, t), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [64, 65])
def test_swiglu_nan_and_inf_propagate_like_the_reference(dtype, H):
    a, b = torch.randn(3, H, dtype=dtype) * 3, torch.randn(3, H, dtype=dtype)
    a[0, 3], b[1, 6], a[2, 9], b[2, 12] = float("nan"), float("nan"), float("inf"), float("inf")
    out, ref = ops.swiglu(a, b).float(), reference.swiglu(a, b).float()
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 2
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[out.isinf()], ref[ref.isinf()])
    finite = out.isfinite()
    close(out[finite], ref[finite], dtype)


def test_swiglu_gradcheck_opcheck_errors():
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ops.swiglu(x, y), (a, b))
    torch.library.opcheck(ops.swiglu, (a.float().detach().requires_grad_(), b.float().detach().requires_grad_()))
    with pytest.raises(RuntimeError, match="one shape"):
        ops.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.swiglu(torch.randn(3, 4), torch.randn(3, 4).double())
