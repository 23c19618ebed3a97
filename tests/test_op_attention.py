"""The flash-attention kernels (`flash_attention`, and `qkv_attention` with the
q/k norm and rotary fused into its prologue). They exist on CUDA only, so
every test runs on the CUDA `device` (tests/conftest.py; `pytest -m cuda`,
skipped without a GPU).

Accuracy is judged the way the flash-attention projects judge it: against
attention computed in float32 from the same 16-bit inputs, our error must stay
within a small multiple of the error of PyTorch's own 16-bit attention.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA, autocast_run, model_inputs, on

from ddt_fast import _extension, models, ops
from ddt_fast.ops import reference

KERNEL = "flash_attention"  # the `device` fixture skips devices without it
pytestmark = on(CUDA)
f = torch.ops.ddt_fast if _extension.available() else None


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_within(ours, lowp, ref, what, factor=2.0, floor=2e-3):
    """Our error vs `ref` is at most `factor` x PyTorch 16-bit's error (+ floor)."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    e_ours, e_lowp = rel_err(ours, ref), rel_err(lowp, ref)
    assert e_ours <= factor * e_lowp + floor, f"{what}: error {e_ours:.2e} vs PyTorch 16-bit {e_lowp:.2e}"


def sdpa_fwd_bwd(q, k, v, grad):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def exact_fwd_bwd(q, k, v, grad):
    """Float64 attention (math backend) of the same 16-bit values."""
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return sdpa_fwd_bwd(q.double(), k.double(), v.double(), grad.double())


def ddt_fwd_bwd(q, k, v, grad):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out, lse = f.flash_attention(q, k, v, q.shape[-1] ** -0.5)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad, lse


GRID = list(
    itertools.product(
        [1, 2], [1, 12, 16], [1, 17, 255, 256, 1000, 1024], [64, 72, 128], [torch.bfloat16, torch.float16]
    )
)


