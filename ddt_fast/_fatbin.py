"""What GPU code a built shared library really contains.

Reads the `.nv_fatbin` section of an ELF shared object (no CUDA toolkit or
GPU needed) and lists each embedded image: its kind (cubin or PTX), its arch
(`sm_80`, `sm_90a`, ...) and, for uncompressed cubins, the kernel names. The
build records the arch list it was asked for; this tells what the linker
actually kept.
"""

from __future__ import annotations

import struct
from typing import List, NamedTuple

_FATBIN_MAGIC = 0xBA55ED50
_KIND = {1: "ptx", 2: "cubin"}
_ARCH_SPECIFIC = 0x100000  # entry flag for sm_XXa (arch-specific features)


class GpuImage(NamedTuple):
    kind: str  # "cubin" or "ptx"
    arch: str  # e.g. "sm_90a"
    kernels: tuple  # mangled kernel names (cubins stored uncompressed only)


def _elf_sections(data: bytes):
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = headers[shstrndx][4]

    def name(n):
        end = data.index(b"\0", names_off + n)
        return data[names_off + n : end].decode()

    return {name(h[0]): (h[4], h[5]) for h in headers}


def _cubin_kernels(elf: bytes) -> tuple:
    try:
        sections = _elf_sections(elf)
    except (ValueError, struct.error, IndexError):
        return ()
    return tuple(sorted(n[len(".text.") :] for n in sections if n.startswith(".text.")))


def gpu_images(path: str) -> List[GpuImage]:
    """Every GPU image embedded in the shared library at `path`."""
    with open(path, "rb") as f:
        data = f.read()
    sections = _elf_sections(data)
    if ".nv_fatbin" not in sections:
        return []
    start, size = sections[".nv_fatbin"]
    blob = data[start : start + size]
    images: List[GpuImage] = []
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, header_size, fat_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != _FATBIN_MAGIC:
            pos += 8  # fatbins are 8-byte aligned and may be padded apart
            continue
        entry, end = pos + header_size, pos + header_size + fat_size
        while entry < end:
            kind, _v, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch, flags = struct.unpack_from("<I", blob, entry + 28)[0], struct.unpack_from("<I", blob, entry + 40)[0]
            body = blob[entry + entry_header : entry + entry_header + payload]
            name = f"sm_{arch}" + ("a" if flags & _ARCH_SPECIFIC else "")
            kernels = _cubin_kernels(body) if kind == 2 and body[:4] == b"\x7fELF" else ()
            images.append(GpuImage(_KIND.get(kind, f"kind{kind}"), name, kernels))
            entry += entry_header + payload
        pos = end
    return images
