"""SwiGLU (`silu(a) * b`, also on the two halves of one packed projection)
against the reference, on the CPU and CUDA (`device`: tests/conftest.py)."""

import itertools

import pytest
import torch
from helpers import CPU, CUDA, loss_grads, offset_view, on

from tolerances import close

from ddt_fast import _extension
from ddt_fast.ops import reference

KERNEL = "swiglu"  # the `device` fixture skips devices without it
ops = torch.ops.ddt_fast if _extension.available() else None


SWIGLU_GRID = list(
    itertools.product(
        [torch.float32, torch.bfloat16, torch.float16], [(1, 1, 8), (3, 7, 72), (2, 3, 301), (2, 256, 3072)]
    )
)


@pytest.mark.parametrize("dtype,shape", SWIGLU_GRID, ids=[f"{str(d)[6:]}-{s}" for d, s in SWIGLU_GRID])
def test_swiglu_forward_backward(device, dtype, shape):
    a, b = torch.randn(shape, dtype=dtype, device=device) * 3, torch.randn(shape, dtype=dtype, device=device)
    close(ops.swiglu(a, b), reference.swiglu(a, b), dtype)
    outs, grads = loss_grads(lambda x, y: ops.swiglu(x, y), (a, b))
    outs_ref, grads_ref = loss_grads(reference.swiglu, (a, b))
    for x, y in zip(grads, grads_ref):
        close(x, y, dtype, 2.0)
    if device != CPU:  # the GPU backward agrees with the CPU kernel on the same inputs
        g = torch.randn_like(a)
        for x, y in zip(ops.swiglu_backward(g, a, b), ops.swiglu_backward(g.cpu(), a.cpu(), b.cpu())):
            close(x.cpu(), y, dtype, 2.0)


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width,start", [(299, 0), (300, 0), (300, 1)])
def test_swiglu_packed_halves_are_views_not_copies(device, dtype, width, start):
    """a and b as the two halves of one packed GEMM output; odd widths, and
    halves starting at an odd element (rows not 4-byte aligned)."""
    h = torch.randn(2, 5, 2 * width + start, dtype=dtype) * 3
    a, b = h[..., start : start + width], h[..., start + width :]
    assert not a.is_contiguous()
    close(ops.swiglu(a, b), reference.swiglu(a, b), dtype)
    _, grads = loss_grads(lambda x, y: ops.swiglu(x, y), (a, b))
    _, grads_ref = loss_grads(reference.swiglu, (a, b))
    for x, y in zip(grads, grads_ref):
        close(x, y, dtype, 2.0)
    t = torch.randn(4, 3, 10).transpose(0, 1)  # leading dims that do not collapse: copied
    close(ops.swiglu(t, t), reference.swiglu(t, t), torch.float32)


@on(CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H", [64, 65])
def test_swiglu_nan_and_inf_propagate_like_the_reference(device, dtype, H):
    a, b = torch.randn(3, H, dtype=dtype) * 3, torch.randn(3, H, dtype=dtype)
    a[0, 3], b[1, 6], a[2, 9], b[2, 12] = float("nan"), float("nan"), float("inf"), float("inf")
    out, ref = ops.swiglu(a, b).float(), reference.swiglu(a, b).float()
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().sum() == 2
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[out.isinf()], ref[ref.isinf()])
    finite = out.isfinite()
    close(out[finite], ref[finite], dtype)


def test_swiglu_opcheck(device):
    a = torch.randn(3, 40, device=device, requires_grad=True)
    b = torch.randn(3, 40, device=device, requires_grad=True)
    torch.library.opcheck(ops.swiglu, (a, b))


@on(CPU)
def test_swiglu_gradcheck_and_errors(device):
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: ops.swiglu(x, y), (a, b))
    with pytest.raises(RuntimeError, match="one shape"):
        ops.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.swiglu(torch.randn(3, 4), torch.randn(3, 4).double())


@on(CUDA)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,offset", [(3072, 0), (3072, 1), (36, 0), (4, 0)])
def test_swiglu_packed_and_scalar_paths(device, dtype, H, offset):
    """The packed CUDA kernels (16-byte aligned rows) and the scalar ones
    (misaligned rows, widths that are not a multiple of the pack)."""
    a, b = (torch.randn(5, 7, H, dtype=dtype, device=device) * 3 for _ in range(2))
    a_s, b_s = offset_view(a, offset), offset_view(b, offset)
    close(ops.swiglu(a_s, b_s), reference.swiglu(a, b), dtype)
    g = torch.randn_like(a)
    cpu = ops.swiglu_backward(g.cpu(), a.cpu(), b.cpu())
    for x, y in zip(ops.swiglu_backward(offset_view(g, offset), a_s, b_s), cpu):
        close(x.cpu(), y, dtype, 2.0)
    # the halves of one packed [R, 2H] projection (row stride 2H), as the model's MLP makes them
    ab = torch.randn(4, 2 * H, dtype=dtype, device=device)
    a2, b2 = ab.chunk(2, -1)
    close(ops.swiglu(a2, b2), reference.swiglu(a2, b2), dtype)
