"""Build ddt_fast._C: the C++ (CPU) kernels always, the CUDA kernels when possible.

Environment:
  DDT_FAST_BUILD_CUDA=0|1   force the CUDA part off / on (default: on when
                            PyTorch has CUDA and a toolkit is found)
  TORCH_CUDA_ARCH_LIST      archs to compile for (default "8.0;9.0a")
  CUDA_HOME                 toolkit root (the folder holding bin/nvcc, lib64/, include/)
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a"


def _toolkit_root_from_nvcc():
    """The toolkit root behind `nvcc` on the PATH.

    `nvcc` is often a wrapper script in /usr/local/bin; PyTorch then guesses
    CUDA_HOME one folder too high. We follow the wrapper to the real binary
    and accept a root only if it has include/cuda_runtime.h.
    """
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:  # a shell wrapper: `exec /path/to/cuda/bin/nvcc "$@"`
            with open(real, errors="ignore") as f:
                for tok in f.read(4096).split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"]
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None


def _setup_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return home
    root = _toolkit_root_from_nvcc()
    if root:
        os.environ["CUDA_HOME"] = root
    return root


# Must run before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
_cuda_home = _setup_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    force = os.environ.get("DDT_FAST_BUILD_CUDA")
    if force is not None and force not in ("0", "1"):
        sys.exit(f"DDT_FAST_BUILD_CUDA must be 0 or 1, got {force!r}")
    possible = torch.version.cuda is not None and _cuda_home is not None
    if force == "1" and not possible:
        why = (
            "PyTorch was built without CUDA"
            if torch.version.cuda is None
            else ("no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc and include/)")
        )
        sys.exit(f"DDT_FAST_BUILD_CUDA=1 but {why}.")
    if force == "0":
        return False
    return possible


def _cpu_arch_flags():
    """-march for the CPU kernels: `native` by default (a from-source build runs
    where it was built); DDT_FAST_CPU_ARCH=x86-64-v3 (or any -march value)
    targets other machines, DDT_FAST_CPU_ARCH= (empty) adds no flag."""
    arch = os.environ.get("DDT_FAST_CPU_ARCH", "native").strip()
    return [f"-march={arch}"] if arch else []


def _kernel_digest_module():
    """ddt_fast/_kernel_digest.py, loaded by path (the package itself imports
    torch and the extension this script is about to build)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_kernel_digest", os.path.join(ROOT, "ddt_fast", "_kernel_digest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_kernel_digests(kd, folder):
    """The digests of the CUDA sources about to be compiled, as a generated
    header the extension embeds (rewritten only when they change, so an
    unchanged tree rebuilds nothing)."""
    text = kd.header_text(kd.op_digests(kd.tree_reader(ROOT)))
    path = os.path.join(folder, "ddt_fast_kernel_digests.h")
    os.makedirs(folder, exist_ok=True)
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _version():
    ns = {}
    with open(os.path.join(ROOT, "ddt_fast", "_version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _extension():
    with_cuda = _want_cuda()
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/torch/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fno-trapping-math / -fno-math-errno: no FP traps or errno are relied on,
    # and without them GCC will not vectorise clamps, floor or sqrt.
    cxx = [
        "-O3",
        "-std=c++20",
        "-fopenmp",
        "-DDDT_FAST_HAVE_OPENMP",
        "-fno-trapping-math",
        "-fno-math-errno",
    ] + _cpu_arch_flags()
    link = ["-fopenmp"]
    if not with_cuda:
        print("ddt_fast: building the CPU extension only", file=sys.stderr)
        return CppExtension(
            "ddt_fast._C", cpu_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"ddt_fast: building CPU + CUDA ({_cuda_home}, archs {archs})", file=sys.stderr)
    # The arch list travels as one pp-number token (no quotes or semicolons,
    # which the ninja shell line would mangle); csrc/torch stringifies it.
    arch_token = "_".join(a for a in archs.replace(";", " ").split())
    cxx += ["-DDDT_FAST_WITH_CUDA", f"-DDDT_FAST_CUDA_ARCHS={arch_token}"]
    # The nvcc flags are part of each op's kernel digest (ddt_fast/_kernel_digest.py),
    # which the extension embeds so that `auto` can match it against GPU-verified code.
    kd = _kernel_digest_module()
    nvcc = list(kd.NVCC_FLAGS)
    generated = os.path.join(ROOT, "build", "generated")
    _write_kernel_digests(kd, generated)
    return CUDAExtension(
        "ddt_fast._C",
        cpu_sources + cuda_sources,
        include_dirs=include_dirs + [generated],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    version=_version(),
    packages=find_packages(include=["ddt_fast", "ddt_fast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
