"""Small helpers shared by tests: the devices of the op tests, damaging files,
a tiny DDT, a tiny VAE."""

import pytest
import torch

from ddt_fast import models

# The devices of the op tests (tests/test_op_*.py), the values of the `device`
# fixture (tests/conftest.py): the CPU, and CUDA marked `cuda`, so that
# `pytest -m cuda` selects exactly the GPU cases (skipped without a GPU).
CPU = "cpu"
CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
DEVICES = [CPU, CUDA]


def on(*devices):
    """Run a test on these devices only, e.g. `@on(CUDA)` for a GPU-only path;
    without it a test taking `device` runs on every device in DEVICES."""
    return pytest.mark.parametrize("device", list(devices), indirect=True)


def offset_view(t, offset):
    """t's values in storage shifted by `offset` elements (offset 1: rows no
    longer 16-byte aligned, the CUDA kernels' packed paths no longer apply)."""
    if offset == 0:
        return t
    flat = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = flat[offset:].view(t.shape)
    view.copy_(t)
    return view


def loss_grads(fn, inputs, seed=1):
    """fn's outputs and the gradients of its floating-point inputs under a random
    linear loss (fixed seed): copies of `inputs` are the leaves."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs).backward()
    return [o.detach() for o in outs], [t.grad for t in inputs if t.is_floating_point()]


def model_inputs(batch, device, size=16):
    """(x, t, y) for a DDT-tiny model on `device`: latents [batch, 4, size, size],
    times in [0, 1), classes (batch <= 3)."""
    return (
        torch.randn(batch, 4, size, size, device=device),
        torch.rand(batch, device=device),
        torch.tensor([1, 2, 10][:batch], device=device),
    )


def autocast_run(model, inputs, device, **backend):
    """The output v (as float32) and every parameter's gradient of one bfloat16
    autocast forward of `model` under ops.use_backend(**backend), loss mean(v^2)."""
    from ddt_fast import ops

    model.zero_grad()
    with ops.use_backend(**backend), torch.autocast(device, dtype=torch.bfloat16):
        v, _ = model(*inputs)
    v.float().square().mean().backward()
    return v.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def flip_bytes(path, offsets) -> None:
    """Invert the bytes of `path` at `offsets` (a bit-rot or transfer error)."""
    with open(path, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


def tiny_model(seed: int = 0):
    """DDT-tiny/2 with its zero-initialised layers perturbed, so every block matters."""
    torch.manual_seed(seed)
    m = models.create("DDT-tiny/2")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def tiny_vae(seed: int = 0):
    """A randomly initialised two-level `diffusers.AutoencoderKL` (16 px images, 4 latent
    channels); skips the calling test when diffusers is not installed."""
    import pytest

    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )


def fresh_process_outputs(script, path, env):
    """Run `script` (which saves a dict of CPU tensors to argv[1]) in a new
    process with `env` added, from the repository root with tests/ importable,
    and load what it saved: for the GPU benchmark switches inside the
    GPU-verified CUDA code, which the extension reads once per process."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'tests')\n" + script, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, **env),
        cwd=root,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(path)
