"""16-bit linear layers on the CPU computed in float32 (ops.linear, ops/cpu_linear.py).

The float32 path must give what PyTorch's 16-bit kernels give (float32
accumulation, one rounding) up to summation order, gradients included, under
autocast too; and the dispatch rule must send only the right cases to it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ddt_fast import ops
from ddt_fast.models import presets
from ddt_fast.models.ddt import Linear
from ddt_fast.ops import dispatch
from ddt_fast.ops.cpu_linear import Float32Linear

HALF = (torch.bfloat16, torch.float16)
# the spacing of 16-bit values in [1, 2): one rounding of the result is at most half of it
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _operands(dtype, rows=64, k=96, n=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows // 2, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _within_one_rounding(out, exact, dtype):
    """|out - exact| <= one ulp of out's magnitude (the exact value rounded once,
    plus float32 summation error far below a 16-bit ulp)."""
    err = (out.double() - exact).abs()
    allowed = ULP[dtype] * exact.abs().clamp_min(2.0**-14) + 1e-6
    assert bool((err <= allowed).all()), (err / allowed).max().item()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_path_is_the_16bit_product_rounded_once(dtype, bias):
    x, w, b = _operands(dtype, bias=bias)
    with ops.use_backend(cpu_linear="float32"):
        out = ops.linear(x, w, b)
    native = F.linear(x, w, b)
    assert out.dtype == dtype and out.shape == native.shape
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    _within_one_rounding(out, exact, dtype)
    # PyTorch's own 16-bit kernel: the same numbers up to summation order
    assert (out == native).float().mean().item() > 0.99
    _within_one_rounding(native, exact, dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_float32_path_gradients(dtype):
    x, w, b = _operands(dtype)
    grad = torch.randn(x.shape[:-1] + (w.shape[0],), generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = {}
    for mode in ("float32", "native"):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        with ops.use_backend(cpu_linear=mode):
            ops.linear(xs, ws, bs).backward(grad)
        grads[mode] = (xs.grad, ws.grad, bs.grad)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).backward(grad.double())
    for got, native, exact in zip(grads["float32"], grads["native"], (xd.grad, wd.grad, bd.grad)):
        assert got.dtype == dtype
        _within_one_rounding(got, exact, dtype)
        assert (got == native).float().mean().item() > 0.98


class _MatmulDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matrix product that reaches the kernels."""

    PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.PRODUCTS:
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_backward_inside_autocast_stays_float32():
    """A backward called inside a CPU autocast region (as many training loops do)
    must not let autocast cast the float32 products back to bf16, which sends
    them to PyTorch's slow 16-bit kernels (a DDT-B/2 training step took 160 s
    instead of 5 s that way)."""
    x, w, b = (t.float() for t in _operands(torch.bfloat16))
    ws = w.clone().requires_grad_()
    with ops.use_backend(cpu_linear="float32"), torch.autocast("cpu", dtype=torch.bfloat16):
        with _MatmulDtypes() as forward:
            loss = ops.linear(x, ws, b).float().square().sum()
        with _MatmulDtypes() as backward:
            loss.backward()
    assert forward.seen and backward.seen
    assert all(set(dtypes) == {torch.float32} for dtypes in forward.seen + backward.seen), (forward.seen, backward.seen)
    assert ws.grad is not None and ws.grad.dtype == torch.float32


