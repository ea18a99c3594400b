"""Where a store's bytes live: a local or shared directory, or an object-store URL (fsspec).

    loc = open_location("/cache/vermouth")                 # or "s3://bucket/cache", read_only=True
    loc.write_json("features/ab12/manifest.json", {...})   # whole or not at all
    loc.create("features/ab12/claims/000003.0.json", b"...")  # False if it already exists

Every write is atomic: a reader sees the old object, the new one, or none, never a part. On a
filesystem that is a temporary file in the same directory, fsynced, then renamed over the target
(vermouth_cache.core.atomic);
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
import stat
from pathlib import Path

from vermouth_cache.core.atomic import temp_beside
from vermouth_cache.core.errors import VermouthError

MAX_JSON_BYTES = 1 << 30  # no store JSON file is larger (a 14M-image dataset record is ~0.6 GiB)
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
        data = self.read_bytes(_check_key(key), limit=MAX_JSON_BYTES)  # FileNotFoundError when absent
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


class LocalLocation(Location):
    """A directory on a local or shared (NFS, Lustre, ...) filesystem."""

    def __init__(self, root: Path, *, read_only: bool = False):
        self.root = Path(root)
        self.url = str(self.root)
        self.read_only = read_only

    def path(self, key: str) -> Path:
        return self.root / _check_key(key) if key else self.root

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
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
            size = st.st_size
            if limit is not None and size > limit:
                raise VermouthError(f"store file {self.url}/{key} is {size} bytes, more than the {limit} it may hold")
            buf = bytearray(size)  # read straight into a writable buffer: numpy views it without a copy
            view, got = memoryview(buf), 0
            while got < size and (n := f.readinto(view[got:])):
                got += n
            return buf if got == size else buf[:got]

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
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

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
    writer's new shard must be seen by the next look.

    Every operation, and every read or write zarr makes through `zarr_store`, turns the errors of
    botocore, aiohttp and fsspec (no credentials, an endpoint that refuses or does not answer, a
    server gone mid-run, access denied) into one VermouthError naming the store and what failed
    (`remote_error`)."""

    def __init__(self, url: str, *, read_only: bool = False, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.read_only = read_only
        self.protocol = url.split("://", 1)[0]
        self.options = {**_env_storage_options(self.url), **(storage_options or {})}
        _check_options(self.url, self.protocol, self.options)
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url, use_listings_cache=False, skip_instance_cache=True,
                                                       **self.options)
        except (ImportError, ValueError, TypeError) as exc:
            raise VermouthError(f"cannot open store {url}: {exc}") from None
        self.base = self.base.rstrip("/")
        if not read_only and self.protocol not in SCHEMES_WITH_CREATE:
            raise VermouthError(f"store {url}: writing needs an atomic create-if-absent, which vermouth-cache "
                                f"supports on {', '.join(SCHEMES_WITH_CREATE)} (conditional PUT); open it "
                                "read-only, or use a shared filesystem path")

    def _p(self, key: str) -> str:
        return f"{self.base}/{_check_key(key)}" if key else self.base

    @property
    def endpoint(self) -> str | None:
        return _endpoint(self.options)

    def _remote(self, action: str, key: str):
        return _remote_errors(self.url, self.endpoint, action, key)

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        with self._remote("reading", key):
            try:
                return self.fs.cat_file(self._p(key), end=None if limit is None else limit + 1)
            except FileNotFoundError:
                raise
            except OSError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(key) from None
                raise VermouthError(f"cannot read {self.url}/{key}: {_one_line(exc)}") from None

    def _write(self, key: str, data: bytes) -> None:
        with self._remote("writing", key):
            try:
                self.fs.pipe_file(self._p(key), data)
            except OSError as exc:
                raise _remote_error(exc, self.url, self.endpoint, "writing", key) or space_error(
                    exc, f"{self.url}/{key}") from None

    def _create(self, key: str, data: bytes) -> bool:
        with self._remote("creating", key):
            try:
                self.fs.pipe_file(self._p(key), data, mode="create")
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    return False
                raise _remote_error(exc, self.url, self.endpoint, "creating", key) or space_error(
                    exc, f"{self.url}/{key}") from None

    def exists(self, key: str) -> bool:
        # info, not isfile: isfile answers False when the server cannot be reached
        with self._remote("looking up", key):
            try:
                return self.fs.info(self._p(key)).get("type") == "file"
            except FileNotFoundError:
                return False

    def list(self, prefix: str) -> list[str]:
        path = self._p(prefix)
        with self._remote("listing", prefix):
            try:
                items = self.fs.ls(path, detail=False, refresh=True)
            except FileNotFoundError:
                return []
        names = {posixpath.basename(str(p).rstrip("/")) for p in items}
        return sorted(n for n in names if n and not n.startswith(".") and n != posixpath.basename(path))

    def list_files(self, prefix: str) -> list[str]:
        path = self._p(prefix)
        with self._remote("listing", prefix):
            try:
                items = self.fs.ls(path, detail=True, refresh=True)
            except FileNotFoundError:
                return []
        names = {posixpath.basename(str(i["name"]).rstrip("/")) for i in items if i.get("type") == "file"}
        return sorted(n for n in names if n and not n.startswith("."))

    def size(self, key: str) -> int | None:
        with self._remote("looking up", key):
            try:
                return int(self.fs.info(self._p(key))["size"])
            except FileNotFoundError:
                return None

    def du(self, prefix: str) -> int:
        with self._remote("sizing", prefix):
            try:
                return int(self.fs.du(self._p(prefix), total=True))
            except FileNotFoundError:
                return 0

    def _delete(self, key: str) -> None:
        with self._remote("deleting", key):
            try:
                self.fs.rm_file(self._p(key))
            except FileNotFoundError:
                pass

    def _delete_prefix(self, prefix: str) -> None:
        with self._remote("deleting", prefix):
            try:
                self.fs.rm(self._p(prefix), recursive=True)
            except FileNotFoundError:
                pass

    def zarr_store(self, prefix: str):
        from zarr.storage import FsspecStore

        with self._remote("opening", prefix):
            plain = FsspecStore.from_url(self.join(prefix),
                                         storage_options={**self.options, "use_listings_cache": False},
                                         read_only=self.read_only)
        return _guarded_zarr_store(plain, self.url, self.endpoint, prefix)


