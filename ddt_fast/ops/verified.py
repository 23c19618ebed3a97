"""Which CUDA kernels `auto` may use: the ones whose code passed the GPU tests.

The machines this library is built on often have no GPU, so a CUDA kernel can
compile long before it first runs, or change after it last ran. Verification
is therefore bound to the code: the extension embeds, per op, a digest of the
CUDA sources it was compiled from (ddt_fast/_kernel_digest.py), and
`gpu_verified.json` in this package records the digests whose `cuda` tests
passed on a GPU (GPU, date, torch and CUDA versions, the suite). On CUDA
devices the `auto` backend uses an op's kernel only when its built digest
matches a record; otherwise the op takes the reference path and `status(op)`
(shown by `ddt-fast info`) says why. `DDT_FAST_BACKEND=fused` still forces
the kernels, for testing.

On a GPU machine, the GPU suite (benchmarks/gpu_suite.sh) records every op
whose tests passed:

    python -m ddt_fast.ops.verified record --junit results.xml --suite "pytest -m cuda"
    python -m ddt_fast.ops.verified            # the status of every op
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

from ddt_fast import _extension
from ddt_fast._kernel_digest import KERNEL_SOURCES, parse_digests

__all__ = [
    "KERNEL_SOURCES",
    "RECORDS_FILE",
    "SLOWER_ON_GPU",
    "Record",
    "Status",
    "records",
    "built_digests",
    "status",
    "is_verified",
    "auto_on_gpu",
    "add_records",
    "ops_passed",
]

RECORDS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gpu_verified.json")

# Verified kernels that `auto` still leaves off on CUDA because the GPU
# benchmarks measured them slower than what they replace (op -> why). They
# stay available through DDT_FAST_BACKEND=fused / DDT_FAST_ATTENTION=ddt.
SLOWER_ON_GPU: Dict[str, str] = {
    "flash_attention": "below SDPA's cuDNN kernels on an H200 and about level with its flash kernel "
    "(benchmarks/results/attention_nvidia_h200.json, nvidia_h200_notes.md); the fused "
    "qkv_attention, which also fuses the q/k norm and rotary, is used for sampling instead",
}


class Record(NamedTuple):
    """One op's CUDA sources (by digest) passing the `cuda` tests on a GPU."""

    op: str
    digest: str
    gpu: str
    date: str
    torch: str
    cuda: str
    suite: str
    commit: str


class Status(NamedTuple):
    op: str
    state: str  # "verified" | "changed" (verified code, since edited) | "unverified" | "not built"
    reason: str
    record: Optional[Record]  # the matching record, or the newest one of a changed op


def _load_records(path: str) -> Tuple[Record, ...]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:  # an installation without the data file: nothing is verified
        return ()
    return tuple(Record(**row) for row in data["records"])


def records(path: str = RECORDS_FILE) -> Tuple[Record, ...]:
    """Every verification record in `path` (the package's gpu_verified.json)."""
    return _load_records(path)


def built_digests() -> Dict[str, str]:
    """op -> digest of the CUDA sources compiled into the loaded extension
    (empty without the extension or without its CUDA part)."""
    if not _extension.available():
        return {}
    return parse_digests(str(_extension._C.build_info().get("cuda_kernel_digests", "")))


def _status(op: str, built: Dict[str, str], recs: Iterable[Record], has_cuda_kernel: bool = False) -> Status:
    mine = sorted((r for r in recs if r.op == op), key=lambda r: r.date)
    digest = built.get(op)
    if digest is None and has_cuda_kernel:  # an extension built before digests were embedded
        return Status(op, "unverified", "built without a source digest: rebuild to match it", None)
    if digest is None:
        return Status(op, "not built", "no CUDA kernel in this build", mine[-1] if mine else None)
    match = [r for r in mine if r.digest == digest]
    if match:
        r = match[-1]
        return Status(op, "verified", f"verified on {r.gpu} at {r.date} (commit {r.commit}, {r.suite})", r)
    if mine:
        r = mine[-1]
        return Status(
            op, "changed", f"changed since verified on {r.gpu} at {r.date} (commit {r.commit}): not GPU-tested", r
        )
    return Status(op, "unverified", "never verified on a GPU", None)


def _compute_statuses(path: str = RECORDS_FILE) -> Dict[str, Status]:
    built, recs = built_digests(), records(path)
    return {op: _status(op, built, recs, _extension.has_kernel(op, "CUDA")) for op in KERNEL_SOURCES}


# Decided once at import (a plain dict, so torch.compile can trace the dispatch
# decisions that read it); tests replace it through `_set_statuses`.
_STATUSES: Dict[str, Status] = _compute_statuses()


