"""Segmentation label maps in the store, aligned with the cached features: decoded once.

    entry = ensure_masks(store, ds, resolution=512, like=features_entry)   # array "mask" (N, R, R)

Each mask goes through the same resize-and-centre-crop as its image (`seg_data.mask_for_training`,
nearest neighbour). Class indices are stored as FLOATS (float16 for 8-bit rules, exact up to 2048;
float32 for 16-bit ones, exact up to 2^24) so the feature loader serves them like any other
array, NaN-filled where not computed; `ignore_value` gives the rule's ignore label. The entry is keyed by the
image set, the bytes of every mask file, the label rule and the resolution; it is computed shard
by shard with the features entry's shard size (so one loader can serve both), each shard written
whole before its record, like every other entry.
"""

from __future__ import annotations

import hashlib

import numpy as np

from vermouth_cache import SCHEMA_VERSION
from vermouth_cache.data.samples import Dataset
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.progress import track
from vermouth_cache.core.hashing import canonical_json, file_sha256
from vermouth_cache.data.seg import LABEL_RULES, mask_for_training, read_mask
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK

ARRAY = "mask"


def masks_identity(ds: Dataset) -> str:
    missing = [s.id for s in ds.samples if s.mask is None]
    if missing:
        raise VermouthError(f"dataset {ds.name} has no label map for {len(missing)} samples (e.g. {missing[0]})")
    pairs = sorted([s.id, file_sha256(s.mask)] for s in ds.samples)
    return hashlib.sha256(canonical_json(pairs).encode()).hexdigest()


def label_rule(ds: Dataset) -> str:
    rule = ds.source.get("label_rule", "identity")
    if rule not in LABEL_RULES:
        raise VermouthError(f"dataset {ds.name}: unknown label rule {rule!r}")
    return rule


def ignore_value(ds: Dataset) -> int:
    return LABEL_RULES[label_rule(ds)].ignore


def masks_recipe(ds: Dataset, resolution: int) -> dict:
    return {"kind": "masks", "schema": SCHEMA_VERSION, "dataset": ds.identity(), "masks": masks_identity(ds),
            "label_rule": label_rule(ds), "resolution": resolution,
            "geometry": "resize shorter side, centre crop, nearest"}


def ensure_masks(store: Store, ds: Dataset, resolution: int, like: Entry, progress: bool = True) -> Entry:
    rule = label_rule(ds)
    about = {"dataset": ds.name, "dataset_record": like.manifest["about"].get("dataset_record"),
             "resolution": resolution, "label_rule": rule, "source": dict(ds.source)}
    entry = store.entry("masks", masks_recipe(ds, resolution), n_samples=len(ds), shard_size=like.shard_size,
                        about=about)
    _fill(entry, ds, resolution, progress)
    entry.touch()  # a training run used it (gc)
    return entry


def _fill(entry: Entry, ds: Dataset, resolution: int, progress: bool) -> None:
    rule = label_rule(ds)
    dtype = "float16" if LABEL_RULES[rule].dtype == np.uint8 else "float32"
    todo = [s for s in range(entry.n_shards) if s not in entry.done_shards(ARRAY)]
    for shard in track(todo, f"masks {ds.name}", "shard", enabled=progress):
        start, stop = entry.shard_bounds(shard)
        block = np.stack([mask_for_training(read_mask(s.mask, rule, n_classes=len(ds.classnames)), resolution)
                          for s in ds.samples[start:stop]])
        entry.ensure_array(ARRAY, (resolution, resolution), dtype)
        entry.write_shard(ARRAY, shard, [OK] * (stop - start), data=block, run={"step": "masks"})


def refill_masks(store: Store, entry: Entry, bad: dict[str, set[int]], progress: bool = True) -> None:
    """Recompute the `bad` shards of a masks entry from the label maps it was made from (`repair`)."""
    from vermouth_cache.data.datasets import load_dataset

    about = entry.manifest["about"]
    src = about.get("source")
    if not src:
        raise VermouthError("its manifest does not say where its label maps are; remove it and train again")
    ds = load_dataset(src["spec"], split=src.get("split"), layout=src.get("layout"))
    if masks_recipe(ds, about["resolution"]) != entry.manifest["recipe"]:
        raise VermouthError(f"the label maps or images under {src['spec']} changed since it was made")
    for name, shards in bad.items():
        for shard in shards:
            entry.invalidate(name, shard)
    _fill(entry, ds, about["resolution"], progress)
