"""Shared benchmark plumbing: timing, machine facts, result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def timed(fn: Callable[[], object], repeats: int = 10, warmup: int = 2,
          cuda: bool = False, flush_l2: bool = False) -> Dict[str, float]:
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


def machine_info(device: Optional[torch.device] = None) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def device_tag(device: torch.device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_").lower()
    return "cpu"


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_json(name: str, payload: dict) -> str:
    """Write `payload` to benchmarks/results/<name> via a temporary file and rename."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix="." + name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