def test_only_needed_gradients_are_computed():
    x, w, b = _operands(torch.bfloat16)
    w.requires_grad_()
    with ops.use_backend(cpu_linear="float32"):
        ops.linear(x, w, b).float().sum().backward()
    assert w.grad is not None and x.grad is None and b.grad is None
    x2, w2, _ = _operands(torch.bfloat16, bias=False)
    x2.requires_grad_()
    with ops.use_backend(cpu_linear="float32"):
        ops.linear(x2, w2).float().sum().backward()
    assert x2.grad is not None and w2.grad is None


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_float32_path_matches_native_autocast(dtype):
    """Under CPU autocast, float32 operands are cast to autocast's dtype first (as
    autocast does), the result is in that dtype, and gradients reach the float32 weights."""
    x, w, b = (t.float() for t in _operands(dtype))
    results = {}
    for mode in ("float32", "native"):
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        with ops.use_backend(cpu_linear=mode), torch.autocast("cpu", dtype=dtype):
            out = ops.linear(x, ws, bs)
        out.float().square().sum().backward()
        results[mode] = (out, ws.grad, bs.grad)
    out, gw, gb = results["float32"]
    assert out.dtype == dtype and gw.dtype == gb.dtype == torch.float32
    assert (out == results["native"][0]).float().mean().item() > 0.99
    for got, want in zip((gw, gb), results["native"][1:]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def test_dispatch_rule(monkeypatch):
    x, w, b = _operands(torch.bfloat16)
    calls = []
    real = Float32Linear.apply
    monkeypatch.setattr(Float32Linear, "apply", lambda *a: calls.append(1) or real(*a))

    def takes_float32_path(*args, **use):
        calls.clear()
        with ops.use_backend(**use):
            ops.linear(*args)
        return bool(calls)

    monkeypatch.setattr(dispatch, "cpu_has_native_matmul", lambda dtype: False)
    assert takes_float32_path(x, w, b, cpu_linear="auto")
    assert takes_float32_path(x, w, b, backend="fused", cpu_linear="auto")
    assert not takes_float32_path(x, w, b, cpu_linear="native")
    # the reference backend is the published code path: PyTorch's own kernels
    assert not takes_float32_path(x, w, b, backend="reference", cpu_linear="float32")
    # float32 operands, too few rows for the weight's conversion to pay
    assert not takes_float32_path(x.float(), w.float(), b.float(), cpu_linear="float32")
    few = x.reshape(-1, x.shape[-1])[: dispatch.FLOAT32_LINEAR_MIN_ROWS - 1]
    assert not takes_float32_path(few, w, b, cpu_linear="float32")
    assert takes_float32_path(
        x.reshape(-1, x.shape[-1])[: dispatch.FLOAT32_LINEAR_MIN_ROWS], w, b, cpu_linear="float32"
    )
    # a CPU with bf16 matrix instructions keeps PyTorch's kernel under auto, not when forced
    monkeypatch.setattr(dispatch, "cpu_has_native_matmul", lambda dtype: True)
    assert not takes_float32_path(x, w, b, cpu_linear="auto")
    assert takes_float32_path(x, w, b, cpu_linear="float32")
    with ops.use_backend(cpu_linear="auto"):
        assert ops.plan("cpu")["linear_16bit"] == "native"
    with ops.use_backend(cpu_linear="float32"):
        assert ops.plan("cpu")["linear_16bit"] == "float32"


def test_mixed_dtypes_keep_pytorchs_error():
    x, w, b = _operands(torch.bfloat16)
    for args in ((x, w.float(), b), (x, w, b.float())):
        with ops.use_backend(cpu_linear="float32"), pytest.raises(RuntimeError, match="dtype"):
            ops.linear(*args)


@pytest.mark.parametrize(
    "caps, bf16, f16",
    [
        ({"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "amx_bf16": False}, False, False),
        ({"architecture": "x86_64", "avx512_bf16": True}, True, False),
        ({"architecture": "x86_64", "amx_bf16": True, "amx_fp16": True}, True, True),
        ({"architecture": "aarch64", "bf16": True, "fp16_arith": True}, True, True),
        ({}, True, True),  # unknown: leave PyTorch's kernels alone
    ],
)
def test_native_matmul_detection(monkeypatch, caps, bf16, f16):
    monkeypatch.setattr(dispatch, "_cpu_capabilities", lambda: caps)
    dispatch.cpu_has_native_matmul.cache_clear()
    try:
        assert dispatch.cpu_has_native_matmul(torch.bfloat16) is bf16
        assert dispatch.cpu_has_native_matmul(torch.float16) is f16
    finally:
        dispatch.cpu_has_native_matmul.cache_clear()


def test_mode_names():
    with pytest.raises(ValueError, match="CPU linear mode must be one of"):
        ops.set_cpu_linear("fast")
    with pytest.raises(ValueError, match="CPU linear mode must be one of"):
        with ops.use_backend(cpu_linear="bf16"):
            pass
    for mode in dispatch.CPU_LINEAR_MODES:
        with ops.use_backend(cpu_linear=mode):
            assert ops.get_cpu_linear() == mode


def _random_model(name="DDT-tiny/2"):
    torch.manual_seed(0)
    m = presets.create(name)
    with torch.no_grad():  # the zero-initialised modulations and output layer would hide differences
        for n, p in m.named_parameters():
            if "adaLN" in n or "final_layer" in n:
                p.normal_(0, 0.02)
    return m


def test_model_linears_are_ops_linear_with_unchanged_keys():
    m = _random_model()
    linears = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    assert linears and all(type(mod) is Linear for mod in linears)
    ref = presets.create("DDT-tiny/2")
    assert list(m.state_dict()) == list(ref.state_dict())


@pytest.mark.slow
def test_bf16_model_float32_linears_agree_with_native():
    """Whole bf16 model, forward and the gradients of a loss: the float32 path
    against PyTorch's bf16 kernels, both measured against a float32 run of the
    same weights (the float32 path must not be the less accurate one)."""
    m32 = _random_model()
    m16 = _random_model().to(torch.bfloat16)
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([1, 2, 3, 4])

    def run(model, dtype, mode):
        model.zero_grad()
        with ops.use_backend(cpu_linear=mode):
            v = model(x.to(dtype), t.to(dtype), y)[0]
            v.float().square().mean().backward()
        return v.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}

    v_ref, g_ref = run(m32, torch.float32, "auto")
    rel = lambda a, b: ((a - b).norm() / (b.norm() + 1e-12)).item()
    errors = {}
    for mode in ("float32", "native"):
        v, g = run(m16, torch.bfloat16, mode)
        errors[mode] = (rel(v, v_ref), max(rel(g[n], g_ref[n]) for n in g_ref))
    assert errors["float32"][0] < 2e-2 and errors["float32"][1] < 5e-2, errors
    assert errors["float32"][0] < 1.5 * errors["native"][0] + 1e-3, errors


@pytest.mark.slow
def test_torch_compile_fullgraph_bf16_float32_linears():
    m = _random_model().to(torch.bfloat16)
    x, t, y = torch.randn(2, 4, 8, 8).bfloat16(), torch.rand(2).bfloat16(), torch.tensor([1, 2])
    with torch.no_grad(), ops.use_backend(cpu_linear="float32"):
        eager = m(x, t, y)[0].float()
        compiled = torch.compile(m, fullgraph=True)(x, t, y)[0].float()
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2
