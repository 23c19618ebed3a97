"""The build: extension present, CUDA compiled where a toolkit exists, info() truthful."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import ddt_fast
from ddt_fast import _extension
from ddt_fast._fatbin import gpu_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_BUILD_EXPECTED = (
    torch.version.cuda is not None
    and shutil.which("nvcc") is not None
    and os.environ.get("DDT_FAST_BUILD_CUDA", "1") != "0"
)


def test_extension_is_built_and_loaded():
    assert _extension.available(), f"ddt_fast._C failed to load: {_extension.load_error()}"
    report = ddt_fast.info()
    assert report["extension"] is True and report["build"]["openmp"] is True
    assert report["build"]["torch_version"] == torch.__version__.split("+")[0]


@pytest.mark.skipif(not CUDA_BUILD_EXPECTED, reason="no CUDA toolkit or CPU-only PyTorch")
def test_cuda_part_compiled_for_default_archs():
    report = ddt_fast.info()
    build = report["build"]
    assert build["with_cuda"] is True
    assert build["cuda_runtime_version"] // 1000 == int(torch.version.cuda.split(".")[0])
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    assert build["cuda_archs"] == wanted.replace(";", " ").split()
    # What the linker really kept, read from the .so itself.
    archs = {img.arch for img in gpu_images(_extension._C.__file__) if img.kind == "cubin"}
    if wanted == "8.0;9.0a":
        assert {"sm_80", "sm_90a"} <= archs, archs


@pytest.mark.skipif(not CUDA_BUILD_EXPECTED, reason="no CUDA toolkit or CPU-only PyTorch")
def test_attention_kernels_linked_for_each_arch():
    """The flash-attention forward, dQ and dK/dV kernels for bf16 and f16 and
    head dims 64, 72 and 128 are in the library for every requested arch."""
    wanted = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a").replace(";", " ").split()
    by_arch = {}
    for img in gpu_images(_extension._C.__file__):
        if img.kind == "cubin":
            by_arch.setdefault(img.arch, []).extend(k for k in img.kernels if "attention_cu" in k)
    for arch in wanted:
        sm = "sm_" + arch.replace(".", "")
        names = by_arch.get(sm, [])
        for kernel in ("forward_kernel", "dq_kernel", "dkdv_kernel", "delta_kernel"):
            for dtype in ("bf16_t", "f16_t"):
                for dim in (64, 72, 128) if kernel != "delta_kernel" else (None,):
                    mangled = f"{len(dtype)}{dtype}E"  # 6bf16_tE, 5f16_tE
                    tag = mangled if dim is None else f"{mangled}Li{dim}E"
                    assert any(kernel in n and tag in n for n in names), (sm, kernel, dtype, dim)
    assert {"flash_attention", "flash_attention_backward", "qkv_attention"} <= set(_extension.registered_ops())
    for op in ("flash_attention", "flash_attention_backward", "qkv_attention"):
        assert _extension.has_kernel(op, "CUDA") and not _extension.has_kernel(op, "CPU")


@pytest.mark.slow
def test_fatbin_reader_on_a_freshly_compiled_object(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not available")
    src = tmp_path / "k.cu"
    src.write_text("__global__ void probe_kernel(float* x) { x[threadIdx.x] *= 2.f; }\n")
    obj = tmp_path / "k.o"
    subprocess.run(
        [
            nvcc,
            "-c",
            str(src),
            "-o",
            str(obj),
            "-gencode",
            "arch=compute_80,code=sm_80",
            "-gencode",
            "arch=compute_90a,code=sm_90a",
            "-gencode",
            "arch=compute_90,code=compute_90",
        ],
        check=True,
    )
    images = gpu_images(str(obj))
    assert [(i.kind, i.arch) for i in images] == [("cubin", "sm_80"), ("cubin", "sm_90a"), ("ptx", "sm_90")]
    assert images[0].kernels == ("_Z12probe_kernelPf",)


@pytest.mark.slow
def test_import_without_extension_uses_reference_and_logs_once():
    code = (
        "import sys, logging, io\n"
        "sys.modules['ddt_fast._C'] = None\n"  # makes `import ddt_fast._C` fail
        "stream = io.StringIO(); logging.basicConfig(stream=stream, level=logging.WARNING)\n"
        "import torch, ddt_fast\n"
        "import ddt_fast.ops\n"
        "m = ddt_fast.create('DDT-tiny/2')\n"
        "v, s = m(torch.randn(1, 4, 4, 4), torch.rand(1), torch.tensor([1]))\n"
        "info = ddt_fast.info()\n"
        "assert info['extension'] is False and 'kernels' not in info\n"
        "assert ddt_fast.ops.plan('cpu')['rms_norm_modulate'] == 'reference'\n"
        "print(stream.getvalue().count('compiled extension not available'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


@pytest.mark.slow
def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "ddt_fast", "info", "--json"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    report = json.loads(out.stdout)
    assert report["ddt_fast"] == ddt_fast.__version__
