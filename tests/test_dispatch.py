import subprocess
import sys

import pytest
import torch

from ddt_fast import ops
from ddt_fast.ops import dispatch, verified


def test_reference_forced_never_uses_fused(monkeypatch):
    monkeypatch.setattr(dispatch, "_has_fused", lambda op, dev: True)
    with ops.use_backend("reference"):
        assert not dispatch.use_fused("swiglu", torch.device("cpu"))
    with ops.use_backend("fused"):
        assert dispatch.use_fused("swiglu", torch.device("cpu"))


def test_cuda_auto_requires_gpu_verification(monkeypatch):
    monkeypatch.setattr(dispatch, "_has_fused", lambda op, dev: True)
    cuda = torch.device("cuda")
    with ops.use_backend("auto"):
        assert dispatch.use_fused("swiglu", torch.device("cpu"))  # CPU kernels need no GPU run
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
        assert not dispatch.use_fused("swiglu", cuda)
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: op == "swiglu")
        assert dispatch.use_fused("swiglu", cuda)
        assert not dispatch.use_fused("rms_norm_modulate", cuda)
    with ops.use_backend("fused"):
        assert dispatch.use_fused("rms_norm_modulate", cuda)


def test_no_kernel_means_reference_even_when_forced(monkeypatch):
    monkeypatch.setattr(dispatch, "_has_fused", lambda op, dev: False)
    with ops.use_backend("fused"):
        assert not dispatch.use_fused("swiglu", torch.device("cpu"))


def test_auto_on_gpu_is_verified_minus_measured_slower():
    for op in ops.KERNEL_OPS:
        assert verified.auto_on_gpu(op) == (verified.is_verified(op) and op not in verified.SLOWER_ON_GPU)
    assert set(verified.SLOWER_ON_GPU) <= set(ops.KERNEL_OPS)
    assert all(isinstance(why, str) and why for why in verified.SLOWER_ON_GPU.values())


def test_every_kernel_op_has_its_cuda_sources_listed():
    assert set(verified.KERNEL_SOURCES) == set(ops.KERNEL_OPS)


def test_attention_on_cpu_is_sdpa_whatever_is_forced():
    q = torch.randn(1, 2, 5, 8)
    for choice in dispatch.ATTENTION_BACKENDS:
        with ops.use_backend(attention=choice):
            assert dispatch.attention_backend(q, q, q) == "sdpa"


def test_attention_auto_order(monkeypatch):
    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda")
        dtype = torch.bfloat16
        shape = (1, 16, 256, 72)

    q = FakeCuda()
    monkeypatch.setattr(dispatch, "_has_fused", lambda op, dev: True)
    monkeypatch.setattr(dispatch, "flash_attn_importable", lambda: True)
    with ops.use_backend(attention="auto"):
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
        assert dispatch.attention_backend(q, q, q) == "flash_attn"  # ddt kernel not verified
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: True)
        assert dispatch.attention_backend(q, q, q) == "ddt"
        assert dispatch.attention_backend(q, q, q, mask=torch.ones(1)) == "sdpa"
    monkeypatch.setattr(dispatch, "flash_attn_importable", lambda: False)
    with ops.use_backend(attention="flash_attn"):
        assert dispatch.attention_backend(q, q, q) == "sdpa"


def test_fused_qkv_attention_rule(monkeypatch):
    """One kernel from qkv (norm + rotary + attention) only where both the
    op backend and the attention backend would pick our kernels."""
    qkv = torch.empty(2, 256, 3 * 16 * 72, dtype=torch.bfloat16, device="meta")
    monkeypatch.setattr(
        dispatch, "_ddt_case", lambda device, dtype, head_dim, mask, op: head_dim in (64, 72, 128) and mask is None
    )
    with ops.use_backend("auto", attention="auto"):
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
        assert not dispatch.use_fused_qkv_attention(qkv, 16)  # not GPU-verified
        monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: op == "qkv_attention")
        assert dispatch.use_fused_qkv_attention(qkv, 16)
        assert not dispatch.use_fused_qkv_attention(qkv, 16, mask=torch.ones(1))
        assert not dispatch.use_fused_qkv_attention(qkv, 12)  # head dim 96
    monkeypatch.setattr(dispatch, "auto_on_gpu", lambda op: False)
    with ops.use_backend("auto", attention="ddt"):
        assert dispatch.use_fused_qkv_attention(qkv, 16)
    for backend, attention in (("reference", "ddt"), ("fused", "sdpa"), ("fused", "flash_attn")):
        with ops.use_backend(backend, attention=attention):
            assert not dispatch.use_fused_qkv_attention(qkv, 16)


