"""Training batches of cached features, served to the heads straight from a vermouth-cache store.

    from vermouth_cache.train.loader import CacheLoader, Field
    from vermouth_cache.store.entries import Store

    feats = Store("cache/store").find("features", "3f2a")          # one timestep's features
    ok = [i for i, s in enumerate(feats.statuses("mid")) if s == "ok"]
    loader = CacheLoader({"mid": Field(feats, "mid"), "up1": Field(feats, "up1")}, ok, batch_size=64,
                         shuffle=True, device="cuda", progress="train", extra={"label": labels})  # (N,)
    for epoch in range(10):
        loader.set_epoch(epoch)
        for batch in loader:   # "mid": (B, 1280, 8, 8) float32, "up1": ..., "index": (B,) int64, "label": (B,)
            loader.bar.set_postfix(loss=float(step(head, batch)))

Modes (`mode=`), which serve the SAME batches:
  memory  each field is read once, shard by shard (whole chunks), and kept on `device` in its STORED
          dtype: fp16 stays fp16 (half the RAM / GPU memory of float32; fp16 -> fp32 is exact) and
          each batch is gathered, then cast (on CUDA: index_select + .float()). `nbytes` = that size.
  stream  each epoch reads its shards whole, in the order their windows come (below): per shard
          and field, a task in a pool of reader threads (at most one per core) reads the chunk
          into a buffer reused from shard to shard and epoch to epoch (one file read, its CRC32C
          checked against the shard's record, viewed by numpy: `Entry.read_block`) and copies its
          rows, cast, straight into the float32 batches that hold them. A batch is handed over
          once its shards' tasks are done; tasks run up to `read_ahead` shards (default
          `shuffle_window`: one window) past the batch being waited for, and up to `prefetch`
          batches wait ready. Held at once: the batches of the shards under way (about one
          window of float32 rows, two while the next is read ahead) and a chunk per reader thread.
          For CUDA, batches cross the bus in the stored dtype (pinned) and are cast on the GPU.
  auto    memory when `nbytes` <= `memory_budget_bytes`, else stream.

Epoch order is a pure function of (seed, epoch) and the same in both modes: the shards holding
selected samples are permuted, taken `shuffle_window` at a time, and the samples of each window are
permuted (so a batch draws from every shard of its window, and the first batch of an epoch waits
for its first window's reads). Memory mode could shuffle globally, but then "auto" picking another
mode on a smaller machine would change the results, not only the speed. Without shuffle, ascending
dataset index.
Every selected index is served exactly once per epoch; drop_last drops only the last partial batch.
Neither `prefetch`, `read_ahead` nor the timing of the reader threads changes a batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.progress import Progress
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK, ShardDamage, ShardRecord

MODES = ("memory", "stream", "auto")
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Field:
    """One tensor of a batch: array `array` of store entry `entry`."""

    entry: Entry
    array: str


class CacheLoader:
    """Batches {field: (B, ...) float32, "index": (B,) int64, **extra} of `indices`, on `device`."""

    def __init__(self, fields: dict[str, Field], indices: Sequence[int], batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, mode: str = "auto",
                 memory_budget_bytes: int = 8 << 30, device: str | torch.device = "cpu",
                 prefetch: int = 2, shuffle_window: int = 4, read_ahead: int | None = None,
                 progress: str | None = None, extra: dict[str, np.ndarray] | None = None):
        if not fields:
            raise VermouthError("CacheLoader: no fields")
        if mode not in MODES:
            raise VermouthError(f"CacheLoader: mode {mode!r} is not one of {MODES}")
        read_ahead = shuffle_window if read_ahead is None else read_ahead  # default: one window ahead
        if min(batch_size, prefetch, shuffle_window, read_ahead) < 1:
            raise VermouthError("CacheLoader: batch_size, prefetch, shuffle_window and read_ahead must be >= 1")
        self.fields, self.batch_size, self.shuffle, self.seed = dict(fields), batch_size, shuffle, seed
        self.drop_last, self.prefetch, self.shuffle_window, self.progress = drop_last, prefetch, shuffle_window, progress
        self.read_ahead = read_ahead
        self.device = torch.device(device)
        self.epoch = 0
        self.bar: Progress | None = None
        self._check_fields()
        self.indices = self._check_indices(indices)  # sorted: memory row r holds dataset index indices[r]
        self.shards = np.unique(self.indices // self.shard_size)
        lo, hi = (np.searchsorted(self.indices, b * self.shard_size) for b in (self.shards, self.shards + 1))
        self._span = {int(s): (int(a), int(b)) for s, a, b in zip(self.shards, lo, hi)}  # shard -> rows
        self._check_available()
        self.extra = self._check_extra(extra or {})
        self._mode = mode if mode != "auto" else ("memory" if self.nbytes <= memory_budget_bytes else "stream")
        self._data = self._load() if self._mode == "memory" else None
        self._buffers = {k: _Buffers() for k in self.fields}  # stream mode's, see _Buffers

    def _check_fields(self) -> None:
        (k0, f0), datasets = next(iter(self.fields.items())), {}
        self.n_samples, self.shard_size = f0.entry.n_samples, f0.entry.shard_size
        for key, f in self.fields.items():
            e = f.entry
            if (e.n_samples, e.shard_size) != (self.n_samples, self.shard_size):
                raise VermouthError(
                    f"CacheLoader: field {key!r} ({e}) has {e.n_samples} samples in shards of {e.shard_size}, "
                    f"field {k0!r} ({f0.entry}) {self.n_samples} in shards of {self.shard_size}: "
                    f"the fields of one loader must cover the same dataset")
            spec = e.array_spec(f.array)  # raises, naming why, for a missing or altered array
            if spec["dtype"] not in TORCH_DTYPES:
                raise VermouthError(f"CacheLoader: field {key!r}: array dtype {spec['dtype']} is not a float")
            ds = e.manifest.get("about", {}).get("dataset_record")  # written by extract(); absent in hand-made entries
            if ds is not None:
                datasets.setdefault(ds, key)
        if len(datasets) > 1:
            raise VermouthError(f"CacheLoader: fields {sorted(datasets.values())} come from different datasets "
                                f"({sorted(datasets)})")

    def _check_indices(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or len(idx) == 0 or idx.dtype.kind not in "iu":
            raise VermouthError(f"CacheLoader: indices must be a non-empty 1-D list of ints, got {idx.dtype} {idx.shape}")
        idx = idx.astype(np.int64)
        out = idx[(idx < 0) | (idx >= self.n_samples)]
        if len(out):
            raise VermouthError(f"CacheLoader: index {out[0]} is outside the dataset's {self.n_samples} samples")
        uniq = np.unique(idx)
        if len(uniq) != len(idx):  # "each index once per epoch" would otherwise be ambiguous
            raise VermouthError(f"CacheLoader: {len(idx) - len(uniq)} duplicate indices")
        return uniq

    def _check_available(self) -> None:
        """One error for every selected sample that is not "ok" in some field: never serve NaN rows."""
        problems, total = [], 0
        for key, f in self.fields.items():
            status = f.entry._statuses_of(f.array, set(self._span))  # only the records of touched shards
            bad = [int(i) for i in self.indices if status.get(int(i)) != OK]
            if bad:
                total += len(bad)
                why = status.get(bad[0]) or "was never computed"
                problems.append(f"field {key!r} ({f.entry} array {f.array}): {len(bad)}, first sample #{bad[0]} {why}")
        if problems:
            raise VermouthError(f"CacheLoader: {total} selected sample(s) not available; " + "; ".join(problems)
                                + " (select only samples whose status is ok)")

    def _check_extra(self, extra: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in extra.items()}
        for key, arr in out.items():
            if key in self.fields or key == "index":
                raise VermouthError(f"CacheLoader: extra {key!r} clashes with a field or 'index'")
            if arr.ndim == 0 or len(arr) != self.n_samples or arr.dtype.kind not in "biuf":
                raise VermouthError(f"CacheLoader: extra {key!r} must be numeric with one row per dataset sample "
                                    f"({self.n_samples}), got {arr.dtype} {arr.shape}")
        return out

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def nbytes(self) -> int:
        """Bytes of the selected rows of every field in their stored dtype (what memory mode holds)."""
        specs = [f.entry.array_spec(f.array) for f in self.fields.values()]
        return sum(len(self.indices) * int(np.prod(s["shape"])) * TORCH_DTYPES[s["dtype"]].itemsize for s in specs)

    def __len__(self) -> int:
        return len(self.indices) // self.batch_size if self.drop_last else -(-len(self.indices) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _epoch(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's sample order (dataset indices) and its shards in the order they are read."""
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        shards = rng.permutation(self.shards) if rng is not None else self.shards
        parts = []
        for w in range(0, len(shards), self.shuffle_window):
            rows = self._rows(shards[w:w + self.shuffle_window])
            parts.append(rows[rng.permutation(len(rows))] if rng is not None else rows)
        return np.concatenate(parts), shards

    def _rows(self, group: np.ndarray) -> np.ndarray:  # selected dataset indices of the shards
        return np.concatenate([self.indices[slice(*self._span[int(s)])] for s in group])

    def _starts(self) -> range:
        return range(0, len(self) * self.batch_size, self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order, shards = self._epoch()
        # index and extras are cheap: put the epoch's worth on the device once, slice per batch
        served = {"index": torch.from_numpy(order).to(self.device)}
        served.update({k: torch.from_numpy(v[order]).to(self.device) for k, v in self.extra.items()})
        if self._mode == "memory":
            self._check_unchanged()
        feats = self._memory_batches(order) if self._mode == "memory" else self._stream_batches(order, shards)
        # one epoch: a bar on a terminal, a debug line otherwise (the training loop logs the run)
        self.bar = Progress(self.progress, len(self), "batch", level=logging.DEBUG) if self.progress else None
        try:
            for b0, batch in zip(self._starts(), feats):
                batch.update({k: v[b0:b0 + self.batch_size] for k, v in served.items()})
                yield batch
                if self.bar is not None:
                    self.bar.update()
        finally:
            feats.close()  # stops and joins the reader threads when the caller breaks early
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def _load(self) -> dict[str, torch.Tensor]:
        data = {}
        self._loaded: dict[tuple[str, int], ShardRecord] = {}  # the records the rows in memory were read under
        for key, f in self.fields.items():
            spec = f.entry.array_spec(f.array)
            buf = torch.empty((len(self.indices), *spec["shape"]), dtype=TORCH_DTYPES[spec["dtype"]], device=self.device)
            for s, (lo, hi) in self._span.items():
                # before the rows: a shard rewritten in between then fails the next epoch's check, never passes it
                self._loaded[key, s] = f.entry.checked_record(f.array, s)
                # one whole chunk per read; copied into place so no second full-size host copy exists
                buf[lo:hi].copy_(torch.from_numpy(f.entry.read(f.array, self.indices[lo:hi])))
            data[key] = buf
        return data

    def _check_unchanged(self) -> None:
        """Memory mode, each epoch: every shard's record is still the one its rows were read under (a
        shard recomputed, failed or removed since then raises instead of being served from memory)."""
        for (key, s), rec in self._loaded.items():
            f = self.fields[key]
            if f.entry.checked_record(f.array, s) != rec:
                raise ShardDamage(f.entry.prefix, f.array, s, "changed in the store since this loader read it into "
                                  "memory; build the loader again to train on what it holds now")

    def _memory_batches(self, order: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        pos = torch.from_numpy(np.searchsorted(self.indices, order)).to(self.device)  # rows of self._data
        for b0 in self._starts():
            rows = pos[b0:b0 + self.batch_size]
            yield {k: t.index_select(0, rows).float() if t.is_cuda or t.dtype == torch.bfloat16
                   # CPU: numpy's gather beats index_select on fp16, and see _join (numpy has no bf16)
                   else _join([torch.from_numpy(t.numpy()[rows.numpy()])], pin=False)
                   for k, t in self._data.items()}

    def _stream_batches(self, order: np.ndarray, shards: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(order, shards, q, stop), daemon=True,
                                  name="vermouth-cache-loader")
        worker.start()
        try:
            for _ in self._starts():
                item = q.get()  # the worker always ends with every batch or the exception it met
                if isinstance(item, BaseException):
                    raise item
                yield {k: v.to(self.device, non_blocking=True).float() for k, v in item.items()}
        finally:
            stop.set()
            worker.join()

    def _produce(self, order: np.ndarray, shards: np.ndarray, q: queue.Queue, stop: threading.Event) -> None:
        """Worker thread: hand over the epoch's batches in order, each once the reader tasks of its
        shards are done, keeping the next `read_ahead` shards under way (see _Epoch)."""
        def put(item) -> bool:
            while not stop.is_set():  # never block forever on a queue nobody reads any more
                with contextlib.suppress(queue.Full):
                    q.put(item, timeout=0.1)
                    return True
            return False

        epoch = _Epoch(self, order, shards)
        try:
            for b, b0 in enumerate(self._starts()):
                # the pool takes tasks in order: this batch's shards come first, then `read_ahead` more
                epoch.start(epoch.rank[b0:b0 + self.batch_size].max() + 1 + self.read_ahead)
                if not put(epoch.batch(b)):
                    return
        except BaseException as exc:  # re-raised by the main thread at its next batch
            put(exc)
        finally:
            epoch.close()


class _Epoch:
    """One stream epoch: per shard, in read order, one task per field in a thread pool that reads
    the shard's chunk (`_fill`) and copies its rows, cast, straight into the batches holding them,
    so reading and gathering spread over every core and a shard's rows are gathered as soon as it
    is read. A batch is complete once the tasks of its shards are; its tensors are allocated when
    the first of them starts, so the batches of the shards under way are held (about one window
    of float32 rows, two while the next window is read ahead)."""

    def __init__(self, loader: CacheLoader, order: np.ndarray, shards: np.ndarray):
        self.loader, self.order, self.shards = loader, order, shards
        # rank: per served sample (drop_last may leave some unserved), its shard's place in the read order
        by_shard = np.empty(len(shards), np.int64)
        by_shard[np.searchsorted(loader.shards, shards)] = np.arange(len(shards))
        n = len(loader) * loader.batch_size if loader.drop_last else len(order)
        self.rank = by_shard[np.searchsorted(loader.shards, order[:n] // loader.shard_size)]
        # the served positions of each rank's samples: positions[bounds[r]:bounds[r + 1]], ascending
        self.positions = np.argsort(self.rank, kind="stable")
        self.bounds = np.searchsorted(self.rank[self.positions], np.arange(len(shards) + 1))
        # reading local files and copying rows are CPU work: more threads than cores would only
        # delay the shards the next batch waits for
        self.pool = ThreadPoolExecutor(min(loader.read_ahead + 1, os.cpu_count() or 1),
                                       thread_name_prefix="vermouth-cache-loader-read")
        self.tasks: dict[int, list[Future]] = {}  # rank -> its tasks, until its last batch is handed over
        self.batches: dict[int, dict[str, torch.Tensor]] = {}  # allocated, not yet handed over
        self.started = 0  # ranks below have their tasks

    def start(self, upto: int) -> None:
        """Start the tasks of every shard of rank < `upto` that holds served samples."""
        while self.started < min(len(self.shards), upto):
            r, self.started = self.started, self.started + 1
            pos = self.positions[self.bounds[r]:self.bounds[r + 1]]
            if len(pos):
                self.tasks[r] = self._submit(int(self.shards[r]), pos)

    def _submit(self, shard: int, pos: np.ndarray) -> list[Future]:
        size, batch = self.loader.batch_size, pos // self.loader.batch_size
        rows = self.order[pos] % self.loader.shard_size
        targets = [(self._batch(int(b)), pos[batch == b] % size, rows[batch == b]) for b in np.unique(batch)]
        selected = self.loader.indices[slice(*self.loader._span[shard])]
        return [self.pool.submit(_fill, key, f, shard, selected, self.loader._buffers[key], targets)
                for key, f in self.loader.fields.items()]

    def _batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch `b`'s tensors: new float32 ones or, for CUDA, pinned ones in the stored dtype."""
        if b not in self.batches:
            n = min(self.loader.batch_size, len(self.rank) - b * self.loader.batch_size)
            pin = self.loader.device.type == "cuda"
            self.batches[b] = {}
            for key, f in self.loader.fields.items():
                spec = f.entry.array_spec(f.array)
                shape = (n, *spec["shape"])
                # torch's allocator, not numpy's: numpy asks for huge pages, and with several batches
                # begun at once the kernel then compacts memory on first touch (100+ ms stalls)
                self.batches[b][key] = (torch.empty(shape, dtype=TORCH_DTYPES[spec["dtype"]], pin_memory=True) if pin
                                        else torch.empty(shape, dtype=torch.float32))
        return self.batches[b]

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        """Batch `b` once its shards' tasks are done (a task's exception is raised here)."""
        b0 = b * self.loader.batch_size
        for r in np.unique(self.rank[b0:b0 + self.loader.batch_size]):
            for task in self.tasks[int(r)]:
                task.result()
            if self.positions[self.bounds[r + 1] - 1] // self.loader.batch_size == b:
                del self.tasks[int(r)]  # its last batch (positions ascend within a rank)
        return self.batches.pop(b)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Buffers:
    """Chunk buffers of one field, kept from shard to shard and epoch to epoch: fresh memory costs a
    page fault per page, on a small VM more than the read itself. As many are kept as the loader
    ever read at once (one per reader thread)."""

    def __init__(self):
        self._lock = threading.Lock()  # taken and given back by the reader threads
        self._free: list[np.ndarray] = []

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None or len(buf) < nbytes:  # compressed chunks differ in size
            buf = torch.empty(nbytes, dtype=torch.uint8).numpy()  # not numpy's huge pages: see _batch
        return buf

    def give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)


def _fill(key: str, field: Field, shard: int, selected: np.ndarray, buffers: _Buffers,
          targets: list[tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray]]) -> None:
    """Reader thread: read the shard's chunk of `field` into a reused buffer, checked as every read
    is (`Entry.read_block`: one file read, its CRC32C against the record, viewed by numpy, for
    the `selected` samples), and copy rows `rows` of it into rows `at` of each target batch's `key`."""
    held: list[np.ndarray] = []

    def into(nbytes: int) -> np.ndarray:
        held.append(buffers.take(nbytes))
        return held[0][:nbytes]

    block = field.entry.read_block(field.array, shard, selected, into=into)
    # bfloat16, which numpy lacks, is stored as its bits
    src = torch.from_numpy(block.view(np.int16)).view(torch.bfloat16) if block.dtype == np.uint16 \
        else torch.from_numpy(block)
    for batch, at, rows in targets:
        _copy_rows(batch[key], at, src, rows)
    del block, src  # views of the buffer: it may be read into again
    if held:
        buffers.give_back(held[0])


SERIAL_COPY = 1 << 15  # elements: torch runs a bigger copy on all its threads (at::internal::GRAIN_SIZE)


def _copy_rows(out: torch.Tensor, at: np.ndarray, block: torch.Tensor, rows: np.ndarray) -> None:
    """out[at] = block[rows], cast to out's dtype, row by row in pieces torch copies on this thread
    alone: one pass over the bytes, no temporary, and no parallel region, which would stall on the
    reader threads that keep every core busy (or on any other load). Small rows in one indexed
    copy, where a call per row would cost more than its bytes."""
    dst, src = out.view(len(out), -1), block.view(len(block), -1)
    if dst.shape[1] < SERIAL_COPY // 8:
        dst.index_copy_(0, torch.from_numpy(at), src.index_select(0, torch.from_numpy(rows)).to(dst.dtype))
        return
    pairs = list(zip(at.tolist(), rows.tolist()))
    for d, s in zip(dst.split(SERIAL_COPY, 1), src.split(SERIAL_COPY, 1)):
        for a, r in pairs:
            d[a].copy_(s[r])


def _join(parts: list[torch.Tensor], pin: bool) -> torch.Tensor:
    """The parts as one new float32 tensor, or (`pin`, for CUDA) a pinned one in the stored dtype.

    Float32 output is allocated by numpy and filled by torch's cast: numpy asks for huge pages for big
    arrays, torch does not, and first-touch page faults of a fresh (64, 640, 32, 32) float32 batch cost
    more than the cast (2-core VM: .float() 140 ms, this 57 ms; numpy's own fp16 cast 110 ms)."""
    if len(parts) == 1 and parts[0].dtype == torch.float32 and not pin:
        return parts[0]  # fp32 / bf16 stored: already a private float32 array
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True) if pin else torch.from_numpy(np.empty(shape, np.float32))
    o = 0
    for p in parts:
        out[o:o + len(p)].copy_(p)
        o += len(p)
    return out
