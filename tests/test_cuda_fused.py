"""GPU suite for the fused block ops (`pytest -m cuda`); skipped without a GPU.

Run it on a GPU before adding an op to ddt_fast/ops/verified.py.
"""

import itertools

import pytest
import torch

from tolerances import close

from ddt_fast import _extension, models, ops
from ddt_fast.ops import reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not _extension.has_kernel("rms_norm_modulate", "CUDA"), reason="ddt_fast._C was built without CUDA kernels"
    ),
]
f = torch.ops.ddt_fast if _extension.available() else None


GRID = list(
    itertools.product(
        [torch.float32, torch.bfloat16, torch.float16], [1, 3], [1, 7, 256], [8, 72, 768, 1152], [False, True]
    )
)


@pytest.mark.parametrize("dtype,B,L,C,per_token", GRID)
def test_norm_family_grid_cuda(dtype, B, L, C, per_token):
    dev = "cuda"
    x, y = torch.randn(B, L, C, dtype=dtype, device=dev) * 2, torch.randn(B, L, C, dtype=dtype, device=dev)
    w = (1 + 0.1 * torch.randn(C, device=dev)).to(dtype)
    sh, sc, gate, *_ = (torch.randn(B, L if per_token else 1, 6 * C, dtype=dtype, device=dev) * 0.5).chunk(6, -1)
    close(f.rms_norm_modulate(x, w, sh, sc, 1e-6), reference.rms_norm_modulate(x, w, sh, sc, 1e-6), dtype)
    close(f.layer_norm_modulate(x, sh, sc, 1e-6), reference.layer_norm_modulate(x, sh, sc, 1e-6), dtype)
    close(f.gated_residual(x, gate, y), reference.gated_residual(x, gate, y), dtype)
    xo, out = f.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6)
    xo_r, out_r = reference.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6)
    close(xo, xo_r, dtype)
    close(out, out_r, dtype, 2.0)
    # the GPU kernels agree with the CPU kernels on the same inputs
    close(
        f.rms_norm_modulate(x, w, sh, sc, 1e-6).cpu(),
        f.rms_norm_modulate(x.cpu(), w.cpu(), sh.cpu(), sc.cpu(), 1e-6),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("B,L,C", [(1, 1, 8), (3, 7, 72), (2, 256, 1152)])
def test_norm_family_backward_cuda_matches_cpu_kernels(dtype, per_token, B, L, C):
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
        cpu = f.norm_modulate_backward(*args("cpu"), 1e-6, kind, residual)
        gpu = f.norm_modulate_backward(*args("cuda"), 1e-6, kind, residual)
        for a, b in zip(gpu, cpu):
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
    x, y, grad_out = (_offset_view(t, offset) for t in (x, y, grad_out))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize(
    "B,L,C,offset", [(2, 33, 768, 0), (2, 70, 1152, 0), (2, 33, 1152, 1), (1, 5, 1280, 0), (2, 9, 2048, 0)]
)
def test_norm_backward_packed_and_scalar_paths_cuda(dtype, per_token, B, L, C, offset):
    """The packed backward (aligned rows of up to 40 elements per lane: 16-bit
    C <= 1280, float32 C <= 1024; column sums on chip) and the scalar one
    (misaligned rows, longer rows) agree with the CPU kernels, with the
    modulation as strided chunk views and with and without grad_x_out."""
    for case in BACKWARD_CASES:
        cpu = f.norm_modulate_backward(*_backward_args(dtype, "cpu", B, L, C, per_token, *case))
        gpu = f.norm_modulate_backward(*_backward_args(dtype, "cuda", B, L, C, per_token, *case, offset=offset))
        for a, b in zip(gpu, cpu):
            assert a.shape == b.shape, case
            if b.numel():
                mag = max(b.float().abs().max().item(), 1.0)
                close(a.cpu() / mag, b / mag, dtype, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,grid,H,D", [(1, (1, 1), 1, 8), (3, (1, 7), 2, 36), (2, (16, 16), 12, 64), (2, (16, 16), 16, 72)]
)
def test_qk_norm_rope_cuda(dtype, B, grid, H, D):
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, dtype=dtype, device="cuda")
    qw, kw = (1 + 0.2 * torch.randn(D, device="cuda")).to(dtype), (1 + 0.2 * torch.randn(D, device="cuda")).to(dtype)
    freqs = ops.rope_frequencies(*grid, D, torch.device("cuda"))
    q, k, v = f.qk_norm_rope(qkv, qw, kw, H, torch.view_as_real(freqs), 1e-6)
    qr, kr, vr = reference.qk_norm_rope(qkv, qw, kw, H, freqs, 1e-6)
    close(q, qr, dtype)
    close(k, kr, dtype)
    assert torch.equal(v, vr)
    gq, gk, gv = (torch.randn_like(q) for _ in range(3))
    rope = torch.view_as_real(freqs).contiguous()
    gpu = f.qk_norm_rope_backward(gq, gk, gv, qkv, qw, kw, H, rope, 1e-6)
    cpu = f.qk_norm_rope_backward(gq.cpu(), gk.cpu(), gv.cpu(), qkv.cpu(), qw.cpu(), kw.cpu(), H, rope.cpu(), 1e-6)
    for a, b in zip(gpu, cpu):
        mag = max(b.float().abs().max().item(), 1.0)
        close(a.cpu() / mag, b / mag, dtype, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_cuda(dtype):
    a, b = torch.randn(2, 256, 3072, dtype=dtype, device="cuda"), torch.randn(2, 256, 3072, dtype=dtype, device="cuda")
    close(f.swiglu(a, b), reference.swiglu(a, b), dtype)
    g = torch.randn_like(a)
    for x, y in zip(f.swiglu_backward(g, a, b), f.swiglu_backward(g.cpu(), a.cpu(), b.cpu())):
        close(x.cpu(), y, dtype, 2.0)


def _offset_view(t, offset):
    """t's values in storage shifted by `offset` elements (offset 1: rows no longer 16-byte aligned)."""
    if offset == 0:
        return t
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [12, 1152, 2056, 4096])
def test_norm_forward_packed_and_scalar_paths_cuda(dtype, C):
    """The packed kernel (aligned rows that fit in registers) and the scalar one
    (misaligned rows, C not a multiple of the pack, rows too long) both match
    the reference, per token and per sample, with and without the residual."""
    B, L = 2, 33
    x, y = torch.randn(B, L, C, dtype=dtype, device="cuda") * 2, torch.randn(B, L, C, dtype=dtype, device="cuda")
    w = (1 + 0.1 * torch.randn(C, device="cuda")).to(dtype)
    for per_token in (False, True):
        sh, sc, gate = (torch.randn(B, L if per_token else 1, 3 * C, dtype=dtype, device="cuda") * 0.5).chunk(3, -1)
        expected = (
            reference.rms_norm_modulate(x, w, sh, sc, 1e-6),
            reference.layer_norm_modulate(x, sh, sc, 1e-6),
            *reference.gated_residual_rms_norm_modulate(x, gate, y, w, sh, sc, 1e-6),
        )
        for offset in (0, 1):
            xs, ys = _offset_view(x, offset), _offset_view(y, offset)
            got = (
                f.rms_norm_modulate(xs, w, sh, sc, 1e-6),
                f.layer_norm_modulate(xs, sh, sc, 1e-6),
                *f.gated_residual_rms_norm_modulate(xs, gate, ys, w, sh, sc, 1e-6),
            )
            for a, e in zip(got, expected):
                close(a, e, dtype, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,offset", [(3072, 0), (3072, 1), (36, 0), (4, 0)])
def test_swiglu_packed_and_scalar_paths_cuda(dtype, H, offset):
    a, b = (torch.randn(5, 7, H, dtype=dtype, device="cuda") * 3 for _ in range(2))
    a_s, b_s = _offset_view(a, offset), _offset_view(b, offset)
    close(f.swiglu(a_s, b_s), reference.swiglu(a, b), dtype)
    g = torch.randn_like(a)
    cpu = f.swiglu_backward(g.cpu(), a.cpu(), b.cpu())
    for x, y in zip(f.swiglu_backward(_offset_view(g, offset), a_s, b_s), cpu):
        close(x.cpu(), y, dtype, 2.0)
    # the halves of one packed [R, 2H] projection (row stride 2H), as the model's MLP makes them
    ab = torch.randn(4, 2 * H, dtype=dtype, device="cuda")
    a2, b2 = ab.chunk(2, -1)
    close(f.swiglu(a2, b2), reference.swiglu(a2, b2), dtype)


def test_opcheck_cuda():
    B, L, C, H, D = 2, 6, 16, 2, 8
    x, y = (torch.randn(B, L, C, device="cuda", requires_grad=True) for _ in range(2))
    w = torch.randn(C, device="cuda", requires_grad=True)
    sh, sc, g = (torch.randn(B, 1, C, device="cuda", requires_grad=True) for _ in range(3))
    torch.library.opcheck(f.rms_norm_modulate, (x, w, sh, sc, 1e-6))
    torch.library.opcheck(f.layer_norm_modulate, (x, sh, sc, 1e-6))
    torch.library.opcheck(f.gated_residual, (x, g, y))
    torch.library.opcheck(f.gated_residual_rms_norm_modulate, (x, g, y, w, sh, sc, 1e-6))
    rope = torch.view_as_real(ops.rope_frequencies(2, 3, D, torch.device("cuda"))).contiguous()
    qkv = torch.randn(B, L, 3 * H * D, device="cuda", requires_grad=True)
    qw, kw = torch.randn(D, device="cuda", requires_grad=True), torch.randn(D, device="cuda", requires_grad=True)
    torch.library.opcheck(f.qk_norm_rope, (qkv, qw, kw, H, rope, 1e-6))
    a, b = torch.randn(3, 40, device="cuda", requires_grad=True), torch.randn(3, 40, device="cuda", requires_grad=True)
    torch.library.opcheck(f.swiglu, (a, b))


def _model():
    torch.manual_seed(0)
    m = models.create("DDT-tiny-d72/2").cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_model_fused_vs_reference_cuda():
    m = _model()
    x, t, y = (
        torch.randn(3, 4, 16, 16, device="cuda"),
        torch.rand(3, device="cuda"),
        torch.tensor([1, 2, 10], device="cuda"),
    )
    grads = {}
    for backend in ("fused", "reference"):
        m.zero_grad()
        with ops.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            v, _ = m(x, t, y)
        v.float().square().mean().backward()
        grads[backend] = (v.detach().float(), {n: p.grad.clone() for n, p in m.named_parameters()})
    (vf, gf), (vr, gr) = grads["fused"], grads["reference"]
    assert ((vf - vr).norm() / vr.norm()) < 2e-2
    for n in gr:
        assert ((gf[n] - gr[n]).norm() / (gr[n].norm() + 1e-12)) < 5e-2, n


def test_torch_compile_model_with_fused_ops():
    m = _model()
    x, t, y = (
        torch.randn(2, 4, 16, 16, device="cuda"),
        torch.rand(2, device="cuda"),
        torch.tensor([1, 2], device="cuda"),
    )
    with torch.no_grad(), ops.use_backend("fused"):
        eager = m(x, t, y)[0]
        compiled = torch.compile(m, fullgraph=True)(x, t, y)[0]
    close(compiled, eager, torch.float32, 10.0)


def test_cuda_graph_capture_and_replay_forward():
    m = _model()
    static_x = torch.randn(2, 4, 16, 16, device="cuda")
    static_t, static_y = torch.rand(2, device="cuda"), torch.tensor([1, 2], device="cuda")
    with torch.no_grad(), ops.use_backend("fused"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                m(static_x, static_t, static_y)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_v, _ = m(static_x, static_t, static_y)
        new_x = torch.randn_like(static_x)
        static_x.copy_(new_x)
        graph.replay()
        expected, _ = m(new_x, static_t, static_y)
    torch.cuda.synchronize()
    close(static_v, expected, torch.float32)