# ---- remote errors: one line naming the store and what failed ---------------------------------------

def _endpoint(options: dict) -> str | None:
    return (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _remote_error(exc: BaseException, url: str, endpoint: str | None, action: str, key: str) -> VermouthError | None:
    """`exc` of botocore, aiohttp or fsspec as a one-line VermouthError, or None if it is none of
    theirs (a bug, a full local disk, ...: left as it is)."""
    if isinstance(exc, VermouthError):
        return exc
    what = f"{action} {key}" if key else action
    try:
        from botocore import exceptions as bx
    except ImportError:  # another fsspec backend: only the generic cases below
        bx = None
    chain = list(_chain(exc))
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    where = f"endpoint {endpoint}" if endpoint else "the endpoint"
    if bx is not None and isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return VermouthError(f"no credentials for {url} ({what}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                             "(or AWS_PROFILE), or key and secret in VERMOUTH_STORAGE_OPTIONS")
    if isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc):
        return VermouthError(f"store {url}: bad storage option ({_one_line(exc)}); check VERMOUTH_STORAGE_OPTIONS")
    timeout = (names & {"ConnectTimeoutError", "ReadTimeoutError", "TimeoutError", "ServerTimeoutError",
                        "FSTimeoutError", "ConnectTimeout", "socket.timeout"}) or isinstance(exc, TimeoutError)
    refused = any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in text \
        or "Could not connect to the endpoint URL" in text
    closed = names & {"ConnectionClosedError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
                      "IncompleteRead", "ConnectionResetError", "RemoteDisconnected"}
    if timeout or refused or closed or any(isinstance(e, ConnectionError) for e in chain) \
            or names & {"EndpointConnectionError", "ClientConnectorError", "HTTPClientError"}:
        how = ("did not answer in time" if timeout else "closed the connection" if closed and not refused
               else "refused the connection")
        return VermouthError(f"cannot reach {url} ({where} {how}, {what}); shards already written are kept: run "
                             "the same command again when the store is reachable")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "403" in text:
        return VermouthError(f"access to {url} denied ({what}): check the credentials and the bucket's policy")
    if (bx is not None and isinstance(exc, bx.BotoCoreError)) or names & {"ClientError", "ClientResponseError"} \
            or type(exc).__module__.split(".")[0] in ("aiohttp", "botocore", "aiobotocore", "s3fs", "fsspec"):
        return VermouthError(f"store {url}: {what} failed: {_one_line(exc)}")
    return None


class _remote_errors:
    """`with _remote_errors(url, endpoint, action, key):` turns remote errors into VermouthError;
    FileNotFoundError and FileExistsError, which callers handle, pass as they are."""

    def __init__(self, url: str, endpoint: str | None, action: str, key: str):
        self.args = (url, endpoint, action, key)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (FileNotFoundError, FileExistsError, VermouthError)) \
                or not isinstance(exc, Exception):
            return False
        url, endpoint, action, key = self.args
        err = _remote_error(exc, url, endpoint, action, key)
        if err is None:
            return False
        raise err from None


