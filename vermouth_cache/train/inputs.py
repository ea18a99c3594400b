"""What a run reads from the cache for one dataset: the features entry, the expert entry, the
samples that are usable, and their labels. Nothing here runs a model.

A K-shot training set may come from its own extraction or from an extraction of the whole split
(`superset`): the same image files, so the subset's rows are picked out by sample id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vermouth_cache.data.samples import Dataset
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.gc import mark_used
from vermouth_cache.train.loader import Field
from vermouth_cache.train.pyramid import taps_needed
from vermouth_cache.extract.selection import FeatureQuery, find_by_dataset, find_features, subset_indices
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK
from vermouth_cache.methods import method_named
from vermouth_cache.models.taps import BLOCK_ORDER
from vermouth_cache.train.settings import TaskSettings

EXPERT_LEVELS = [f"expert.level{i}" for i in range(4)]


@dataclass
class CachedSplit:
    dataset: Dataset
    features: Entry
    expert: Entry | None
    indices: list[int]  # rows of the entries, one per usable sample, in dataset order
    labels: np.ndarray  # dataset label per usable sample (-1 when unlabelled)
    sample_ids: list[str]
    tap_names: list[str]  # cached arrays of the features entry the head reads
    skipped: dict[str, str] = field(default_factory=dict)  # sample id -> why (failed at extract)

    @property
    def fields(self) -> dict[str, Field]:
        out = {name: Field(self.features, name) for name in self.tap_names}
        if self.expert is not None:
            out.update({name: Field(self.expert, name) for name in EXPERT_LEVELS})
        return out

    def shapes(self) -> tuple[dict, dict]:
        arrays = self.features.arrays
        taps = {n: tuple(arrays[n]["shape"]) for n in self.tap_names}
        exp = {}
        if self.expert is not None:
            exp = {n: tuple(self.expert.array_spec(n)["shape"]) for n in EXPERT_LEVELS}
        return taps, exp

    def keys(self) -> dict:
        out = {"features": self.features.key}
        if self.expert is not None:
            out["expert"] = self.expert.key
        return out


def feature_query(s: TaskSettings, pins: dict | None = None) -> FeatureQuery:
    """`pins`: {"unet": identity, and resolved `selection.PINS` facts} (`common.feature_pins`)."""
    pins = dict(pins or {})
    unet = pins.pop("unet", None)
    return FeatureQuery(t=s.t, resolution=s.resolution, prompt=s.prompt, noise=s.noise, text_layer=s.text_layer,
                        unet=unet, method=s.method, pins=pins)


def feature_taps(s: TaskSettings) -> list[str]:
    """The block or layer taps a head of settings `s` reads: its stages' merge (vermouth), or the
    method's own taps (vpd's four hierarchical outputs)."""
    method = method_named(s.method)
    return taps_needed(s.stages) if method.merge == "stages" else sorted(method.default_taps.split(","))


def open_split(store: Store, ds: Dataset, s: TaskSettings, *, pins: dict | None = None,
               superset: Dataset | None = None, empty_ok: bool = False) -> CachedSplit:
    """The cached rows of `ds` for settings `s` (and the extraction options `pins` names); refuses a
    mismatched, ambiguous or incomplete cache, and (unless `empty_ok`) one whose every sample failed."""
    base_taps = feature_taps(s)
    query = feature_query(s, pins)
    source = ds
    try:
        feats = find_features(store, ds, query, base_taps)
    except VermouthError:
        if superset is None:
            raise
        source = superset
        feats = find_features(store, superset, query, base_taps)
    taps = list(base_taps)
    if s.attn_maps:
        wanted = method_named(s.method).attention.taps(s.attn_maps, BLOCK_ORDER)
        have = [n for n in wanted if n in feats.array_names()]
        if not have:
            raise VermouthError(f"features/{feats.key[:12]} of {source.name} hold no cross-attention maps of "
                                f"stage {s.attn_maps}: extract with --attn-maps {s.attn_maps}, or train with "
                                "--attn-maps none")
        taps += have
    expert = None
    if s.expert:
        match = {"expert": s.expert, "resolution": s.resolution}
        if query.pins.get("dtype"):
            match["dtype"] = query.pins["dtype"]
        if query.pins.get("codec"):
            match["codec"] = query.pins["codec"] if query.pins["codec"] != "raw" else None
        expert = find_by_dataset(store, "expert", source, match, f"{s.expert} expert features")
    record = store.dataset(feats.manifest["about"]["dataset_record"])
    rows = subset_indices(record["ids"], ds) if source is not ds else list(range(len(ds)))
    for used in (feats, expert):
        if used is not None:
            mark_used(store, used)  # for `gc --unused-days`: with the latents, text and captions behind it
    return _usable(ds, feats, expert, taps, rows, empty_ok)


def _usable(ds: Dataset, feats: Entry, expert: Entry | None, taps: list[str], rows: list[int],
            empty_ok: bool = False) -> CachedSplit:
    per_array = [(feats, n) for n in taps] + ([(expert, n) for n in EXPERT_LEVELS] if expert else [])
    statuses = [e.statuses(n) for e, n in per_array]
    keep, skipped = [], {}
    for sample, row in zip(ds.samples, rows):
        st = [s[row] for s in statuses]
        if any(x is None for x in st):
            e, n = per_array[st.index(None)]
            raise VermouthError(f"sample {sample.id} of {ds.name} has no cached {n} ({e.kind}/{e.key[:12]}): "
                                "the extraction did not finish; run the same `vermouth-cache extract` again")
        bad = [x for x in st if x != OK]
        if bad:
            skipped[sample.id] = bad[0]
        else:
            keep.append((sample, row))
    if not keep and not empty_ok:
        raise VermouthError(f"no usable cached sample in {ds.name} ({len(skipped)} failed at extraction)")
    return CachedSplit(ds, feats, expert, [r for _, r in keep],
                        np.array([s.label if s.label is not None else -1 for s, _ in keep]),
                        [s.id for s, _ in keep], taps, skipped)


def union_split(splits: list[CachedSplit]) -> CachedSplit:
    """One split that reads every array the heads of a shared pass need (their taps, any expert).

    The heads' own splits must be the same rows of the same features entry: a head then sees
    exactly the batches it would see trained alone.
    """
    first = splits[0]
    expert = next((sp.expert for sp in splits if sp.expert is not None), None)
    for sp in splits[1:]:
        if sp.features.key != first.features.key or sp.indices != first.indices:
            raise VermouthError(f"heads of one pass read different cached samples of {first.dataset.name} "
                                f"(features/{first.features.key[:12]} and features/{sp.features.key[:12]}); "
                                "train them separately")
        if sp.expert is not None and sp.expert.key != expert.key:
            raise VermouthError(f"heads of one pass read different expert entries of {first.dataset.name}")
    taps = list(dict.fromkeys(n for sp in splits for n in sp.tap_names))
    skipped = {k: v for sp in splits for k, v in sp.skipped.items()}
    return CachedSplit(first.dataset, first.features, expert, list(first.indices), first.labels,
                       list(first.sample_ids), taps, skipped)
