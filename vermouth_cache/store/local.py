"""The store on a local or shared filesystem (NFS, Lustre, ...): a directory of plain files.

A write goes to a temporary file beside its target (`.<name>.<random>.tmp`, fsynced; see
vermouth_cache.core.atomic) which is then renamed over the target, so a reader sees the old file
or the new one. `create` links the finished temporary file to its name instead: `link(2)` fails
when the name exists, atomically, on NFS too. A writer killed mid-write leaves only temporary
files, which no reader opens and `debris` lists for `repair` to remove.

Reads refuse what is not a regular file (a FIFO or a device planted in a store would hang or
never end) and never load more than the caller says an object may hold.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from pathlib import Path

from zarr.storage import LocalStore

from vermouth_cache.core.atomic import temp_beside
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.location import Location, safe_key, space_error


class LocalLocation(Location):
    """A directory on a local or shared (NFS, Lustre, ...) filesystem."""

    def __init__(self, root: Path, *, read_only: bool = False):
        self.root = Path(root)
        self.url = str(self.root)
        self.read_only = read_only

    def path(self, key: str) -> Path:
        return self.root / safe_key(key) if key else self.root

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        with self._open_regular(key, limit) as (f, size):
            buf = bytearray(size)  # read straight into a writable buffer: numpy views it without a copy
            got = _read_fully(f, memoryview(buf))
        return buf if got == size else buf[:got]

    def read_into(self, key: str, buffer) -> memoryview:
        view = memoryview(buffer).cast("B")
        with self._open_regular(key, view.nbytes) as (f, size):
            return view[:_read_fully(f, view[:size])]

    @contextlib.contextmanager
    def _open_regular(self, key: str, limit: int | None):
        """(unbuffered file, size) of a regular file of at most `limit` bytes; FileNotFoundError when
        absent, VermouthError for anything else (a FIFO, a device, a file over the limit)."""
        try:  # O_NONBLOCK: a FIFO planted in a store must not hang the open
            fd = os.open(self.path(key), os.O_RDONLY | os.O_NONBLOCK)
        except (IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(key) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            if stat.S_ISDIR(st.st_mode):
                raise FileNotFoundError(key)
            raise VermouthError(f"store file {self.url}/{key} is not a regular file")  # /dev/zero, a FIFO ...
        with os.fdopen(fd, "rb", buffering=0) as f:
            if limit is not None and st.st_size > limit:
                raise VermouthError(f"store file {self.url}/{key} is {st.st_size} bytes, more than the {limit} it may hold")
            yield f, st.st_size

    def _write_temp(self, key: str, data: bytes) -> Path:
        """`data` in a finished, fsynced temporary file beside the target, mode 0666 less the
        umask (vermouth_cache.core.atomic); OSError (a full disk) as is."""
        return temp_beside(self.path(key), data)

    def _temp_or_error(self, key: str, data: bytes) -> Path:
        try:
            return self._write_temp(key, data)
        except OSError as exc:
            raise space_error(exc, f"{self.url}/{key}") from None

    def _write(self, key: str, data: bytes) -> None:
        tmp = self._temp_or_error(key, data)
        if self.path(key).is_dir() and not self.path(key).is_symlink():
            self._delete(key)  # a folder where the file goes is damage; the write replaces it
        try:
            os.replace(tmp, self.path(key))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _create(self, key: str, data: bytes) -> bool:
        tmp = self._temp_or_error(key, data)
        try:
            os.link(tmp, self.path(key))  # atomic, and fails if the target exists, on NFS too
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        try:
            return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def list_files(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        return [n for n in self.list(prefix) if (folder / n).is_file()]

    def size(self, key: str) -> int | None:
        try:
            st = self.path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def du(self, prefix: str) -> int:
        folder = self.path(prefix)
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0

    def _delete(self, key: str) -> None:
        path = self.path(key)
        if path.is_dir() and not path.is_symlink():  # a folder where a chunk or record should be
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def _delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def debris(self, prefix: str, older_than: float = 0.0) -> list[str]:
        folder, now, out = self.path(prefix), time.time(), []
        for p in folder.rglob("*") if folder.is_dir() else ():
            temp = (p.name.startswith(".") and p.name.endswith(".tmp")) or p.name.endswith(".partial")
            if temp and p.is_file() and now - p.stat().st_mtime >= older_than:
                out.append(str(p.relative_to(self.root)))
        return sorted(out)

    def zarr_store(self, prefix: str):
        return LocalStore(str(self.path(prefix)), read_only=self.read_only)


def _read_fully(f, view: memoryview) -> int:
    """Bytes read into `view` until it is full or the file ends (it may shrink while being read)."""
    got = 0
    while got < len(view) and (n := f.readinto(view[got:])):
        got += n
    return got
