"""Cached features as a map-style torch Dataset, for a training loop of one's own.

    from torch.utils.data import DataLoader, DistributedSampler
    from vermouth_cache.train.torch_data import CachedFeatures

    ds = CachedFeatures("cache/store", "data/pets", split="train", t=200, resolution=256)
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2, pin_memory=True)
    for batch in loader:  # {"mid_block": (B, 1280, 8, 8), "up_blocks.0": ..., "label": (B,), "index": (B,), "id": [B str]}
        ...
    # DDP: DataLoader(ds, batch_size=64, sampler=DistributedSampler(ds))

The features are the ones `train` would read for the same options: an option left out takes what
`extract --method METHOD` makes by default, and `select` pins the extraction options that tell
entries apart (`{"noise_seed": 1}`, `{"table": sha}`: the `train` options of `selection.PINS`).
Samples whose image failed at extraction are left out (listed in `.skipped`); a sample that was
never computed refuses the whole dataset, and every read checks the shard's bytes against its
record as training does, so damage raises naming the entry, array and shard.

Reads: a batch is read shard by shard (one decode per shard, whatever the batch holds of it;
DataLoader calls `__getitems__`), and each worker keeps the last `cached_shards` decoded shards
per array, so that an order that walks shards (no shuffle, or `shard_order`) reads each once.
Workers reopen the store themselves: the dataset pickles as paths and keys, never open files.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.samples import Dataset as ImageDataset
from vermouth_cache.extract.masks import ensure_masks
from vermouth_cache.extract.plan import CAPTIONS
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.selection import resolve_pins
from vermouth_cache.extract.targets import DEPTH, REFER_MASK, ensure_targets
from vermouth_cache.store.entries import Store
from vermouth_cache.train.inputs import EXPERT_LEVELS, open_split
from vermouth_cache.train.settings import TaskSettings


class CachedFeatures(torch.utils.data.Dataset):
    """Item i: {tap: tensor, "label": int (-1 unlabelled), "index": the sample's dataset index,
    "id": its sample id, ["caption": str], ["mask" | "depth": tensor]} of the i-th usable sample."""

    def __init__(self, store: str | Path, dataset: str | Path | ImageDataset, *, split: str | None = None,
                 layout: str | None = None, method: str = "vermouth", t: int | None = None,
                 resolution: int | None = None, stages: str | None = None, attn_maps: str | None = None,
                 expert: str | None = None, prompt: str | None = None, noise: str | None = None,
                 text_layer: str = "final", select: dict | None = None, sd_model: str | None = None,
                 captions: bool = False, targets: bool = False, dtype: torch.dtype | None = torch.float32,
                 cached_shards: int = 2):
        if cached_shards < 1:
            raise VermouthError("CachedFeatures: cached_shards must be at least 1")
        ds = dataset if isinstance(dataset, ImageDataset) else load_dataset(dataset, split=split, layout=layout)
        made = ExtractRequest.method_defaults(method)  # what `extract --method METHOD` wrote by default
        settings = TaskSettings.parse({
            "method": method, "t": made["t"][0] if t is None else t,
            "resolution": made["resolution"] if resolution is None else resolution,
            "stages": stages or made["stages"], "attn_maps": attn_maps, "expert": expert,
            "prompt": prompt or made["prompt"], "noise": noise or made["noise"], "text_layer": text_layer})
        pins = resolve_pins(dict(select or {}))
        if sd_model is not None:
            from vermouth_cache.models.loading import Placement
            from vermouth_cache.models.pipeline import StableDiffusion

            pins["unet"] = StableDiffusion(sd_model, Placement(torch.device("cpu"), torch.float32)).identity("unet")
        st = Store(store)
        cached = open_split(st, ds, settings, pins=pins)
        self.dataset = ds
        self.settings = settings
        self.skipped = dict(cached.skipped)
        self.dtype = dtype
        self.cached_shards = cached_shards
        self._root = str(st.root)
        self._rows = list(cached.indices)
        self._labels = cached.labels.astype(np.int64)
        self._ids = list(cached.sample_ids)
        # (batch key, entry kind, entry key, array name) of every tensor an item holds
        self._arrays = [(n, "features", cached.features.key, n) for n in cached.tap_names]
        if cached.expert is not None:
            self._arrays += [(n, "expert", cached.expert.key, n) for n in EXPERT_LEVELS]
        if targets:
            target = _target_entry(st, ds, settings.resolution, cached.features)
            self._arrays.append((_target_name(ds), target.kind, target.key, _target_array(ds)))
        self._captions = None
        if captions:
            cap_key = cached.features.manifest["about"]["captions"]
            self._captions = st.find("captions", cap_key).values(CAPTIONS, self._rows)
        self._entries: dict | None = None
        self._blocks: OrderedDict = OrderedDict()
        self._by_shard: dict = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions) -> list[dict]:
        """The items at `positions`, each array read shard by shard (DataLoader's batched fetch)."""
        positions = [int(p) for p in positions]
        for p in positions:
            if not 0 <= p < len(self):
                raise IndexError(f"CachedFeatures: index {p} out of range ({len(self)} samples)")
        rows = [self._rows[p] for p in positions]
        values = {key: self._read(kind, ekey, name, rows) for key, kind, ekey, name in self._arrays}
        items = []
        for k, p in enumerate(positions):
            item = {key: v[k] for key, v in values.items()}
            item.update(label=int(self._labels[p]), index=rows[k], id=self._ids[p])
            if self._captions is not None:
                item["caption"] = self._captions[p]
            items.append(item)
        return items

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 label of every item (-1 where unlabelled), e.g. for a weighted sampler."""
        return self._labels.copy()

    def shard_order(self, seed: int = 0, epoch: int = 0) -> list[int]:
        """A shuffled order of the items that visits one shard at a time (shards permuted, items
        permuted within each): random enough for SGD, one shard read per shard per epoch. Pass it
        as a sampler: `DataLoader(ds, batch_size=64, sampler=ds.shard_order(seed, epoch))`."""
        rng = np.random.default_rng([seed, epoch])
        size = self._shard_size()
        by_shard: dict[int, list[int]] = {}
        for pos, row in enumerate(self._rows):
            by_shard.setdefault(row // size, []).append(pos)
        order = []
        for shard in rng.permutation(sorted(by_shard)):
            order += [by_shard[int(shard)][j] for j in rng.permutation(len(by_shard[int(shard)]))]
        return order

    # -- reading ------------------------------------------------------------------------------
    def _entry(self, kind: str, key: str):
        if self._entries is None:  # opened in the process that reads (a DataLoader worker opens its own)
            self._entries = {}
        if (kind, key) not in self._entries:
            self._entries[(kind, key)] = Store(self._root).find(kind, key)
        return self._entries[(kind, key)]

    def _shard_size(self) -> int:
        _, kind, key, _ = self._arrays[0]
        return self._entry(kind, key).shard_size

    def _read(self, kind: str, key: str, name: str, rows: list[int]) -> list[torch.Tensor]:
        entry = self._entry(kind, key)
        size = entry.shard_size
        out: list = [None] * len(rows)
        for shard in dict.fromkeys(r // size for r in rows):
            block = self._block(entry, name, shard)
            for k, r in enumerate(rows):
                if r // size == shard:
                    out[k] = block[r]
        return out

    def _block(self, entry, name: str, shard: int) -> dict[int, torch.Tensor]:
        """{row: tensor} of this dataset's rows in one shard, read (and checked) once, then cached."""
        key = (entry.prefix, name, shard)
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        mine = self._rows_by_shard(entry.shard_size).get(shard, [])  # usable rows only: failed ones are refused
        data = entry.read(name, mine)
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        block = dict(zip(mine, tensor))
        self._blocks[key] = block
        while len(self._blocks) > self.cached_shards * len(self._arrays):
            self._blocks.popitem(last=False)
        return block

    def _rows_by_shard(self, size: int) -> dict[int, list[int]]:
        """{shard: this dataset's rows in it}, built once per shard size (not a scan per shard read)."""
        if self._by_shard.get("size") != size:
            by: dict[int, list[int]] = {}
            for r in self._rows:
                by.setdefault(r // size, []).append(r)
            self._by_shard = {"size": size, "rows": by}
        return self._by_shard["rows"]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_entries"], state["_blocks"] = None, OrderedDict()  # paths and keys travel, never open files
        return state


def _target_name(ds: ImageDataset) -> str:
    return "depth" if _kind(ds) == "depth" else "mask"


def _target_array(ds: ImageDataset) -> str:
    return {"depth": DEPTH.array, "refer": REFER_MASK.array}.get(_kind(ds), "mask")


def _kind(ds: ImageDataset) -> str:
    sample = ds.samples[0]
    if sample.depth is not None:
        return "depth"
    if sample.region is not None:
        return "refer"
    if sample.mask is not None:
        return "seg"
    raise VermouthError(f"{ds.name} has no per-pixel targets (segmentation masks, depth maps or referred regions): "
                        "targets=True applies to those datasets")


def _target_entry(store: Store, ds: ImageDataset, resolution: int, like):
    """The dataset's target maps at the features' resolution, written beside them if missing."""
    kind = _kind(ds)
    if kind == "seg":
        return ensure_masks(store, ds, resolution, like=like, progress=False)
    return ensure_targets(store, ds, DEPTH if kind == "depth" else REFER_MASK, resolution, like=like, progress=False)
