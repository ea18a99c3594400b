"""Shard writes in one background thread, so the models never wait for encoding, checksums and files.

Writing a shard is NaN-filling, encoding (codec, CRC32C) and a file per chunk, then its record:
on a GPU that is time the device would sit idle. `ShardWriter` runs the writes in one thread, in
the order they were submitted, while the next model call computes. What is written is the same
call with the same arrays either way (`background=False` runs it in place), so a store's bytes
never depend on it.

A write that fails raises in the extractor's thread at its next submission or at `drain`; a claim
taken over while a write was queued (`LostClaim`) is collected in `lost`, for the extractor to
retry the shard. At most `depth` writes wait at once, each holding one array's shard in memory.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class ShardWriter:
    def __init__(self, *, background: bool, lost_error: type[Exception], depth: int = 8):
        """`lost_error`: what a write raises when its claim was taken over (the shard is then retried)."""
        self.background, self.depth, self._lost_error = background, depth, lost_error
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vermouth-cache-write") if background else None
        self._pending: deque[Future] = deque()
        self._lock = threading.Lock()
        self.lost: set[int] = set()  # shards whose claim was taken over before a write committed
        self.waited = 0.0  # seconds the extractor waited for a free place in the queue

    def submit(self, shard: int, write: Callable[[], None]) -> None:
        """Run `write()` now (in place) or in the writer thread after every write submitted before."""
        if self._pool is None:
            self._run(shard, write)
            return
        t0 = time.perf_counter()
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
            self._pending.popleft().result()  # re-raises a failed write here, in the extractor's thread
        self.waited += time.perf_counter() - t0
        self._pending.append(self._pool.submit(self._run, shard, write))

    def after(self, fn: Callable[[], None]) -> None:
        """Run `fn()` once every write submitted so far has run (a claim released after its shard's writes)."""
        if self._pool is None:
            fn()
        else:
            self._pending.append(self._pool.submit(fn))

    def _run(self, shard: int, write: Callable[[], None]) -> None:
        if shard in self.lost:
            return  # its claim is gone: the writer that took it over commits the shard
        try:
            write()
        except self._lost_error:
            with self._lock:
                self.lost.add(shard)

    def drain(self) -> None:
        """Wait for every queued write; the first failure raises (after all have run)."""
        first = None
        while self._pending:
            try:
                self._pending.popleft().result()
            except BaseException as exc:  # noqa: BLE001 - kept, re-raised once the queue is empty
                first = first or exc
        if first is not None:
            raise first

    def take_lost(self) -> set[int]:
        with self._lock:
            lost, self.lost = self.lost, set()
        return lost

    def close(self, *, raise_errors: bool = True) -> None:
        """Drain and stop the thread; `raise_errors=False` when another error is already on its way."""
        try:
            self.drain()
        except BaseException:
            if raise_errors:
                raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
