"""Digests of the CUDA sources behind each op's kernels.

A CUDA kernel is trusted on a GPU only as the code that passed the GPU tests.
The digest of an op covers what makes its kernels: the `.cu` files, every
project header they include (followed recursively), and the nvcc flags that
change code. Comments, trailing blanks and blank lines are left out, so a
reworded comment keeps a kernel verified; any change to the code does not.

setup.py computes the digests of the sources it compiles and embeds them in
the extension (`ddt_fast._C.build_info()["cuda_kernel_digests"]`);
`ddt_fast/gpu_verified.json` records the digests that passed on a GPU. This
module uses the standard library only, so setup.py can load it before
PyTorch or the package exist.

    python -m ddt_fast._kernel_digest [--commit REV]   # digests of the tree or of a commit
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from typing import Callable, Dict, List, Optional, Tuple

# op -> the .cu files whose kernels it runs (paths from the repository root).
KERNEL_SOURCES: Dict[str, Tuple[str, ...]] = {
    "rms_norm_modulate": ("csrc/cuda/norm_modulate.cu",),
    "layer_norm_modulate": ("csrc/cuda/norm_modulate.cu",),
    "gated_residual": ("csrc/cuda/norm_modulate.cu",),
    "gated_residual_rms_norm_modulate": ("csrc/cuda/norm_modulate.cu",),
    "swiglu": ("csrc/cuda/swiglu.cu",),
    "qk_norm_rope": ("csrc/cuda/qk_norm_rope.cu",),
    "flash_attention": ("csrc/cuda/attention.cu",),
    "qkv_attention": ("csrc/cuda/attention.cu",),
    "dp_schedule_solve": ("csrc/cuda/dp_schedule.cu",),
}

# Where `#include "..."` is looked up after the including file's own folder.
INCLUDE_DIRS = ("csrc/include",)

# The nvcc flags of the CUDA sources (setup.py passes exactly these). All are
# part of every digest: a flag that changes code changes what was verified.
NVCC_FLAGS: Tuple[str, ...] = (
    "-O3",
    "-std=c++20",
    "-lineinfo",
    "-DDDT_FAST_WITH_CUDA",
    "--expt-relaxed-constexpr",
    "-Xptxas=-warn-spills",
)

Reader = Callable[[str], Optional[str]]  # repository path -> text, None if absent

_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
# A comment, or a string/char literal (kept whole, so "//" inside one is not a comment).
_COMMENT_OR_LITERAL = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'',
    re.DOTALL,
)


def normalize(text: str) -> str:
    """The code of a C++/CUDA source: comments removed (a block comment
    becomes one space), trailing blanks and blank lines dropped."""

    def keep_literals(m: re.Match) -> str:
        s = m.group(0)
        if s.startswith("//"):
            return ""
        if s.startswith("/*"):
            return " "
        return s

    code = _COMMENT_OR_LITERAL.sub(keep_literals, text)
    return "\n".join(line.rstrip() for line in code.splitlines() if line.strip()) + "\n"


def source_closure(read: Reader, path: str) -> List[str]:
    """`path` and every project header it includes, recursively (sorted)."""
    seen: Dict[str, None] = {}
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        text = read(current)
        if text is None:
            raise FileNotFoundError(f"{current}: a CUDA kernel source is missing")
        seen[current] = None
        here = os.path.dirname(current)
        for name in _INCLUDE.findall(text):
            for folder in (here,) + INCLUDE_DIRS:
                candidate = os.path.normpath(os.path.join(folder, name))
                if read(candidate) is not None:
                    todo.append(candidate)
                    break
            # not found in the project: a toolkit or system header, not ours
    return sorted(seen)


def op_digest(read: Reader, op: str, flags: Tuple[str, ...] = NVCC_FLAGS) -> str:
    """The SHA-256 (hex) of op's kernel sources and the nvcc flags."""
    h = hashlib.sha256()
    h.update(("flags " + " ".join(flags) + "\n").encode())
    files = sorted({f for cu in KERNEL_SOURCES[op] for f in source_closure(read, cu)})
    for path in files:
        h.update(f"file {path}\n".encode())
        h.update(normalize(read(path)).encode())
    return h.hexdigest()


def op_digests(read: Reader, flags: Tuple[str, ...] = NVCC_FLAGS) -> Dict[str, str]:
    return {op: op_digest(read, op, flags) for op in KERNEL_SOURCES}


def tree_reader(root: str) -> Reader:
    """Reads files of the working tree under `root`."""
    cache: Dict[str, Optional[str]] = {}

    def read(path: str) -> Optional[str]:
        if path not in cache:
            try:
                with open(os.path.join(root, path), encoding="utf-8") as f:
                    cache[path] = f.read()
            except FileNotFoundError:
                cache[path] = None
        return cache[path]

    return read


def git_reader(root: str, commit: str) -> Reader:
    """Reads files as they were at `commit` of the git repository at `root`."""
    cache: Dict[str, Optional[str]] = {}

    def read(path: str) -> Optional[str]:
        if path not in cache:
            out = subprocess.run(["git", "-C", root, "show", f"{commit}:{path}"], capture_output=True, text=True)
            cache[path] = out.stdout if out.returncode == 0 else None
        return cache[path]

    return read


def header_text(digests: Dict[str, str]) -> str:
    """The generated C++ header setup.py writes: the digests as one string
    constant, "op=hex;op=hex;..." (parsed by ddt_fast.ops.verified)."""
    joined = ";".join(f"{op}={d}" for op, d in sorted(digests.items()))
    return (
        "// Generated by setup.py from ddt_fast/_kernel_digest.py: the digest of each\n"
        "// op's CUDA sources as compiled into this extension. Do not edit.\n"
        "#pragma once\n"
        f'#define DDT_FAST_KERNEL_DIGESTS "{joined}"\n'
    )


def parse_digests(joined: str) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in joined.split(";") if "=" in item)


def main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="Digests of each op's CUDA kernel sources.")
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--commit", default=None, help="digest the sources of this commit instead of the tree")
    args = p.parse_args(argv)
    read = git_reader(args.root, args.commit) if args.commit else tree_reader(args.root)
    print(json.dumps(op_digests(read), indent=1))


if __name__ == "__main__":
    main()
