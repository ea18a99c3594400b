"""Any tap of any entry as a dask array, for statistics and probes over a cache you do not load.

    from vermouth_cache.store.lazy import open_tap
    view = open_tap("s3://lab-bucket/vermouth", "features/3f2a", "up_blocks.1")   # read-only
    view.data            # dask array (n, C, H, W): one block per shard, nothing read yet
    view.sample_ids, view.labels, view.captions                                   # aligned with data
    view.data.mean(axis=(0, 2, 3)).compute()   # reads shard by shard, on a dask cluster if one is set

The store is opened read-only. Each block is read through `Entry.read`, so a block checks its
shard's record and its chunk's checksum when it is computed: a sample that was never computed, or
a corrupt chunk, raises instead of entering a statistic as NaN or zeros. By default the view
holds the samples whose status is ok (`samples="ok"`, the failed ones are listed in `skipped`);
`samples="all"` refuses an entry that is not complete and clean.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field

import numpy as np

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK


@dataclass
class TapView:
    entry: str  # "kind/key"
    tap: str
    data: object  # dask.array.Array (n, ...)
    rows: np.ndarray  # the entry rows of data's samples
    sample_ids: list[str]
    labels: np.ndarray  # -1 where a sample has none
    captions: list[str | None] | None  # features entries: the caption that conditioned each sample
    skipped: dict[str, str] = field(default_factory=dict)  # sample id -> why it is not in the view


@functools.lru_cache(maxsize=8)
def _open(url: str, options: str) -> Store:
    return Store(url, read_only=True, storage_options=json.loads(options) or None)


def _read_block(url: str, options: str, prefix: str, tap: str, rows: tuple[int, ...]) -> np.ndarray:
    store = _open(url, options)
    kind, key = prefix.split("/")
    return Entry(store.loc, kind, key).read(tap, list(rows))


def _entry(store: Store, name: str) -> Entry:
    kind, _, key = name.partition("/")
    if not key:
        kind, key = "features", name
    return store.find(kind, key)


def open_tap(store: str | os.PathLike, entry: str, tap: str, *, samples: str = "ok",
             storage_options: dict | None = None) -> TapView:
    """`entry` is "kind/key" (a key prefix is enough) or a features key; `tap` one of its arrays."""
    import dask  # only for a lazy view: the rest of the store never needs it
    import dask.array as da

    if samples not in ("ok", "all"):
        raise VermouthError(f"samples must be 'ok' or 'all', got {samples!r}")
    url, options = str(store), json.dumps(storage_options or {}, sort_keys=True)
    st = _open(url, options)
    e = _entry(st, entry)
    spec = e.array_spec(tap)
    status = e.statuses(tap)
    record = st.dataset(e.manifest["about"]["dataset_record"]) if e.manifest.get("about", {}).get("dataset_record") \
        else None
    ids = record["ids"] if record else [f"#{i}" for i in range(e.n_samples)]
    skipped = {ids[i]: ("never computed" if s is None else s) for i, s in enumerate(status) if s != OK}
    if samples == "all" and skipped:
        first = next(iter(skipped.items()))
        raise VermouthError(f"{e.prefix} {tap}: {len(skipped)} of {e.n_samples} samples are not available "
                            f"(first: {first[0]}: {first[1]}); use samples='ok' for the rest")
    rows = np.array([i for i, s in enumerate(status) if s == OK], dtype=np.int64)
    dtype = np.float32 if spec["dtype"] == "bfloat16" else np.dtype(spec["dtype"])
    blocks = []
    for shard in range(e.n_shards):
        lo, hi = e.shard_bounds(shard)
        mine = tuple(int(r) for r in rows[(rows >= lo) & (rows < hi)])
        if mine:
            part = dask.delayed(_read_block, pure=True)(url, options, e.prefix, tap, mine)
            blocks.append(da.from_delayed(part, shape=(len(mine), *spec["shape"]), dtype=dtype))
    data = da.concatenate(blocks) if blocks else da.zeros((0, *spec["shape"]), dtype=dtype)
    labels = np.array([-1 if record is None or record["labels"][i] is None else record["labels"][i] for i in rows],
                      dtype=np.int64)
    captions = None
    cap_key = e.manifest.get("about", {}).get("captions")
    if cap_key:
        captions = st.find("captions", cap_key).values("captions", rows)
    return TapView(e.prefix, tap, data, rows, [ids[i] for i in rows], labels, captions, skipped)