def _guarded_zarr_store(plain, url: str, endpoint: str | None, prefix: str):
    """`plain` (a zarr FsspecStore) whose reads and writes raise `_remote_error`s."""
    from zarr.storage import FsspecStore

    class GuardedFsspecStore(FsspecStore):
        def _guard(self, action: str, key: str):
            return _remote_errors(url, endpoint, action, f"{prefix}/{key}" if key else prefix)

        async def get(self, key, *a, **k):
            with self._guard("reading", key):
                return await super().get(key, *a, **k)

        async def get_partial_values(self, prototype, key_ranges):
            with self._guard("reading", prefix):
                return await super().get_partial_values(prototype, key_ranges)

        async def set(self, key, value, *a, **k):
            with self._guard("writing", key):
                return await super().set(key, value, *a, **k)

        async def delete(self, key):
            with self._guard("deleting", key):
                return await super().delete(key)

        async def exists(self, key):
            with self._guard("looking up", key):
                return await super().exists(key)

        async def getsize(self, key):
            with self._guard("looking up", key):
                return await super().getsize(key)

        def with_read_only(self, read_only: bool = False):
            return _guarded_zarr_store(super().with_read_only(read_only), url, endpoint, prefix)

    return GuardedFsspecStore(plain.fs, read_only=plain.read_only, path=plain.path,
                              allowed_exceptions=plain.allowed_exceptions)


def _check_options(url: str, protocol: str, options: dict) -> None:
    """Refuse an option the filesystem would only choke on at its first request (s3fs passes
    unknown ones on to botocore's session), naming it and the store."""
    if protocol not in ("s3", "s3a"):
        return
    try:
        import inspect

        import s3fs
        from aiobotocore.session import AioSession
        from fsspec.asyn import AsyncFileSystem
    except ImportError:
        return
    known = set()
    for fn in (s3fs.S3FileSystem.__init__, AioSession.__init__, AsyncFileSystem.__init__):
        known |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    known |= {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache", "batch_size"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise VermouthError(f"store {url}: unknown storage option {unknown[0]!r} in VERMOUTH_STORAGE_OPTIONS (s3 "
                            f"takes {', '.join(sorted(known - {'asynchronous', 'loop', 'session'}))})")


def _is_missing(exc: OSError) -> bool:
    return getattr(exc, "errno", None) == errno.ENOENT or "NoSuchKey" in str(exc) or "Not Found" in str(exc)


def _env_storage_options(url: str = "") -> dict:
    """VERMOUTH_STORAGE_OPTIONS: a JSON object passed to fsspec (e.g. an S3 endpoint_url)."""
    raw = os.environ.get("VERMOUTH_STORAGE_OPTIONS")
    if not raw:
        return {}
    store = f"store {url}: " if url else ""
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise VermouthError(f"{store}VERMOUTH_STORAGE_OPTIONS is not JSON: {exc}") from None
    if not isinstance(opts, dict):
        raise VermouthError(f"{store}VERMOUTH_STORAGE_OPTIONS must be a JSON object, e.g. "
                            '{"endpoint_url": "http://host:9000"}')
    return opts

