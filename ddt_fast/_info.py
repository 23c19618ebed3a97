"""ddt_fast.info(): what was built and which path each op will take."""
from __future__ import annotations

from typing import Any, Dict

import torch

from ddt_fast import _extension
from ddt_fast._version import __version__


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
        report["build"] = build
        report["kernels"] = {
            op: {key.lower(): _extension.has_kernel(op, key) for key in ("CPU", "CUDA")}
            for op in _extension.registered_ops()
        }
    report["cuda_devices"] = [
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
    ] if torch.cuda.is_available() else []
    return report
