"""`extract --codec`: zstd is lossless and readable by Zarr itself; int8 and fp8 are lossy within
their stated bounds; the codec is in the key; every codec's chunks are checked like raw ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import make_images
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.store.check import verify
from vermouth_cache.store.codecs import codec_named, dequantize, quantize
from vermouth_cache.store.entries import Store

RES = 128


@pytest.fixture(scope="module")
def stores(tiny, tmp_path_factory):
    """The same 5 images extracted with each codec (fp32 so raw is the exact reference), one store each."""
    root = tmp_path_factory.mktemp("codecs")
    data = make_images(root / "imgs", {"a": 3, "b": 2})
    out = {}
    for codec in ("raw", "zstd", "int8", "fp8"):
        req = ExtractRequest(dataset=str(data), store=str(root / codec), sd_model=str(tiny["sd"]), prompt="null",
                             resolution=RES, device="cpu", shard_size=2, dtype="fp32", codec=codec, progress=False,
                             expert="resnet18", expert_model=str(tiny["resnet18"]))
        rep = extract(req)
        store = Store(str(root / codec))
        out[codec] = {"req": req, "store": store, "features": store.find("features", rep.entries["features t=200"]),
                      "expert": store.find("expert", rep.entries["expert"]), "report": rep}
    return out


def arrays(s):
    return {(kind, n): s[kind].read(n) for kind in ("features", "expert") for n in s[kind].array_names()}


def test_zstd_is_lossless_smaller_and_zarr_reads_it(stores):
    import zarr

    raw, z = arrays(stores["raw"]), arrays(stores["zstd"])
    assert raw.keys() == z.keys() and all(np.array_equal(raw[k], z[k]) for k in raw)
    assert stores["zstd"]["features"].size_bytes() < stores["raw"]["features"].size_bytes()
    feats = stores["zstd"]["features"]
    name = feats.array_names()[0]
    direct = zarr.open_array(store=str(stores["zstd"]["store"].root / feats.prefix / "arrays"), path=name, mode="r")
    assert np.array_equal(direct[:], raw[("features", name)])  # any Zarr v3 reader decodes it
    assert verify(stores["zstd"]["store"], deep=True, progress=False).ok


@pytest.mark.parametrize("codec, bound", [("int8", 1 / 254), ("fp8", 1 / 16)])
def test_lossy_codecs_stay_within_their_bounds(stores, codec, bound):
    """int8: at most half a step (range / 254 / 2) per value; fp8 (3 mantissa bits): at most 1/16 of
    the channel's half range. Both decode to float32."""
    raw, lossy = arrays(stores["raw"]), arrays(stores[codec])
    for k, x in raw.items():
        y = lossy[k]
        assert y.dtype == np.float32 and y.shape == x.shape
        c = x.reshape(x.shape[0], x.shape[1] if x.ndim > 2 else 1, -1)
        half = (c.max(axis=2) - c.min(axis=2))[..., None] / 2
        err = np.abs(y.reshape(c.shape) - c)
        assert np.all(err <= half * bound + 1e-6 * (1 + np.abs(c))), (k, float((err / (half + 1e-12)).max()))
    ratio = stores[codec]["features"].size_bytes() / stores["raw"]["features"].size_bytes()
    assert ratio < 0.3  # 1 byte per fp32 value, plus 8 bytes per channel


def test_the_codec_is_in_the_key_and_selects_features(stores, tmp_path):
    from vermouth_cache.train.torch_data import CachedFeatures

    keys = {c: s["features"].key for c, s in stores.items()}
    assert len(set(keys.values())) == 4
    assert stores["raw"]["features"].manifest["recipe"].get("codec") is None  # raw keys never changed
    mixed = tmp_path / "mixed"
    shutil.copytree(stores["raw"]["store"].root, mixed)
    for codec in ("zstd", "int8"):
        extract(stores[codec]["req"].with_(store=str(mixed)))
    data = stores["raw"]["req"].dataset
    with pytest.raises(VermouthError, match="add .*--codec"):
        CachedFeatures(mixed, data, resolution=RES, prompt="null")
    got = CachedFeatures(mixed, data, resolution=RES, prompt="null", expert="resnet18", select={"codec": "int8"})
    assert got[0]["expert.level0"].dtype.is_floating_point
    want = stores["int8"]["features"].read("mid_block", [got[0]["index"]])[0]
    assert np.array_equal(got[0]["mid_block"].numpy(), want)