def test_qkv_attention_on_cpu_is_norm_rope_plus_sdpa():
    from ddt_fast.ops import reference

    B, H, D, grid = 2, 3, 8, (2, 3)
    qkv = torch.randn(B, grid[0] * grid[1], 3 * H * D)
    qw, kw = torch.randn(D), torch.randn(D)
    freqs = ops.rope_frequencies(*grid, D, torch.device("cpu"))
    q, k, v = reference.qk_norm_rope(qkv, qw, kw, H, freqs, 1e-6)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, -1, H * D)
    for choice in dispatch.ATTENTION_BACKENDS:
        with ops.use_backend("reference", attention=choice):
            torch.testing.assert_close(ops.qkv_attention(qkv, qw, kw, H, freqs, 1e-6), want)


@pytest.mark.slow
def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        ops.set_attention_backend("xformers")
    out = subprocess.run(
        [sys.executable, "-c", "import ddt_fast"],
        capture_output=True,
        text=True,
        env={"DDT_FAST_BACKEND": "turbo", "PATH": ""},
    )
    assert out.returncode != 0 and "DDT_FAST_BACKEND='turbo' is not one of" in out.stderr


@pytest.mark.slow
def test_env_var_selects_reference():
    code = "import ddt_fast.ops as o; print(o.get_backend(), o.get_attention_backend())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"DDT_FAST_BACKEND": "reference", "DDT_FAST_ATTENTION": "sdpa", "PATH": ""},
    )
    assert out.stdout.split() == ["reference", "sdpa"], out.stderr


def test_use_backend_restores_state():
    before = (ops.get_backend(), ops.get_attention_backend())
    with pytest.raises(RuntimeError):
        with ops.use_backend("reference", attention="sdpa"):
            raise RuntimeError("boom")
    assert (ops.get_backend(), ops.get_attention_backend()) == before


def test_model_output_identical_under_every_backend_when_no_kernels():
    from ddt_fast import models

    m = models.create("DDT-tiny/2")
    x, t, y = torch.randn(1, 4, 4, 4), torch.rand(1), torch.tensor([3])
    with torch.no_grad(), ops.use_backend("reference"):
        ref = m(x, t, y)[0]
    with torch.no_grad(), ops.use_backend("auto"):
        auto = m(x, t, y)[0]
    plan = ops.plan("cpu")
    if all(v in ("reference", "sdpa") for v in plan.values()):
        assert torch.equal(ref, auto)
    else:
        torch.testing.assert_close(ref, auto, atol=1e-5, rtol=1e-5)


def test_dtype_combinations_the_kernels_do_not_take_fall_back_to_reference():
    from ddt_fast.ops import reference

    x = torch.randn(2, 3, 8)
    w16 = torch.randn(8, dtype=torch.bfloat16)
    sh, sc = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with ops.use_backend("fused"):
        out = ops.rms_norm_modulate(x, w16, sh, sc)  # float32 x with a bf16 weight: promotion
    torch.testing.assert_close(out, reference.rms_norm_modulate(x, w16, sh, sc))
    assert out.dtype == torch.float32
    xi = torch.randint(0, 4, (2, 3, 8))
    with ops.use_backend("fused"):
        assert ops._kernel_takes(x, (torch.randn(8),), (sh, sc))
        assert not ops._kernel_takes(xi.float(), (w16,))
        assert not ops._kernel_takes(x.bfloat16(), (), (sh, sc.bfloat16()))


@pytest.mark.skipif(not hasattr(torch.ops.ddt_fast, "flash_attention"), reason="extension not built")
def test_attention_fake_shapes_and_layout():
    """The fake (meta) kernels torch.compile traces with: shapes, dtypes, and
    the [B, L, H, D] storage of the output that makes merging heads a view."""
    f = torch.ops.ddt_fast
    q = torch.empty(2, 3, 5, 72, dtype=torch.bfloat16, device="meta")
    k = torch.empty(2, 3, 9, 72, dtype=torch.bfloat16, device="meta")
    out, lse = f.flash_attention(q, k, k, 0.1)
    assert out.shape == (2, 3, 5, 72) and out.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float32
    gq, gk, gv = f.flash_attention_backward(out, q, k, k, out, lse, 0.1)
    assert gq.shape == q.shape and gk.shape == gv.shape == k.shape
    qkv = torch.empty(2, 16, 3 * 144, dtype=torch.bfloat16, device="meta")
    w = torch.empty(72, device="meta")
    rope = torch.empty(16, 36, 2, device="meta")
    out, lse = f.qkv_attention(qkv, w, w, 2, rope, 1e-6, 0.1)
    assert out.shape == (2, 16, 144) and lse.shape == (2, 2, 16)
