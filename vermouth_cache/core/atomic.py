"""The one way vermouth-cache writes a local file that others may read while it is written.

    atomic_write(path, b"...")                                  # bytes
    atomic_write(path, write=lambda tmp: fig.savefig(tmp))      # a library that writes to a path
    atomic_create(path, b"...")                                 # False if `path` already exists

The data goes to a temporary file in the target's directory (`.<name>.<random>.tmp`, created with
O_EXCL so two writers never share one), is fsynced, then renamed over the target (or linked to
it, for `atomic_create`: `link(2)` fails if the target exists, on NFS too). A reader sees the old
file, the new one, or none, never a part. The file gets the permissions `open()` would give it,
0666 less the process umask (0644 under the usual 022, 0600 under 077), never mkstemp's 0600:
run directories, exports and reports are meant to be read by a team.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_create", "atomic_write", "atomic_write_json", "commit", "honour_umask", "temp_beside"]


def temp_beside(target: str | os.PathLike, data: bytes | None = None, *,
                write: Callable[[str], None] | None = None, suffix: str = ".tmp") -> Path:
    """A finished, fsynced temporary file beside `target` holding `data` (or what `write(path)`
    wrote there; empty with neither, for the caller to fill and `commit`). The caller renames or
    links it into place; on any error it is removed and the error (an OSError for a full disk,
    say) propagates as is."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{suffix}")
        try:
            # 0o666: the kernel takes the umask off, exactly as for open(path, "w")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if data is not None:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if write is not None:
            write(str(tmp))  # the library reopens (truncates) the file: its mode stays
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def process_umask() -> int:
    """This process's umask, read without changing it (Linux /proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: str | os.PathLike) -> None:
    """Give every file below `root` the mode open() would have given it, 0666 less the umask:
    for files a library wrote its own way (safetensors' save_file makes them 0600)."""
    mode = 0o666 & ~process_umask()
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)


def commit(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Fsync a temporary file from `temp_beside` that the caller filled itself, and rename it
    over `target`."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)


def atomic_write(target: str | os.PathLike, data: bytes | str | None = None, *,
                 write: Callable[[str], None] | None = None, suffix: str = ".tmp") -> None:
    """Replace `target` whole with `data` (str is written as UTF-8) or with what `write(tmp_path)` writes."""
    if (data is None) == (write is None):
        raise TypeError("atomic_write takes data or write=, not both")
    if isinstance(data, str):
        data = data.encode("utf-8")
    target = Path(target)
    tmp = temp_beside(target, data, write=write, suffix=suffix)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_create(target: str | os.PathLike, data: bytes) -> bool:
    """Create `target` holding `data` only if it does not exist; True when this call created it."""
    target = Path(target)
    tmp = temp_beside(target, data)
    try:
        os.link(tmp, target)  # atomic, and fails if the target exists, on NFS too
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def atomic_write_json(target: str | os.PathLike, obj) -> None:
    """`obj` as indented, key-sorted JSON (the format of every JSON file vermouth-cache writes)."""
    atomic_write(target, json.dumps(obj, indent=1, sort_keys=True))


def output_directory(out: str | os.PathLike, what: str) -> Path:
    """`out` as a Path for a directory a command will write, refused in one line when it (or a
    parent) exists and is not a directory, or when the nearest existing parent is not writable."""
    from vermouth_cache.core.errors import VermouthError

    out = Path(out)
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is" if p == out else f"is inside {p}, which is"
                raise VermouthError(f"{what} {out} {where} not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise VermouthError(f"cannot write {what} {out}: {p} is not writable")
            break
    return out
