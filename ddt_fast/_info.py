"""ddt_fast.info(): what was built and which path each op will take."""

from __future__ import annotations

from typing import Any, Dict

import torch

from ddt_fast import _extension
from ddt_fast._version import __version__


def _gpu_image_summary(path: str) -> Dict[str, Any]:
    """arch -> number of kernels, for the cubins really linked into `path`."""
    from ddt_fast._fatbin import gpu_images

    try:
        images = gpu_images(path)
    except (OSError, ValueError) as e:
        return {"error": str(e)}
    summary: Dict[str, Any] = {}
    for image in images:
        key = image.arch if image.kind == "cubin" else f"{image.arch} (ptx)"
        summary[key] = summary.get(key, 0) + len(image.kernels)
    return summary


def info() -> Dict[str, Any]:
    """Build and runtime report: versions, compiled kernels and archs, devices."""
    report: Dict[str, Any] = {
        "ddt_fast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension": _extension.available(),
    }
    if not _extension.available():
        report["extension_error"] = _extension.load_error()
    else:
        build = dict(_extension._C.build_info())
        archs = build.pop("cuda_archs", "")
        build["cuda_archs"] = [a for a in archs.split("_") if a]
        build.pop("cuda_kernel_digests", None)  # shown per op under cuda_kernels
        build["gpu_images"] = _gpu_image_summary(_extension._C.__file__)
        report["build"] = build
        report["kernels"] = {
            op: {key.lower(): _extension.has_kernel(op, key) for key in ("CPU", "CUDA")}
            for op in _extension.registered_ops()
        }
    from ddt_fast.ops import plan

    report["backend"] = {
        "ops": _dispatch_state(),
        "cpu_plan": plan(torch.device("cpu")),
    }
    if torch.cuda.is_available():
        report["backend"]["cuda_plan"] = plan(torch.device("cuda"))
    from ddt_fast.ops import verified

    # Per CUDA kernel: whether `auto` may use it on a GPU, and why (ops/verified.py).
    report["cuda_kernels"] = {}
    for op in sorted(verified.KERNEL_SOURCES):
        st = verified.status(op)
        digest = verified.built_digests().get(op)
        where = f" [{digest[:12]}]" if digest else ""
        slower = f"; auto leaves it off: {verified.SLOWER_ON_GPU[op]}" if op in verified.SLOWER_ON_GPU else ""
        report["cuda_kernels"][op] = f"{st.state}{where}: {st.reason}{slower}"
    report["cuda_devices"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return report


def _dispatch_state() -> Dict[str, str]:
    from ddt_fast.ops import dispatch

    return dict(dispatch.current()._asdict())
