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
  stream  each epoch reads `shuffle_window` shards at a time, whole, one window ahead, in background
          threads that keep up to `prefetch` batches ready; 2-3 windows of rows are held at once.
          For CUDA, batches cross the bus in the stored dtype (pinned) and are cast on the GPU.
  auto    memory when `nbytes` <= `memory_budget_bytes`, else stream.

Epoch order is a pure function of (seed, epoch) and the same in both modes: the shards holding
selected samples are permuted, taken `shuffle_window` at a time, and the samples of each window are
permuted. Memory mode could shuffle globally, but then "auto" picking another mode on a smaller
machine would change the results, not only the speed. Without shuffle, ascending dataset index.
Every selected index is served exactly once per epoch; drop_last drops only the last partial batch.
"""

from __future__ import annotations

import contextlib
import logging
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
from vermouth_cache.store.records import OK

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
                 prefetch: int = 2, shuffle_window: int = 4, progress: str | None = None,
                 extra: dict[str, np.ndarray] | None = None):
        if not fields:
            raise VermouthError("CacheLoader: no fields")
        if mode not in MODES:
            raise VermouthError(f"CacheLoader: mode {mode!r} is not one of {MODES}")
        if min(batch_size, prefetch, shuffle_window) < 1:
            raise VermouthError("CacheLoader: batch_size, prefetch and shuffle_window must be >= 1")
        self.fields, self.batch_size, self.shuffle, self.seed = dict(fields), batch_size, shuffle, seed
        self.drop_last, self.prefetch, self.shuffle_window, self.progress = drop_last, prefetch, shuffle_window, progress
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

    def _windows(self) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The epoch's windows: (shards read together, permutation of their selected rows or None)."""
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        shards = rng.permutation(self.shards) if rng is not None else self.shards
        groups = [shards[w:w + self.shuffle_window] for w in range(0, len(shards), self.shuffle_window)]
        return [(g, rng.permutation(len(self._rows(g))) if rng is not None else None) for g in groups]

    def _rows(self, group: np.ndarray) -> np.ndarray:  # selected dataset indices of the shards
        return np.concatenate([self.indices[slice(*self._span[int(s)])] for s in group])

    def _starts(self) -> range:
        return range(0, len(self) * self.batch_size, self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        windows = self._windows()
        order = np.concatenate([self._rows(g) if p is None else self._rows(g)[p] for g, p in windows])
        # index and extras are cheap: put the epoch's worth on the device once, slice per batch
        served = {"index": torch.from_numpy(order).to(self.device)}
        served.update({k: torch.from_numpy(v[order]).to(self.device) for k, v in self.extra.items()})
        feats = self._memory_batches(order) if self._mode == "memory" else self._stream_batches(windows)
        # one epoch: a bar on a terminal, a debug line otherwise (the training loop logs the run)
        self.bar = Progress(self.progress, len(self), "batch", level=logging.DEBUG) if self.progress else None
        try:
            for b0, batch in zip(self._starts(), feats):
                batch.update({k: v[b0:b0 + self.batch_size] for k, v in served.items()})
                yield batch
                if self.bar is not None:
                    self.bar.update()
        finally:
            feats.close()  # stops and joins the reader thread when the caller breaks early
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    def _load(self) -> dict[str, torch.Tensor]:
        data = {}
        for key, f in self.fields.items():
            spec = f.entry.array_spec(f.array)
            buf = torch.empty((len(self.indices), *spec["shape"]), dtype=TORCH_DTYPES[spec["dtype"]], device=self.device)
            for s, (lo, hi) in self._span.items():
                # one whole chunk per read; copied into place so no second full-size host copy exists
                buf[lo:hi].copy_(torch.from_numpy(f.entry.read(f.array, self.indices[lo:hi])))
            data[key] = buf
        return data

    def _memory_batches(self, order: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        pos = torch.from_numpy(np.searchsorted(self.indices, order)).to(self.device)  # rows of self._data
        for b0 in self._starts():
            rows = pos[b0:b0 + self.batch_size]
            yield {k: t.index_select(0, rows).float() if t.is_cuda or t.dtype == torch.bfloat16
                   # CPU: numpy's gather beats index_select on fp16, and see _join (numpy has no bf16)
                   else _join([torch.from_numpy(t.numpy()[rows.numpy()])], pin=False)
                   for k, t in self._data.items()}

    def _stream_batches(self, windows) -> Iterator[dict[str, torch.Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(windows, q, stop), daemon=True,
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

    def _produce(self, windows, q: queue.Queue, stop: threading.Event) -> None:
        """Worker thread: read windows whole, emit batches in epoch order (see _join for their dtype)."""
        def put(item) -> bool:
            while not stop.is_set():  # never block forever on a queue nobody reads any more
                with contextlib.suppress(queue.Full):
                    q.put(item, timeout=0.1)
                    return True
            return False

        # reader threads read the next window's shards (in parallel) while this one gathers batches
        pool = ThreadPoolExecutor(self.shuffle_window + 1, thread_name_prefix="vermouth-cache-loader-read")
        pin = self.device.type == "cuda"
        try:
            bounds = np.cumsum([0] + [len(self._rows(g)) for g, _ in windows])  # window w = rows [w], [w+1]
            reads: dict[int, Future] = {}
            ready: dict[int, dict[str, list[np.ndarray]]] = {}
            for b0 in self._starts():
                b1 = min(b0 + self.batch_size, len(self.indices))
                first, last = np.searchsorted(bounds, b0, "right") - 1, np.searchsorted(bounds, b1, "left") - 1
                for w in [w for w in ready if w < first]:
                    del ready[w]  # only the windows of this batch and the next window stay in memory
                for w in range(first, min(last + 2, len(windows))):
                    if w not in reads and w not in ready:
                        reads[w] = self._read_window(pool, windows[w][0])
                pieces: list[tuple[dict[str, list[np.ndarray]], np.ndarray]] = []
                for w in range(first, last + 1):
                    if w not in ready:
                        ready[w] = {k: [f.result() for f in fs] for k, fs in reads.pop(w).items()}
                    a, b = max(b0, bounds[w]) - bounds[w], min(b1, bounds[w + 1]) - bounds[w]
                    perm = windows[w][1]
                    pieces.append((ready[w], perm[a:b] if perm is not None else np.arange(a, b)))
                if not put({k: _gather([(shards[k], rows) for shards, rows in pieces], pin=pin) for k in self.fields}):
                    return
        except BaseException as exc:  # re-raised by the main thread at its next batch
            put(exc)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _read_window(self, pool: ThreadPoolExecutor, group: np.ndarray) -> dict[str, list[Future]]:
        """Per field, each shard's selected rows, read concurrently: one whole-chunk entry.read each
        (file read and CRC32C release the GIL), re-checking the record."""
        return {k: [pool.submit(f.entry.read, f.array, self.indices[slice(*self._span[int(s)])]) for s in group]
                for k, f in self.fields.items()}


def _gather(parts: list[tuple[list[np.ndarray], np.ndarray]], pin: bool) -> torch.Tensor:
    """One batch: for each window part, rows `rows` of its shards' rows taken in order (row r of the
    window is row r - offset of the shard holding it), gathered and cast straight into one new
    float32 array (or, `pin`, for CUDA, a pinned one in the stored dtype): one pass over the bytes."""
    first = parts[0][0][0]
    shape = (sum(len(rows) for _, rows in parts), *first.shape[1:])
    if pin:
        out_t = torch.empty(shape, dtype=torch.from_numpy(first[:0]).dtype, pin_memory=True)
        out = out_t.numpy()
    else:
        out = np.empty(shape, np.float32)  # numpy asks for huge pages: see _join
        out_t = torch.from_numpy(out)
    o = 0
    for shards, rows in parts:
        offsets = np.cumsum([0] + [len(a) for a in shards])
        which = np.searchsorted(offsets, rows, "right") - 1
        for s in np.unique(which):
            at = np.flatnonzero(which == s)
            out[o + at] = shards[s][rows[at] - offsets[s]]
        o += len(rows)
    return out_t


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
