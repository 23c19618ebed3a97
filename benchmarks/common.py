"""Shared benchmark plumbing: timing, machine facts, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def timed(
    fn: Callable[[], object], repeats: int = 10, warmup: int = 2, cuda: bool = False, flush_l2: bool = False
) -> Dict[str, float]:
    """Median and min wall time of `fn()` (CUDA events on a GPU; optionally
    flushing L2 before each run so large working sets are measured from HBM)."""
    for _ in range(warmup):
        fn()
    scratch = torch.empty(256 * 1024 * 1024 // 4, device="cuda") if (cuda and flush_l2) else None
    times = []
    for _ in range(repeats):
        if cuda:
            if scratch is not None:
                scratch.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def timed_interleaved(
    fns: Dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 2, cuda: bool = False
) -> Dict[str, Dict[str, float]]:
    """Time several implementations of one thing in rotation (A B C A B C ...),
    so slow drifts of a shared machine hit them alike. Returns, per name, the
    median and the minimum; on a noisy machine the minimum is the steadier
    estimate of what the code costs."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "repeats": repeats} for name, t in times.items()}


def machine_info(device: Optional[torch.device] = None) -> dict:
    """Where and when a result was measured (taken before the runs, so the load
    average shows other work on the machine)."""
    import numpy as np

    import ddt_fast

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = None
    if device is not None and torch.device(device).type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # DDT_FAST_GIT_COMMIT: for copies of the tree without .git (e.g. a GPU box)
        "git_commit": os.environ.get("DDT_FAST_GIT_COMMIT") or _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ddt_fast": ddt_fast.__version__,
        "extension": ddt_fast._extension.available(),
        # the DDT_FAST_* settings in force (docs/backends-and-kernels.md, "Options")
        "ddt_fast_env": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith("DDT_FAST_") and k != "DDT_FAST_GIT_COMMIT"
        },
    }


def random_model(name: str, device, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised DDT preset in eval mode, every parameter perturbed
    (so the zero-initialised final layer is not zero and the outputs move)."""
    from ddt_fast import models

    torch.manual_seed(seed)
    model = models.create(name)
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    return model.to(device=device, dtype=dtype).eval()


def device_tag(device: torch.device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_").lower()
    return "cpu"


def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def result_path(name: str) -> str:
    return os.path.join(RESULTS, name)


def write_json(path: str, payload: dict) -> str:
    """Write `payload` to `path` (crash-safe: temporary file, then rename). A benchmark's
    result file is its own output, replaced by each run (the published ones are in git)."""
    from ddt_fast._io import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=1) + "\n", overwrite=True)
    return path
