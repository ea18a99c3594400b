"""Per-pixel targets in the store, aligned with the cached features of a dataset of views: made once.

    entry = ensure_targets(store, ds, DEPTH, resolution=512, like=features_entry)   # array "depth" (N, R, R)

A target is a map each sample's view cuts from its source the way the image was cut (the same box
and mirror, then padded or squashed: data/views.py):
    DEPTH        the depth PNG in metres, padded with 0 (no ground truth: the loss and metrics skip it)
    REFER_MASK   the referred object's mask (REFER getMask), squashed by nearest neighbour, 0/1
Each is keyed by the views (the dataset identity hashes their ids), the bytes or annotation of
every source and the resolution; written shard by shard with the features entry's shard size so
one loader serves both, like the segmentation masks (extract/masks.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vermouth_cache import SCHEMA_VERSION
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json, file_sha256
from vermouth_cache.core.progress import track
from vermouth_cache.data.depth import MM_PER_M, read_depth
from vermouth_cache.data.refer import region_mask
from vermouth_cache.data.samples import Dataset, Sample
from vermouth_cache.data.views import view_map
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK


@dataclass(frozen=True)
class Target:
    kind: str  # the store entry kind
    array: str
    dtype: str
    facts: dict  # what the recipe says of how a map is made
    source: Callable[[Sample], str]  # what a sample's map is made from, hashed into the key
    make: Callable[[Sample, int], np.ndarray]  # (R, R) map of one sample's view


def _depth_source(s: Sample) -> str:
    if s.depth is None:
        raise VermouthError(f"sample {s.id} has no depth map")
    return file_sha256(s.depth)


def view_depth(s: Sample, resolution: int) -> np.ndarray:
    """(R, R) float32 metres of one sample's view, 0 where there is none."""
    depth = read_depth(s.depth)
    left, top, right, bottom = s.view.box
    if bottom > depth.shape[0] or right > depth.shape[1]:
        raise VermouthError(f"depth map {s.depth} ({depth.shape[1]}x{depth.shape[0]}) is smaller than its image")
    return view_map(s.view.array(depth), resolution, s.view.geometry)


def _region_source(s: Sample) -> str:
    if s.region is None:
        raise VermouthError(f"sample {s.id} has no referred region")
    return hashlib.sha256(s.region.encode()).hexdigest()


def view_region(s: Sample, resolution: int) -> np.ndarray:
    """(R, R) 0/1 of the referred object in one sample's view."""
    left, top, right, bottom = s.view.box
    if (left, top) != (0, 0):
        raise VermouthError(f"sample {s.id}: a referring view must be the whole image")
    try:
        full = region_mask(json.loads(s.region), bottom, right)
    except VermouthError:
        raise
    except Exception as exc:  # noqa: BLE001 - pycocotools raises TypeError/ValueError/... on malformed polygons
        raise VermouthError(f"sample {s.id}: its object's segmentation in instances.json is not COCO polygons "
                            f"or RLE ({type(exc).__name__}: {str(exc)[:80]})") from None
    return view_map(s.view.array(full), resolution, s.view.geometry).astype(np.float32)


DEPTH = Target("depths", "depth", "float32", {"scale": f"uint16 / {MM_PER_M:g} (metres)", "pad": 0},
               _depth_source, view_depth)
REFER_MASK = Target("refmasks", "mask", "float16", {"mask": "REFER getMask: polygons summed, == 1", "resize": "nearest"},
                    _region_source, view_region)
TARGETS = {t.kind: t for t in (DEPTH, REFER_MASK)}


def targets_recipe(ds: Dataset, target: Target, resolution: int) -> dict:
    missing = [s.id for s in ds.samples if s.view is None]
    if missing:
        raise VermouthError(f"dataset {ds.name} is not a dataset of views (e.g. {missing[0]})")
    pairs = sorted([s.id, target.source(s)] for s in ds.samples)
    return {"kind": target.kind, "schema": SCHEMA_VERSION, "dataset": ds.identity(),
            "sources": hashlib.sha256(canonical_json(pairs).encode()).hexdigest(), "resolution": resolution,
            "geometry": "the sample's view box and mirror, placed like its image", **target.facts}


def ensure_targets(store: Store, ds: Dataset, target: Target, resolution: int, like: Entry,
                   progress: bool = True) -> Entry:
    about = {"dataset": ds.name, "dataset_record": like.manifest["about"].get("dataset_record"),
             "resolution": resolution, "source": dict(ds.source)}
    entry = store.entry(target.kind, targets_recipe(ds, target, resolution), n_samples=len(ds),
                        shard_size=like.shard_size, about=about)
    _fill(entry, ds, target, resolution, progress)
    entry.touch()  # a training run used it (gc)
    return entry


def refill_targets(store: Store, entry: Entry, bad: dict[str, set[int]], progress: bool = True) -> None:
    """Recompute the `bad` shards of a targets entry from the sources it was made from (`repair`)."""
    from vermouth_cache.data.datasets import load_dataset

    target, about = TARGETS[entry.kind], entry.manifest["about"]
    src = about["source"]
    ds = load_dataset(src["spec"], split=src.get("split"), views=src.get("views") or 1,
                      shot_seed=src.get("view_seed") or 0, image_root=src.get("image_root"))
    if targets_recipe(ds, target, about["resolution"]) != entry.manifest["recipe"]:
        raise VermouthError(f"the sources under {src['spec']} changed since it was made")
    for name, shards in bad.items():
        for shard in shards:
            entry.invalidate(name, shard)
    _fill(entry, ds, target, about["resolution"], progress)


def _fill(entry: Entry, ds: Dataset, target: Target, resolution: int, progress: bool) -> None:
    todo = [s for s in range(entry.n_shards) if s not in entry.done_shards(target.array)]
    for shard in track(todo, f"{target.kind} {ds.name}", "shard", enabled=progress):
        start, stop = entry.shard_bounds(shard)
        block = np.stack([target.make(s, resolution) for s in ds.samples[start:stop]])
        entry.ensure_array(target.array, (resolution, resolution), target.dtype)
        entry.write_shard(target.array, shard, [OK] * (stop - start), data=block, run={"step": target.kind})
