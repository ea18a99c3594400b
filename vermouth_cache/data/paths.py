"""The path rules every dataset loader applies: a dataset reads only its own tree, and a path the
OS refuses is one line naming it.

A sample id is a relative POSIX path under the image root (`safe_id`); absolute paths and ".."
are refused. Symbolic links are followed only while they stay inside the root (`check_inside`),
so `evil.png -> /etc/passwd` or a class directory linked from elsewhere is refused when the
dataset is listed, never silently dropped or read. Paths are made absolute lexically
(`abspath`), so a symlinked dataset keeps the paths the user gave.
"""

from __future__ import annotations

import errno
import os
import posixpath
from pathlib import Path, PurePosixPath, PureWindowsPath

from vermouth_cache.core.errors import VermouthError


def short_path(p) -> str:
    """A path for a one-line message: very long ones keep their ends and say how long they are."""
    p = str(p)
    return p if len(p) <= 200 else f"{p[:80]}...{p[-80:]} ({len(p)} characters)"


def abspath(p: str | Path) -> Path:
    # abspath normalises ".." lexically without resolving symlinks, so a symlinked dataset
    # keeps the paths the user gave.
    return Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def path_exists(p: Path, what: str) -> bool:
    """Path.exists, but a name the OS refuses (too long, no permission) is one line naming it."""
    try:
        os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(p):
            raise VermouthError(f"{what} {short_path(p)} is a broken symbolic link (to {os.readlink(p)})") from None
        return False
    except OSError as e:
        why = e.strerror or str(e)
        if e.errno == errno.ENAMETOOLONG:
            why += f" (a component of {max(len(c.encode()) for c in Path(p).parts)} bytes)"
        raise VermouthError(f"{what} {short_path(p)}: cannot access: {why}") from None
    except ValueError as e:  # an embedded NUL byte
        raise VermouthError(f"{what} {short_path(p)}: {e}") from None
    return True


def check_inside(root_real: str, p: Path, where: str, what: str = "image") -> None:
    """Refuse `p` if it is a broken symbolic link or one (or a linked directory on its way) that
    leads out of the root whose realpath is `root_real`: a dataset reads only its own tree."""
    real = os.path.realpath(p)
    if not os.path.exists(real):
        if os.path.islink(p):
            raise VermouthError(f"{where}: {what} {short_path(p)} is a broken symbolic link (to {os.readlink(p)})")
        raise VermouthError(f"{where}: {what} not found: {short_path(p)}")
    if real != root_real and os.path.commonpath([root_real, real]) != root_real:
        raise VermouthError(f"{where}: {what} {short_path(p)} is a symbolic link leading outside the "
                            f"image root {root_real} (to {short_path(real)})")


def safe_id(raw, where: str) -> str:
    """Normalise a relative path to a POSIX id; refuse absolute paths and escapes from the root."""
    if not isinstance(raw, str) or not raw.strip():
        raise VermouthError(f"{where}: path must be a non-empty string, got {raw!r}")
    if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).drive or raw.startswith("\\"):
        raise VermouthError(f"{where}: absolute path refused: {short_path(raw)}")
    if ".." in PurePosixPath(raw).parts:
        raise VermouthError(f"{where}: path escapes the image root: {short_path(raw)}")
    return posixpath.normpath(raw)  # "./a//b.jpg" and "a/b.jpg" are the same sample


def existing_file(root: Path, rel: str, where: str, what: str = "image") -> Path:
    """root / rel, refused (one line naming `where`) unless it is a file inside the root."""
    path = root / rel
    try:
        ok = path.is_file()
    except OSError as e:  # e.g. ENAMETOOLONG: a path component longer than the filesystem allows
        why = e.strerror or str(e)
        if e.errno == errno.ENAMETOOLONG:
            why += f" (a component of {max(len(c.encode()) for c in path.parts)} bytes)"
        raise VermouthError(f"{where}: cannot access {what} {short_path(rel)}: {why}") from None
    if not ok or os.path.islink(path) or _linked(root, rel):
        check_inside(os.path.realpath(root), path, where, what)
    if not ok:
        raise VermouthError(f"{where}: {what} not found: {short_path(path)}")
    return path


def _linked(root: Path, rel: str) -> bool:
    """Whether a directory on the way from root to root / rel is a symbolic link."""
    parts = PurePosixPath(rel).parts[:-1]
    return any(os.path.islink(root.joinpath(*parts[:i + 1])) for i in range(len(parts)))