def test_the_same_values_give_the_same_bytes(stores, tmp_path):
    for codec in ("zstd", "int8", "fp8"):
        again = extract(stores[codec]["req"].with_(store=str(tmp_path / codec)))
        a = stores[codec]["store"].root / stores[codec]["features"].prefix / "arrays"
        b = tmp_path / codec / stores[codec]["features"].prefix / "arrays"
        assert again.entries == stores[codec]["report"].entries
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_damaged_or_altered_codec_arrays_are_refused(stores, tmp_path):
    for codec in ("zstd", "int8"):
        root = tmp_path / codec
        shutil.copytree(stores[codec]["store"].root, root)
        feats = Store(str(root)).find("features", stores[codec]["features"].key)
        name = feats.array_names()[0]
        chunk = root / feats.prefix / "arrays" / name / "c" / "1" / "0" / "0" / "0"
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        chunk.write_bytes(bytes(raw))
        with pytest.raises(VermouthError, match=rf"{feats.prefix}.*{name}.*shard 1"):
            Store(str(root)).find("features", feats.key).read(name, [2])
        meta = root / feats.prefix / "arrays" / name / "zarr.json"
        body = json.loads(meta.read_text())
        body["attributes"]["vermouth_codec"] = "raw" if codec != "raw" else "zstd"
        meta.write_text(json.dumps(body))
        with pytest.raises(VermouthError, match="metadata was altered"):
            Store(str(root)).find("features", feats.key).read(name, [0])


def test_quantize_keeps_not_computed_samples_nan_and_constant_channels_exact():
    x = np.zeros((3, 2, 4, 4), dtype=np.float32)
    x[0, 0] = 5.0  # a constant channel: decodes exactly
    x[0, 1] = np.linspace(-1, 3, 16).reshape(4, 4)
    x[1] = np.nan  # a failed sample's row
    x[2] = np.arange(32, dtype=np.float32).reshape(2, 4, 4)
    for kind in ("int8", "fp8"):
        y = dequantize(quantize(x, kind), (2, 4, 4), kind)
        assert np.all(y[0, 0] == 5.0) and np.isnan(y[1]).all() and not np.isnan(y[[0, 2]]).any()
    with pytest.raises(VermouthError, match="unknown codec"):
        codec_named("gzip")


def test_two_arrays_of_one_shape_swapped_with_their_records_are_refused(request_for, tmp_path):
    """down_blocks.3 and mid_block have the same zarr.json: a record binds its array by name, so
    swapping both folders (chunks and records) is damage, not the other array's values."""
    from conftest import make_images
    from vermouth_cache.store.records import ShardDamage

    data = make_images(tmp_path / "imgs", {"a": 2})
    rep = extract(request_for(data, prompt="null", stages="down,mid", resolution=64, codec="int8"))
    feats = Store(request_for(data).store).find("features", rep.entries["features t=200"])
    specs = {n: (feats.arrays[n]["shape"], feats.arrays[n]["meta"]) for n in ("down_blocks.3", "mid_block")}
    assert specs["down_blocks.3"] == specs["mid_block"]  # the same metadata: only the name tells them apart
    base = tmp_path / "store" / feats.prefix
    for d in ("arrays", "shards"):
        (base / d / "mid_block").rename(base / d / "tmp")
        (base / d / "down_blocks.3").rename(base / d / "mid_block")
        (base / d / "tmp").rename(base / d / "down_blocks.3")
    with pytest.raises(ShardDamage, match="written for array down_blocks.3 .moved or swapped."):
        Store(str(tmp_path / "store")).find("features", feats.key).read("mid_block")
    assert not verify(Store(str(tmp_path / "store")), deep=True, progress=False).ok


def test_lossy_codecs_refuse_non_finite_values_and_damage_pickles_whole(tmp_path):
    import pickle

    from vermouth_cache.store.records import ShardDamage

    store = Store(tmp_path / "s", create=True)
    entry = store.entry("features", {"t": "nonfinite"}, n_samples=2, shard_size=2, about={})
    entry.ensure_array("x", (2, 3, 3), "float16", "int8")
    data = np.zeros((2, 2, 3, 3), np.float32)
    data[1, 0, 0, 0] = np.inf
    with pytest.raises(VermouthError, match=r"sample #1 has non-finite values, which --codec int8 cannot store"):
        entry.write_shard("x", 0, ["ok", "ok"], data=data)
    entry.write_shard("x", 0, ["ok", "error: bad image"], data=data)  # a failed sample's row may be anything
    exc = pickle.loads(pickle.dumps(ShardDamage("features/ab", "x", 3, "checksum mismatch")))
    assert isinstance(exc, ShardDamage) and (exc.array, exc.shard) == ("x", 3)  # DataLoader workers re-raise it
