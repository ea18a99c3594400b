"""The errors of a remote store as one line naming the store and what failed.

botocore, aiobotocore, aiohttp and fsspec raise dozens of exception types, several levels deep,
for a handful of situations a user can act on: no credentials, an endpoint that refuses or does
not answer, a connection lost mid-run, access denied, a bad storage option. `remote_error` maps
an exception (and its causes) to one of those as a VermouthError; anything else (a bug, a full
local disk) is left as it is. `RemoteErrors` applies it around a block, and `guarded_zarr_store`
around every read and write zarr makes, so a lost connection during a chunk write reads the same
as one during a manifest read.
"""

from __future__ import annotations

from zarr.storage import FsspecStore

from vermouth_cache.core.errors import VermouthError


def one_line(exc: BaseException) -> str:
    """An exception's text on one line of at most 300 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def remote_error(exc: BaseException, url: str, endpoint: str | None, action: str, key: str) -> VermouthError | None:
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
        return VermouthError(f"store {url}: bad storage option ({one_line(exc)}); check VERMOUTH_STORAGE_OPTIONS")
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
        return VermouthError(f"store {url}: {what} failed: {one_line(exc)}")
    return None


class RemoteErrors:
    """`with RemoteErrors(url, endpoint, action, key):` turns remote errors into VermouthError;
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
        err = remote_error(exc, url, endpoint, action, key)
        if err is None:
            return False
        raise err from None


def guarded_zarr_store(plain, url: str, endpoint: str | None, prefix: str):
    """`plain` (a zarr FsspecStore) whose reads and writes raise `remote_error`s."""

    class GuardedFsspecStore(FsspecStore):
        def _guard(self, action: str, key: str):
            return RemoteErrors(url, endpoint, action, f"{prefix}/{key}" if key else prefix)

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
            return guarded_zarr_store(super().with_read_only(read_only), url, endpoint, prefix)

    return GuardedFsspecStore(plain.fs, read_only=plain.read_only, path=plain.path,
                              allowed_exceptions=plain.allowed_exceptions)
