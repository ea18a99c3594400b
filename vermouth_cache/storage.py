"""Where a store's bytes live: a local or shared directory, or an object-store URL (fsspec).

    loc = open_location("/cache/vermouth")                 # or "s3://bucket/cache", read_only=True
    loc.write_json("features/ab12/manifest.json", {...})   # whole or not at all
    loc.create("features/ab12/claims/000003.0.json", b"...")  # False if it already exists

Every write is atomic: a reader sees the old object, the new one, or none, never a part. On a
filesystem that is a temporary file in the same directory, fsynced, then renamed over the target
(vermouth_cache.atomic);
on an object store a single PUT. `create` is the one compare-and-set the claims need: `link(2)`
of a finished temporary file on a filesystem (atomic on NFS too, unlike O_EXCL on NFSv2 and
unlike `flock`, which NFS may ignore), a conditional PUT (`If-None-Match: *`) on S3.

Keys are relative POSIX paths ("kind/key/file"); a key never starts with "/" or holds "..".
"""

from __future__ import annotations

import abc
import errno
import json
import os
import posixpath
from pathlib import Path

from .atomic import temp_beside
from .errors import VermouthError

SCHEMES_WITH_CREATE = ("s3", "s3a")  # object stores whose conditional PUT `create` relies on


class StoreFull(VermouthError):
    """The device or bucket refused a write for lack of space (or quota)."""


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def open_location(path: str | os.PathLike, *, read_only: bool = False,
                  storage_options: dict | None = None) -> "Location":
    """A local path (or file:// URL) or an fsspec URL such as s3://bucket/prefix."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_url(text):
        return FsspecLocation(text, read_only=read_only, storage_options=storage_options)
    return LocalLocation(Path(text), read_only=read_only)


def _check_key(key: str) -> str:
    if key.startswith("/") or ".." in key.split("/"):
        raise ValueError(f"bad store key {key!r}")
    return key


def space_error(exc: OSError, where: str) -> VermouthError:
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
    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when absent."""

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
        self._writable(_check_key(key))
        self._write(key, data)

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; True when this call created it."""
        self._writable(_check_key(key))
        return self._create(key, data)

    def delete(self, key: str) -> None:
        self._writable(_check_key(key))
        self._delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self._writable(_check_key(prefix))
        self._delete_prefix(prefix)

    def read_json(self, key: str):
        data = self.read_bytes(_check_key(key))  # FileNotFoundError when absent
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VermouthError(f"corrupt store file {self.url}/{key}: {exc}") from None

    def write_json(self, key: str, obj) -> None:
        self.write_bytes(key, _json_bytes(obj))

    def create_json(self, key: str, obj) -> bool:
        return self.create(key, _json_bytes(obj))

    def join(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class LocalLocation(Location):
    """A directory on a local or shared (NFS, Lustre, ...) filesystem."""

    def __init__(self, root: Path, *, read_only: bool = False):
        self.root = Path(root)
        self.url = str(self.root)
        self.read_only = read_only

    def path(self, key: str) -> Path:
        return self.root / _check_key(key) if key else self.root

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(key) from None

    def _write_temp(self, key: str, data: bytes) -> Path:
        """`data` in a finished, fsynced temporary file beside the target, mode 0666 less the
        umask (vermouth_cache.atomic); OSError (a full disk) as is."""
        return temp_beside(self.path(key), data)

    def _temp_or_error(self, key: str, data: bytes) -> Path:
        try:
            return self._write_temp(key, data)
        except OSError as exc:
            raise space_error(exc, f"{self.url}/{key}") from None

    def _write(self, key: str, data: bytes) -> None:
        tmp = self._temp_or_error(key, data)
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

    def size(self, key: str) -> int | None:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            return None

    def du(self, prefix: str) -> int:
        folder = self.path(prefix)
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0

    def _delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def _delete_prefix(self, prefix: str) -> None:
        import shutil

        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def debris(self, prefix: str, older_than: float = 0.0) -> list[str]:
        import time

        folder, now, out = self.path(prefix), time.time(), []
        for p in folder.rglob("*") if folder.is_dir() else ():
            temp = (p.name.startswith(".") and p.name.endswith(".tmp")) or p.name.endswith(".partial")
            if temp and p.is_file() and now - p.stat().st_mtime >= older_than:
                out.append(str(p.relative_to(self.root)))
        return sorted(out)

    def zarr_store(self, prefix: str):
        from zarr.storage import LocalStore

        return LocalStore(str(self.path(prefix)), read_only=self.read_only)


class FsspecLocation(Location):
    """An object store (s3://, gs://, ...) through fsspec. Listings are never cached: another
    writer's new shard must be seen by the next look."""

    def __init__(self, url: str, *, read_only: bool = False, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.read_only = read_only
        self.protocol = url.split("://", 1)[0]
        self.options = {**_env_storage_options(), **(storage_options or {})}
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url, use_listings_cache=False, skip_instance_cache=True,
                                                       **self.options)
        except (ImportError, ValueError) as exc:
            raise VermouthError(f"cannot open store {url}: {exc}") from None
        self.base = self.base.rstrip("/")
        if not read_only and self.protocol not in SCHEMES_WITH_CREATE:
            raise VermouthError(f"store {url}: writing needs an atomic create-if-absent, which vermouth-cache "
                                f"supports on {', '.join(SCHEMES_WITH_CREATE)} (conditional PUT); open it "
                                "read-only, or use a shared filesystem path")

    def _p(self, key: str) -> str:
        return f"{self.base}/{_check_key(key)}" if key else self.base

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._p(key))
        except FileNotFoundError:
            raise
        except OSError as exc:
            if _is_missing(exc):
                raise FileNotFoundError(key) from None
            raise VermouthError(f"cannot read {self.url}/{key}: {exc}") from None

    def _write(self, key: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(key), data)
        except OSError as exc:
            raise space_error(exc, f"{self.url}/{key}") from None

    def _create(self, key: str, data: bytes) -> bool:
        try:
            self.fs.pipe_file(self._p(key), data, mode="create")
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                return False
            raise space_error(exc, f"{self.url}/{key}") from None

    def exists(self, key: str) -> bool:
        try:
            return self.fs.isfile(self._p(key))
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        path = self._p(prefix)
        try:
            items = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(p).rstrip("/")) for p in items}
        return sorted(n for n in names if n and not n.startswith(".") and n != posixpath.basename(path))

    def size(self, key: str) -> int | None:
        try:
            return int(self.fs.info(self._p(key))["size"])
        except FileNotFoundError:
            return None

    def du(self, prefix: str) -> int:
        try:
            return int(self.fs.du(self._p(prefix), total=True))
        except FileNotFoundError:
            return 0

    def _delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._p(key))
        except FileNotFoundError:
            pass

    def _delete_prefix(self, prefix: str) -> None:
        try:
            self.fs.rm(self._p(prefix), recursive=True)
        except FileNotFoundError:
            pass

    def zarr_store(self, prefix: str):
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.join(prefix), storage_options={**self.options, "use_listings_cache": False},
                                    read_only=self.read_only)


def _is_missing(exc: OSError) -> bool:
    return getattr(exc, "errno", None) == errno.ENOENT or "NoSuchKey" in str(exc) or "Not Found" in str(exc)


def _env_storage_options() -> dict:
    """VERMOUTH_STORAGE_OPTIONS: a JSON object passed to fsspec (e.g. an S3 endpoint_url)."""
    raw = os.environ.get("VERMOUTH_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise VermouthError(f"VERMOUTH_STORAGE_OPTIONS is not JSON: {exc}") from None
    if not isinstance(opts, dict):
        raise VermouthError("VERMOUTH_STORAGE_OPTIONS must be a JSON object")
    return opts

