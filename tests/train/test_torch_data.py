"""CachedFeatures: the cache as a map-style torch Dataset in a user's own loop, with DataLoader
workers, DistributedSampler and pinned memory; the same usable samples and checked reads as training."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.conftest import make_images
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store
from vermouth_cache.train.torch_data import CachedFeatures

RES = 128


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    """7 images in 2 classes, one of them not an image (skipped at extraction), shards of 2."""
    from vermouth_cache.extract.request import ExtractRequest

    root = tmp_path_factory.mktemp("torchdata")
    data = make_images(root / "imgs", {"cat": 4, "dog": 4})
    (data / "dog" / "03.png").write_bytes(b"not an image")
    req = ExtractRequest(dataset=str(data), store=str(root / "store"), sd_model=str(tiny["sd"]),
                         captioner=str(tiny["blip"]), resolution=RES, device="cpu", shard_size=2, batch_size=2,
                         progress=False, on_error="skip")
    rep = extract(req)
    return {"data": data, "store": root / "store", "features": rep.entries[f"features t={req.t[0]}"],
            "captions": rep.entries["captions"]}


def open_ds(cache, **kw):
    return CachedFeatures(cache["store"], cache["data"], resolution=RES, **kw)


def test_items_are_the_stored_rows_and_failed_images_are_left_out(cache):
    ds = open_ds(cache, captions=True)
    assert len(ds) == 7 and list(ds.skipped) == ["dog/03.png"]
    feats = Store(str(cache["store"])).find("features", cache["features"])
    caps = Store(str(cache["store"])).find("captions", cache["captions"]).values("captions")
    taps = [k for k in ds[0] if k not in ("label", "index", "id", "caption")]
    assert taps and set(taps) <= set(feats.array_names())
    for i in range(len(ds)):
        item = ds[i]
        for tap in taps:
            want = torch.from_numpy(feats.read(tap, [item["index"]])[0].astype(np.float32))
            assert item[tap].dtype == torch.float32 and torch.equal(item[tap], want)
        assert item["caption"] == caps[item["index"]]
        assert item["label"] == (0 if item["id"].startswith("cat/") else 1)
    assert "dog/03.png" not in {ds[i]["id"] for i in range(len(ds))}
    assert open_ds(cache, dtype=None)[0][taps[0]].dtype == torch.float16  # the stored dtype, for half the memory
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_a_plain_dataloader_with_two_workers_trains_a_head(cache):
    ds = open_ds(cache)
    loader = DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, pin_memory=True,
                        generator=torch.Generator().manual_seed(0))
    tap = "mid_block"
    head = torch.nn.Linear(ds[0][tap].shape[0], 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    before = head.weight.detach().clone()
    seen = []
    for _ in range(3):
        for batch in loader:
            assert batch[tap].shape[0] == len(batch["id"]) and batch["label"].dtype == torch.int64
            loss = torch.nn.functional.cross_entropy(head(batch[tap].mean((2, 3))), batch["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += batch["index"].tolist()
    assert torch.isfinite(loss) and not torch.equal(before, head.weight)
    assert sorted(seen) == sorted(3 * [ds[i]["index"] for i in range(len(ds))])  # each sample once per epoch


def test_distributed_sampler_splits_the_samples_between_ranks(cache):
    ds = open_ds(cache)
    got = []
    for rank in (0, 1):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        for batch in DataLoader(ds, batch_size=2, sampler=sampler):
            got += batch["id"]
    assert set(got) == {ds[i]["id"] for i in range(len(ds))} and len(got) == 8  # 7 padded to 2 x 4


def test_shard_order_reads_each_shard_once_and_pickles_without_open_files(cache):
    ds = open_ds(cache)
    order = ds.shard_order(seed=1, epoch=0)
    assert sorted(order) == list(range(len(ds))) and order != ds.shard_order(seed=1, epoch=1)
    shards = [ds[i]["index"] // 2 for i in order]
    assert all(a == b or b not in shards[:k] for k, (a, b) in enumerate(zip(shards, shards[1:]))), shards
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._entries is None and torch.equal(clone[2]["mid_block"], ds[2]["mid_block"])


def test_damage_after_opening_raises_naming_the_shard(cache, tmp_path):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(cache["store"], store)
    ds = CachedFeatures(store, cache["data"], resolution=RES)
    chunks = sorted(p for p in (store / "features").rglob("*") if p.is_file() and "mid_block" in p.as_posix()
                    and p.stat().st_size > 100)
    raw = bytearray(chunks[0].read_bytes())
    raw[-50] ^= 0xFF
    chunks[0].write_bytes(bytes(raw))
    with pytest.raises(VermouthError, match=r"mid_block.*shard|shard.*mid_block"):
        for batch in DataLoader(ds, batch_size=7):
            pass


def test_options_that_select_no_features_are_one_line(cache):
    with pytest.raises(VermouthError, match="no cached features of .* match"):
        open_ds(cache, t=500)
    with pytest.raises(VermouthError, match="no per-pixel targets"):
        open_ds(cache, targets=True)