def _set_statuses(statuses: Dict[str, Status]) -> Dict[str, Status]:
    """Replace the statuses (tests); returns the previous ones."""
    global _STATUSES
    previous, _STATUSES = _STATUSES, dict(statuses)
    return previous


def status(op: str) -> Status:
    """Whether the built CUDA kernel of `op` is GPU-verified, and why (not)."""
    if op not in _STATUSES:
        raise ValueError(f"{op!r} has no CUDA kernel; kernels: {', '.join(sorted(KERNEL_SOURCES))}")
    return _STATUSES[op]


def is_verified(op: str) -> bool:
    return op in _STATUSES and _STATUSES[op].state == "verified"


def auto_on_gpu(op: str) -> bool:
    """Whether `auto` dispatch uses the CUDA kernel of `op`: verified and not measured slower."""
    return is_verified(op) and op not in SLOWER_ON_GPU


def ops_passed(junit_xml: str) -> List[str]:
    """The ops all of whose `cuda` tests passed in a pytest JUnit report. A test
    counts for an op when the op's name is in its file name or its name
    (tests/test_op_<family>.py covers the family's ops); an op with a failed or
    errored test, or no test at all, is not returned."""
    import xml.etree.ElementTree as ET

    passed: Dict[str, bool] = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        where = f"{case.get('classname', '')}.{case.get('name', '')}"
        failed = any(child.tag in ("failure", "error") for child in case)
        skipped = any(child.tag == "skipped" for child in case)
        if skipped:
            continue
        for op in _ops_of_test(where):
            passed[op] = passed.get(op, True) and not failed
    return sorted(op for op, ok in passed.items() if ok)


# Test families -> the ops whose kernels they run (beyond the op's own name).
_FAMILY_OPS = {
    "norm_modulate": ("rms_norm_modulate", "layer_norm_modulate", "gated_residual", "gated_residual_rms_norm_modulate"),
    "attention": ("flash_attention", "qkv_attention"),
    "dp_schedule": ("dp_schedule_solve",),
    "schedule": ("dp_schedule_solve",),
}


def _ops_of_test(where: str) -> List[str]:
    found = {op for op in KERNEL_SOURCES if op in where}
    for family, ops in _FAMILY_OPS.items():
        if f"test_op_{family}" in where or f"test_{family}." in where:
            found.update(ops)
    return sorted(found)


def add_records(ops: Iterable[str], suite: str, path: str = RECORDS_FILE, commit: str = "") -> List[Record]:
    """Record the loaded extension's CUDA kernels of `ops` as verified on this
    machine's GPU (after their `cuda` tests passed). Returns the new records."""
    import torch

    from ddt_fast._io import atomic_write_text

    if not torch.cuda.is_available():
        raise RuntimeError("recording a GPU verification needs a CUDA device; none is visible")
    built = built_digests()
    missing = sorted(set(ops) - set(built))
    if missing:
        raise ValueError(f"no CUDA kernel built for {', '.join(missing)}: build with CUDA first")
    existing = list(records(path))
    new = []
    for op in sorted(set(ops)):
        rec = Record(
            op=op,
            digest=built[op],
            gpu=torch.cuda.get_device_name(),
            date=datetime.date.today().isoformat(),
            torch=torch.__version__,
            cuda=str(torch.version.cuda),
            suite=suite,
            commit=commit,
        )
        if not any(r.op == op and r.digest == rec.digest and r.gpu == rec.gpu for r in existing):
            new.append(rec)
    rows = [r._asdict() for r in existing + new]
    atomic_write_text(path, json.dumps({"records": rows}, indent=1) + "\n", overwrite=True)
    return new


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ddt_fast.ops.verified", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="record the built kernels whose cuda tests passed")
    rec.add_argument("--junit", help="pytest --junitxml report of the cuda suite")
    rec.add_argument("--ops", help="comma-separated ops instead of --junit")
    rec.add_argument("--suite", required=True, help="what passed, e.g. 'pytest -m cuda: 480 passed'")
    rec.add_argument("--commit", default="", help="the git commit that was tested")
    args = p.parse_args(argv)
    if args.command == "record":
        if bool(args.junit) == bool(args.ops):
            p.error("give exactly one of --junit and --ops")
        ops = ops_passed(args.junit) if args.junit else [o for o in args.ops.split(",") if o]
        unknown = sorted(set(ops) - set(KERNEL_SOURCES))
        if unknown:
            p.error(f"unknown op(s) {', '.join(unknown)}; kernels: {', '.join(sorted(KERNEL_SOURCES))}")
        for r in add_records(ops, args.suite, commit=args.commit):
            print(f"recorded {r.op} {r.digest[:12]} on {r.gpu}")
        return 0
    for op in sorted(KERNEL_SOURCES):
        s = status(op)
        print(f"{op:34s} {s.state:10s} {s.reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
