"""Where a store's bytes live: the `Location` interface every storage backend implements.

    loc = Store("/cache/vermouth").loc                     # a LocalLocation; "s3://bucket/cache": an FsspecLocation
    loc.write_json("features/ab12/manifest.json", {...})   # whole or not at all
    loc.create("features/ab12/claims/000003.0.json", b"...")  # False if it already exists

Every write is atomic: a reader sees the old object, the new one, or none, never a part. On a
filesystem that is a temporary file in the same directory, fsynced, then renamed over the target
(`local`, through vermouth_cache.core.atomic); on an object store a single PUT (`remote`).
`create` is the one compare-and-set the claims need: `link(2)` of a finished temporary file on a
filesystem (atomic on NFS too, unlike O_EXCL on NFSv2 and unlike `flock`, which NFS may ignore),
a conditional PUT (`If-None-Match: *`) on S3.

Keys are relative POSIX paths ("kind/key/file"); a key never starts with "/" or holds "..".

Adding a storage backend (say, an object store with its own conditional create): a subclass of
`Location` in a module of its own that implements the abstract methods below, as `local.py` and
`remote.py` do, and its URL scheme in `entries.open_location`. Nothing else in the store changes:
entries, claims, verify and gc only ever talk to a `Location`.
"""

from __future__ import annotations

import abc
import errno
import json
import os

from vermouth_cache.core.errors import VermouthError

MAX_JSON_BYTES = 1 << 30  # no store JSON file is larger (a 14M-image dataset record is ~0.6 GiB)


class StoreFull(VermouthError):
    """The device or bucket refused a write for lack of space (or quota)."""


def safe_key(key: str) -> str:
    """`key` itself, if it is a relative path that stays inside the store; else ValueError."""
    if key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"bad store key {key!r}")
    return key


def space_error(exc: OSError, where: str) -> VermouthError:
    """A failed write as one line: StoreFull for a full disk or quota, else what the OS said."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreFull(f"no space left writing {where} ({os.strerror(exc.errno)}): free space and run the same "
                         "command again; finished shards are kept")
    return VermouthError(f"cannot write {where}: {exc}")


class Location(abc.ABC):
    """The operations the store needs, on one root."""

    url: str
    read_only: bool

    def __str__(self) -> str:
        return self.url

    # -- implemented by subclasses -------------------------------------------------------------
    @abc.abstractmethod
    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        """The object's bytes; FileNotFoundError when absent. An object over `limit` bytes is refused
        (VermouthError) or cut to `limit` + 1 bytes, never loaded whole: a caller that knows the
        size an object must have never reads a huge one."""

    @abc.abstractmethod
    def _write(self, key: str, data: bytes) -> None:
        ...

    @abc.abstractmethod
    def _create(self, key: str, data: bytes) -> bool:
        ...

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        ...

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Names directly below `prefix` (files and folders), sorted; [] when there is none."""
        ...

    @abc.abstractmethod
    def list_files(self, prefix: str) -> list[str]:
        """Names of the objects (not folders) directly below `prefix`, sorted."""
        ...

    @abc.abstractmethod
    def size(self, key: str) -> int | None:
        ...

    @abc.abstractmethod
    def du(self, prefix: str) -> int:
        """Bytes stored below `prefix`."""
        ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None:
        ...

    @abc.abstractmethod
    def _delete_prefix(self, prefix: str) -> None:
        ...

    @abc.abstractmethod
    def zarr_store(self, prefix: str):
        """A zarr v3 store rooted at `prefix`."""
        ...

    def debris(self, prefix: str, older_than: float = 0.0) -> list[str]:
        """Temporary files killed writers left below `prefix` (an object store has none)."""
        return []

    # -- shared --------------------------------------------------------------------------------
    def check_writable(self, key: str) -> None:
        self._writable(key)

    def _writable(self, key: str) -> None:
        if self.read_only:
            raise VermouthError(f"store {self.url} is open read-only; cannot write {key}")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._writable(safe_key(key))
        self._write(key, data)

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; True when this call created it."""
        self._writable(safe_key(key))
        return self._create(key, data)

    def delete(self, key: str) -> None:
        self._writable(safe_key(key))
        self._delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self._writable(safe_key(prefix))
        self._delete_prefix(prefix)

    def read_into(self, key: str, buffer) -> memoryview | bytes:
        """The object's bytes, read into the start of the writable `buffer` where the backend can (a
        filesystem: the result is a view of it), else as `read_bytes` returns them; an object over
        the buffer's size is refused or cut as `read_bytes` does with that limit. A reader of many
        chunks reuses its buffers instead of faulting in fresh pages for each."""
        return self.read_bytes(key, limit=memoryview(buffer).nbytes)

    def read_json(self, key: str):
        data = self.read_bytes(safe_key(key), limit=MAX_JSON_BYTES)  # FileNotFoundError when absent
        if len(data) > MAX_JSON_BYTES:  # an object store's ranged read stops one byte past the limit
            raise VermouthError(f"corrupt store file {self.url}/{key}: over {MAX_JSON_BYTES >> 20} MiB")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, or nested past Python's limit
            raise VermouthError(f"corrupt store file {self.url}/{key}: {str(exc)[:200]}") from None

    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, _json_bytes(obj))

    def create_json(self, key: str, obj) -> bool:
        return self.create(key, _json_bytes(obj))

    def join(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
