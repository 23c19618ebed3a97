"""Whole model: fused backend vs reference backend, same weights; on CUDA
also torch.compile and CUDA-graph capture with the fused ops."""

import pytest
import torch
from helpers import CUDA, autocast_run, model_inputs, on

from tolerances import close

from ddt_fast import _extension, models, ops

pytestmark = pytest.mark.skipif(
    not all(_extension.has_kernel(op, "CPU") for op in ops.MODEL_OPS if op != "attention"),
    reason="ddt_fast._C with every fused model op is not built",
)
KERNEL = "rms_norm_modulate"  # the `device` fixture skips devices without it


def _model(name, seed=0):
    torch.manual_seed(seed)
    m = models.create(name)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _loss_and_grads(model, backend, autocast):
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.rand(3, generator=g)
    y = torch.tensor([1, 4, model.num_classes])
    x_t = t.view(-1, 1, 1, 1) * x0 + (1 - t.view(-1, 1, 1, 1)) * noise
    with ops.use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        v, s = model(x_t, t, y)
        loss = ((v.float() - (x0 - noise)) ** 2).mean()
    loss.backward()
    return v.detach().float(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DDT-tiny/2", "DDT-tiny-d72/2"])
def test_fused_and_reference_agree_fp32(name):
    m = _model(name)
    v_f, loss_f, g_f = _loss_and_grads(m, "fused", False)
    v_r, loss_r, g_r = _loss_and_grads(m, "reference", False)
    torch.testing.assert_close(v_f, v_r, atol=1e-5, rtol=1e-5)
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r)
    for n in g_r:
        scale = g_r[n].abs().max().item() + 1e-12
        torch.testing.assert_close(g_f[n] / scale, g_r[n] / scale, atol=2e-5, rtol=2e-5, msg=n)


def test_fused_and_reference_agree_bf16_autocast():
    """bf16 tolerance: relative L2 error of outputs and of every gradient under 2e-2."""
    m = _model("DDT-tiny-d72/2")
    v_f, loss_f, g_f = _loss_and_grads(m, "fused", True)
    v_r, loss_r, g_r = _loss_and_grads(m, "reference", True)
    rel = lambda a, b: ((a - b).norm() / (b.norm() + 1e-12)).item()
    assert rel(v_f, v_r) < 2e-2
    assert abs(loss_f - loss_r) < 2e-2 * abs(loss_r)
    worst = max((rel(g_f[n], g_r[n]), n) for n in g_r)
    assert worst[0] < 2.5e-2, worst


def test_cpu_auto_backend_uses_the_fused_kernels():
    plan = ops.plan("cpu")
    assert all(plan[op] == "fused" for op in ops.MODEL_OPS if op != "attention"), plan


@pytest.mark.slow
def test_torch_compile_fullgraph_with_fused_ops_cpu():
    m = _model("DDT-tiny/2")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad(), ops.use_backend("fused"):
        eager = m(x, t, y)[0]
        compiled = torch.compile(m, fullgraph=True)(x, t, y)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@on(CUDA)
def test_fused_and_reference_agree_bf16_autocast_cuda(device):
    m = _model("DDT-tiny-d72/2").to(device)
    inputs = model_inputs(3, device)
    (vf, gf), (vr, gr) = (autocast_run(m, inputs, device, backend=b) for b in ("fused", "reference"))
    assert ((vf - vr).norm() / vr.norm()) < 2e-2
    for n in gr:
        assert ((gf[n] - gr[n]).norm() / (gr[n].norm() + 1e-12)) < 5e-2, n


@on(CUDA)
def test_torch_compile_fullgraph_with_fused_ops_cuda(device):
    m = _model("DDT-tiny-d72/2").to(device)
    x, t, y = model_inputs(2, device)
    with torch.no_grad(), ops.use_backend("fused"):
        eager = m(x, t, y)[0]
        compiled = torch.compile(m, fullgraph=True)(x, t, y)[0]
    close(compiled, eager, torch.float32, 10.0)


@on(CUDA)
def test_cuda_graph_capture_and_replay_forward(device):
    m = _model("DDT-tiny-d72/2").to(device)
    static_x = torch.randn(2, 4, 16, 16, device=device)
    static_t, static_y = torch.rand(2, device=device), torch.tensor([1, 2], device=device)
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