@pytest.mark.parametrize("B,H,L,D,dtype", GRID)
def test_forward_backward_vs_sdpa_fp32(device, B, H, L, D, dtype):
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(3))
    grad = torch.randn(B, H, L, D, device=device, dtype=dtype)
    ref = exact_fwd_bwd(q, k, v, grad)
    lowp = sdpa_fwd_bwd(q, k, v, grad)
    ours = ddt_fwd_bwd(q, k, v, grad)
    for name, a, lo, r in zip(("out", "grad_q", "grad_k", "grad_v"), ours, lowp, ref):
        assert a.shape == r.shape and a.dtype == dtype
        assert_within(a, lo, r, f"{name} B={B} H={H} L={L} D={D} {dtype}")
    # log-sum-exp of the scaled scores, in float32
    scores = (q.float() @ k.float().transpose(-1, -2)) * D**-0.5
    torch.testing.assert_close(ours[4], torch.logsumexp(scores, -1), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("Lq,Lk", [(1, 300), (100, 7), (256, 1024)])
def test_cross_lengths(device, Lq, Lk):
    dtype = torch.bfloat16
    q = torch.randn(2, 3, Lq, 72, device=device, dtype=dtype)
    k, v = (torch.randn(2, 3, Lk, 72, device=device, dtype=dtype) for _ in range(2))
    grad = torch.randn_like(q)
    ref = exact_fwd_bwd(q, k, v, grad)
    lowp = sdpa_fwd_bwd(q, k, v, grad)
    for a, lo, r in zip(ddt_fwd_bwd(q, k, v, grad), lowp, ref):
        assert_within(a, lo, r, f"Lq={Lq} Lk={Lk}")


def test_strided_and_misaligned_inputs(device):
    B, L, H, D = 2, 77, 4, 72
    qkv = torch.randn(B, L, 3, H, D, device=device, dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, D] views into the packed tensor
    want = f.flash_attention(q.contiguous(), k.contiguous(), v.contiguous(), D**-0.5)[0]
    assert torch.equal(f.flash_attention(q, k, v, D**-0.5)[0], want)
    # a storage offset of one element breaks 16-byte alignment: the binding copies
    flat = torch.empty(q.numel() + 1, device=device, dtype=q.dtype)
    q_odd = flat[1:].view_as(q).copy_(q)
    assert torch.equal(f.flash_attention(q_odd, k, v, D**-0.5)[0], want)


def test_backward_is_deterministic(device):
    q, k, v = (torch.randn(2, 16, 1000, 72, device=device, dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn_like(q)
    first = ddt_fwd_bwd(q, k, v, grad)
    for _ in range(3):
        again = ddt_fwd_bwd(q, k, v, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def _qkv_case(B, grid, H, D, dtype, device):
    L = grid[0] * grid[1]
    qkv = torch.randn(B, L, 3 * H * D, device=device, dtype=dtype)
    qw = (1 + 0.2 * torch.randn(D, device=device)).to(dtype)
    kw = (1 + 0.2 * torch.randn(D, device=device)).to(dtype)
    freqs = ops.rope_frequencies(*grid, D, torch.device(device))
    return qkv, qw, kw, freqs


def _unfused_qkv_attention(qkv, qw, kw, H, freqs, use_reference):
    B, L, three_c = qkv.shape
    norm = (
        reference.qk_norm_rope if use_reference else (lambda *a: f.qk_norm_rope(*a[:4], torch.view_as_real(a[4]), a[5]))
    )
    q, k, v = norm(qkv, qw, kw, H, freqs, 1e-6)
    out = (
        F.scaled_dot_product_attention(q, k, v) if use_reference else f.flash_attention(q, k, v, q.shape[-1] ** -0.5)[0]
    )
    return out.transpose(1, 2).reshape(B, L, three_c // 3)


@pytest.mark.parametrize("k_prepass", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "B,grid,H,D",
    [
        (1, (1, 1), 1, 64),
        (2, (3, 7), 3, 72),
        (2, (16, 16), 12, 64),
        (2, (16, 16), 16, 72),
        (1, (32, 32), 16, 72),
        (2, (16, 16), 8, 128),
    ],
)
def test_fused_prologue_matches_unfused(device, dtype, B, grid, H, D, k_prepass):
    qkv, qw, kw, freqs = _qkv_case(B, grid, H, D, dtype, device)
    rope = torch.view_as_real(freqs)
    fused = f.qkv_attention(qkv, qw, kw, H, rope, 1e-6, D**-0.5, k_prepass)[0]
    # same kernels without the prologue: q/k differ at most by a rounding flip
    torch.testing.assert_close(fused, _unfused_qkv_attention(qkv, qw, kw, H, freqs, False), atol=2e-2, rtol=2e-2)
    # and against the reference path in float32
    args32 = (qkv.float(), qw.float(), kw.float(), H, freqs)
    assert_within(
        fused,
        _unfused_qkv_attention(qkv, qw, kw, H, freqs, True),
        _unfused_qkv_attention(*args32, True),
        "qkv_attention forward",
    )

    # backward: gradients of qkv and both norm weights
    grad = torch.randn_like(fused)

    def grads(fn, *args):
        leaves = [a.detach().requires_grad_(True) for a in args[:3]]
        fn(*leaves, *args[3:]).backward(grad.to(leaves[0].dtype))
        return [t.grad for t in leaves]

    ours = grads(
        lambda a, b, c, h, fr: f.qkv_attention(a, b, c, h, torch.view_as_real(fr), 1e-6, D**-0.5, k_prepass)[0],
        qkv,
        qw,
        kw,
        H,
        freqs,
    )
    lowp = grads(lambda *a: _unfused_qkv_attention(*a, True), qkv, qw, kw, H, freqs)
    ref = grads(lambda *a: _unfused_qkv_attention(*a, True), *args32)
    for name, a, lo, r in zip(("grad_qkv", "grad_q_weight", "grad_k_weight"), ours, lowp, ref):
        assert_within(a, lo, r, name, factor=3.0)


@pytest.fixture
def ddt_attention():
    with ops.use_backend(attention="ddt"):
        yield


@pytest.mark.parametrize("k_prepass", [True, False])
def test_ops_qkv_attention_takes_the_fused_kernel_when_forced(device, ddt_attention, monkeypatch, k_prepass):
    monkeypatch.setattr(ops, "QKV_ATTENTION_K_PREPASS", k_prepass)
    qkv, qw, kw, freqs = _qkv_case(2, (8, 8), 2, 64, torch.bfloat16, device)
    assert ops.dispatch.use_fused_qkv_attention(qkv, 2)
    with torch.no_grad():
        out = ops.qkv_attention(qkv, qw, kw, 2, freqs, 1e-6)
    want = f.qkv_attention(qkv, qw, kw, 2, torch.view_as_real(freqs), 1e-6, 64**-0.5, k_prepass)[0]
    assert torch.equal(out, want)
    with ops.use_backend("reference"):
        assert not ops.dispatch.use_fused_qkv_attention(qkv, 2)


def test_opcheck(device):
    q, k, v = (torch.randn(2, 3, 37, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(f.flash_attention, (q, k, v, 0.125))
    qkv, qw, kw, freqs = _qkv_case(2, (3, 5), 2, 72, torch.bfloat16, device)
    rope = torch.view_as_real(freqs).contiguous()
    for k_prepass in (True, False):
        torch.library.opcheck(
            f.qkv_attention,
            (
                qkv.requires_grad_(True),
                qw.requires_grad_(True),
                kw.requires_grad_(True),
                2,
                rope,
                1e-6,
                72**-0.5,
                k_prepass,
            ),
        )


def test_cuda_graph_capture(device):
    q, k, v = (torch.randn(2, 16, 256, 72, device=device, dtype=torch.bfloat16) for _ in range(3))
    qkv, qw, kw, freqs = _qkv_case(2, (16, 16), 16, 72, torch.bfloat16, device)
    rope = torch.view_as_real(freqs).contiguous()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graphs require
        f.flash_attention(q, k, v, 72**-0.5)
        f.qkv_attention(qkv, qw, kw, 16, rope, 1e-6, 72**-0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = f.flash_attention(q, k, v, 72**-0.5)
        out2, _ = f.qkv_attention(qkv, qw, kw, 16, rope, 1e-6, 72**-0.5)
    for _ in range(2):  # new inputs in the captured buffers
        for t in (q, k, v, qkv):
            t.copy_(torch.randn_like(t))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, f.flash_attention(q, k, v, 72**-0.5)[0])
        assert torch.equal(out2, f.qkv_attention(qkv, qw, kw, 16, rope, 1e-6, 72**-0.5)[0])


def test_torch_compile_traces_the_ops(device, ddt_attention):
    qkv, qw, kw, freqs = _qkv_case(2, (8, 8), 4, 64, torch.bfloat16, device)
    fn = torch.compile(lambda a: ops.qkv_attention(a, qw, kw, 4, freqs, 1e-6), fullgraph=True)
    torch.testing.assert_close(fn(qkv), ops.qkv_attention(qkv, qw, kw, 4, freqs, 1e-6), atol=0, rtol=0)


@pytest.mark.parametrize("overrides", [{}, dict(hidden_size=128)])  # head dims 72 and 64
def test_model_ddt_attention_vs_sdpa(device, overrides):
    torch.manual_seed(0)
    m = models.create("DDT-tiny-d72/2", **overrides).to(device)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    inputs = model_inputs(3, device)
    (vd, gd), (vs, gs) = (autocast_run(m, inputs, device, backend="fused", attention=a) for a in ("ddt", "sdpa"))
    assert rel_err(vd, vs) < 2e-2
    for name in gd:
        assert rel_err(gd[name], gs[name]) < 5e-2, name


@pytest.mark.slow
def test_bad_input_errors(device):
    """Run in a subprocess: on the H200 test machine (torch 2.11) a direct call
    with an unsupported head dim crashed the process instead of raising, and a
    crash must not take the rest of the suite down with it."""
    code = """
import pytest, torch, torch.nn.functional as F
from ddt_fast import ops
f = torch.ops.ddt_fast
q = torch.randn(1, 2, 8, 80, device="cuda", dtype=torch.bfloat16)
with pytest.raises(RuntimeError, match="head dims 64, 72 and 128"):
    f.flash_attention(q, q, q, 0.1)
q = torch.randn(1, 2, 8, 64, device="cuda")
with pytest.raises(RuntimeError, match="bfloat16 or float16"):
    f.flash_attention(q, q, q, 0.1)
q80 = torch.randn(1, 2, 8, 80, device="cuda", dtype=torch.bfloat16)
with ops.use_backend(attention="ddt"):  # the ops layer falls back to SDPA by itself
    torch.testing.assert_close(ops.attention(q80, q80, q80), F.scaled_dot_product_attention(q80, q80, q80))
print("ok")
"""
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])


_WARP_ROWS_SCRIPT = """
import sys, torch
f, out = torch.ops.ddt_fast, {}
g = torch.Generator(device="cuda").manual_seed(0)
for D in (64, 72):
    for L in (17, 256, 1000):
        q, k, v = (torch.randn(2, 3, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        o, lse = f.flash_attention(q, k, v, D ** -0.5)
        out[(D, L)] = [o.cpu(), lse.cpu()]
torch.save(out, sys.argv[1])
"""


@pytest.mark.slow
def test_warp_rows_switch_agrees(device, tmp_path):
    """DDT_FAST_ATTENTION_WARP_ROWS=16 (one 16-row query tile per warp for
    D <= 72; the default is two), a GPU benchmark switch inside the
    GPU-verified kernel, agrees with the default within float32-accumulation noise."""
    from helpers import fresh_process_outputs

    two = fresh_process_outputs(_WARP_ROWS_SCRIPT, tmp_path / "rows32.pt", {"DDT_FAST_ATTENTION_WARP_ROWS": "32"})
    one = fresh_process_outputs(_WARP_ROWS_SCRIPT, tmp_path / "rows16.pt", {"DDT_FAST_ATTENTION_WARP_ROWS": "16"})
    assert two.keys() == one.keys()
    for key in two:
        torch.testing.assert_close(one[key][0].float(), two[key][0].float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(one[key][1], two[key][1], atol=1e-4, rtol=1e-4)
