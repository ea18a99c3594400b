"""The store on an object store (s3://, gs://, ...) through fsspec: `FsspecLocation`.

    Store("s3://lab-bucket/vermouth")                     # endpoint and keys: env or VERMOUTH_STORAGE_OPTIONS
    Store("gs://lab-bucket/vermouth", read_only=True)     # any fsspec filesystem, for reading

A write is one PUT, which an object store applies whole. Writing needs the one compare-and-set
the claims rest on, a conditional PUT (`If-None-Match: *`), which vermouth-cache uses on S3 only
(`SCHEMES_WITH_CREATE`); other object stores open read-only. Listings are never cached: another
writer's new shard must be seen by the next look. Every failure of the remote side is one line
(`remote_errors`). S3 needs the `s3` extra (s3fs); without it, opening an s3:// store says so.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import posixpath

import fsspec
from fsspec.asyn import AsyncFileSystem
from zarr.storage import FsspecStore

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.errors import require
from vermouth_cache.store.location import Location, safe_key, space_error
from vermouth_cache.store.remote_errors import RemoteErrors, guarded_zarr_store, one_line, remote_error

SCHEMES_WITH_CREATE = ("s3", "s3a")  # object stores whose conditional PUT `create` relies on


class FsspecLocation(Location):
    """An object store (s3://, gs://, ...) through fsspec. Listings are never cached: another
    writer's new shard must be seen by the next look.

    Every operation, and every read or write zarr makes through `zarr_store`, turns the errors of
    botocore, aiohttp and fsspec (no credentials, an endpoint that refuses or does not answer, a
    server gone mid-run, access denied) into one VermouthError naming the store and what failed
    (`remote_error`)."""

    def __init__(self, url: str, *, read_only: bool = False, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.read_only = read_only
        self.protocol = url.split("://", 1)[0]
        if self.protocol in SCHEMES_WITH_CREATE:
            require("s3fs", f"store {self.url}")
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
        return f"{self.base}/{safe_key(key)}" if key else self.base

    @property
    def endpoint(self) -> str | None:
        return _endpoint(self.options)

    def _remote(self, action: str, key: str):
        return RemoteErrors(self.url, self.endpoint, action, key)

    def read_bytes(self, key: str, limit: int | None = None) -> bytes:
        with self._remote("reading", key):
            try:
                return self.fs.cat_file(self._p(key), end=None if limit is None else limit + 1)
            except FileNotFoundError:
                raise
            except OSError as exc:
                if _is_missing(exc):
                    raise FileNotFoundError(key) from None
                raise VermouthError(f"cannot read {self.url}/{key}: {one_line(exc)}") from None

    def _write(self, key: str, data: bytes) -> None:
        with self._remote("writing", key):
            try:
                self.fs.pipe_file(self._p(key), data)
            except OSError as exc:
                raise remote_error(exc, self.url, self.endpoint, "writing", key) or space_error(
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
                raise remote_error(exc, self.url, self.endpoint, "creating", key) or space_error(
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
        with self._remote("opening", prefix):
            plain = FsspecStore.from_url(self.join(prefix),
                                         storage_options={**self.options, "use_listings_cache": False},
                                         read_only=self.read_only)
        return guarded_zarr_store(plain, self.url, self.endpoint, prefix)



def _endpoint(options: dict) -> str | None:
    return (options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def _check_options(url: str, protocol: str, options: dict) -> None:
    """Refuse an option the filesystem would only choke on at its first request (s3fs passes
    unknown ones on to botocore's session), naming it and the store."""
    if protocol not in SCHEMES_WITH_CREATE:
        return
    # s3fs is optional (the `s3` extra, checked before this), and aiobotocore comes with it
    import s3fs
    from aiobotocore.session import AioSession

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
