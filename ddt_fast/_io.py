"""Crash-safe file writes and file integrity.

Every file ddt_fast writes goes through `atomic_write`: the content is written
to a temporary file in the target's folder, flushed to disk, given the
permissions a plain `open(path, "w")` would give (the process umask), then
renamed to the target. A crash never leaves a half-written file in place of
a good one; what it can leave is a temporary file, which `remove_stale_temps`
deletes when the output is next resumed.

Whether an existing target may be replaced is a decision of every caller
(`overwrite=`): user-facing outputs refuse unless the user asked, derived
files of a resumable output (a manifest, an index) are rewritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from typing import Callable, Iterable, List

_TEMP_SUFFIX = ".tmp"
# mkstemp's names: "." + target name + "." + 8 random characters + ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: the usual set-and-restore
    os.umask(mask)
    return mask


def exists_error(path: str, what: str = "", hint: str = "pass overwrite=True to replace it") -> FileExistsError:
    """The one message for a refused overwrite."""
    return FileExistsError(
        f"{what + ' ' if what else ''}{path} exists; nothing is overwritten without asking: "
        f"{hint}, or choose another path"
    )


def atomic_write(path: "os.PathLike[str] | str", write: Callable[[str], None], *, overwrite: bool) -> None:
    """Call `write(tmp_path)` to produce the content, then move it to `path`.

    overwrite: replace an existing `path`; when False an existing `path`
    raises FileExistsError (checked again at the rename, so a file that
    appears meanwhile is not replaced either)."""
    path = os.fspath(path)
    if not overwrite and os.path.lexists(path):
        raise exists_error(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=_TEMP_SUFFIX, dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_exclusive(tmp, path)
        _fsync_dir(folder)
    except FileExistsError:
        _remove_quietly(tmp)
        raise exists_error(path) from None
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_text(path: "os.PathLike[str] | str", text: str, *, overwrite: bool) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write, overwrite=overwrite)


def _move_exclusive(tmp: str, path: str) -> None:
    """Rename `tmp` to `path` unless `path` exists, atomically where the file
    system has hard links (a file that appears meanwhile is not replaced)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network and FUSE file systems): check, then rename
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def _fsync_dir(folder: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_stale_temps(folder: str, targets: Iterable[str] = ()) -> List[str]:
    """Delete the temporary files that killed `atomic_write` calls left in
    `folder` (only those of the given target names, when any are given);
    returns what was deleted. Call it only while no other process writes there."""
    if not os.path.isdir(folder):
        return []
    wanted = set(targets)
    removed = []
    for name in sorted(os.listdir(folder)):
        m = _TEMP_NAME.match(name)
        if m and (not wanted or m.group("target") in wanted):
            path = os.path.join(folder, name)
            _remove_quietly(path)
            removed.append(path)
    return removed


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (one sequential read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# checksum sidecars: `NAME.sha256` beside `NAME`, one `sha256sum` line

CHECKSUM_SUFFIX = ".sha256"


def checksum_path(path: str) -> str:
    """The sidecar of `path`: `path + ".sha256"`."""
    return os.fspath(path) + CHECKSUM_SUFFIX


def read_checksum(path: str) -> "str | None":
    """The hex digest `path`'s sidecar records; None when there is no sidecar.
    ValueError when the sidecar is not a `sha256sum` line for `path`."""
    side = checksum_path(path)
    try:
        with open(side) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)\n?", text)
    if not m or m.group(2) != os.path.basename(path):
        raise ValueError(f"{side} is not a sha256sum line for {os.path.basename(path)}")
    return m.group(1)


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def atomic_write_checked(path: "os.PathLike[str] | str", write: Callable[[str], None], *, overwrite: bool) -> str:
    """`atomic_write` plus a sidecar `path.sha256` (what `sha256sum NAME`
    prints: digest, two spaces, file name; `sha256sum -c` checks it), written
    before `path` is renamed into place: a file without its sidecar was never
    written by this function. Returns the digest. When the write fails, the
    sidecar is what it was before (removed when `path` does not exist)."""
    path = os.fspath(path)
    side = checksum_path(path)
    try:
        with open(side, "rb") as f:
            previous = f.read()
    except FileNotFoundError:
        previous = None
    digest: List[str] = []

    def write_and_hash(tmp: str) -> None:
        write(tmp)
        digest.append(sha256_file(tmp))  # what reached the file system, read back
        atomic_write_text(side, f"{digest[0]}  {os.path.basename(path)}\n", overwrite=True)

    try:
        atomic_write(path, write_and_hash, overwrite=overwrite)
    except BaseException:
        if digest:  # the sidecar was replaced but `path` was not: put the old one back
            try:
                if previous is None or not os.path.exists(path):
                    _remove_quietly(side)
                else:
                    atomic_write(side, lambda tmp: _write_bytes(tmp, previous), overwrite=True)
            except Exception:  # best effort: the write's own error is the one to report
                pass
        raise
    return digest[0]
