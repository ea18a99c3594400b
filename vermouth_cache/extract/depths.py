"""Depth maps in the store, aligned with the cached features of a dataset of views: decoded once.

    entry = ensure_depths(store, ds, resolution=512, like=features_entry)   # array "depth" (N, R, R)

Each sample's map is its depth PNG in metres, cut to the sample's view (the same box and mirror as
its image) and zero-padded right and below like the image (0: no ground truth, the loss and the
metrics skip it). Keyed by the views (the dataset identity hashes their ids), the bytes of every
depth file and the resolution; written shard by shard with the features entry's shard size so
one loader serves both, like the segmentation masks (extract/masks.py).
"""

from __future__ import annotations

import hashlib

import numpy as np

from vermouth_cache import SCHEMA_VERSION
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json, file_sha256
from vermouth_cache.core.progress import track
from vermouth_cache.data.depth import MM_PER_M, read_depth
from vermouth_cache.data.samples import Dataset
from vermouth_cache.data.views import pad_map
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK

ARRAY = "depth"


def depths_identity(ds: Dataset) -> str:
    missing = [s.id for s in ds.samples if s.depth is None or s.view is None]
    if missing:
        raise VermouthError(f"dataset {ds.name} is not a depth dataset of views (e.g. {missing[0]} has no depth map "
                            "or view)")
    pairs = sorted([s.id, file_sha256(s.depth)] for s in ds.samples)
    return hashlib.sha256(canonical_json(pairs).encode()).hexdigest()


def depths_recipe(ds: Dataset, resolution: int) -> dict:
    return {"kind": "depths", "schema": SCHEMA_VERSION, "dataset": ds.identity(), "depths": depths_identity(ds),
            "resolution": resolution, "scale": f"uint16 / {MM_PER_M:g} (metres)",
            "geometry": "the sample's view box and mirror, zero-padded right and below"}


def view_depth(sample, resolution: int) -> np.ndarray:
    """(R, R) float32 metres of one sample's view, 0 where there is none."""
    return pad_map(sample.view.array(read_depth(sample.depth)), resolution)


def ensure_depths(store: Store, ds: Dataset, resolution: int, like: Entry, progress: bool = True) -> Entry:
    about = {"dataset": ds.name, "dataset_record": like.manifest["about"].get("dataset_record"),
             "resolution": resolution, "source": dict(ds.source)}
    entry = store.entry("depths", depths_recipe(ds, resolution), n_samples=len(ds), shard_size=like.shard_size,
                        about=about)
    _fill(entry, ds, resolution, progress)
    entry.touch()  # a training run used it (gc)
    return entry


def refill_depths(store: Store, entry: Entry, bad: dict[str, set[int]], progress: bool = True) -> None:
    """Recompute the `bad` shards of a depths entry from the depth maps it was made from (`repair`)."""
    from vermouth_cache.data.datasets import load_dataset

    about = entry.manifest["about"]
    src = about["source"]
    ds = load_dataset(src["spec"], split=src.get("split"), views=src.get("views") or 1,
                      shot_seed=src.get("view_seed") or 0)
    if depths_recipe(ds, about["resolution"]) != entry.manifest["recipe"]:
        raise VermouthError(f"the depth maps or images under {src['spec']} changed since it was made")
    for name, shards in bad.items():
        for shard in shards:
            entry.invalidate(name, shard)
    _fill(entry, ds, about["resolution"], progress)


def _fill(entry: Entry, ds: Dataset, resolution: int, progress: bool) -> None:
    todo = [s for s in range(entry.n_shards) if s not in entry.done_shards(ARRAY)]
    for shard in track(todo, f"depths {ds.name}", "shard", enabled=progress):
        start, stop = entry.shard_bounds(shard)
        block = np.stack([view_depth(s, resolution) for s in ds.samples[start:stop]])
        entry.ensure_array(ARRAY, (resolution, resolution), "float32")
        entry.write_shard(ARRAY, shard, [OK] * (stop - start), data=block, run={"step": "depths"})
