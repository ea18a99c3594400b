"""Determinism, resume after kill -9, reuse of shared artifacts, early exit, and what ls/export show."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import make_images, record_content, store_bytes
from vermouth_cache.extract.run import extract
from vermouth_cache.models.taps import summarize_taps
from vermouth_cache.store.listing import table
from vermouth_cache.store.entries import Store


def test_batch_size_never_changes_a_byte(request_for, tmp_path):
    data = make_images(tmp_path / "d", {"a": 3, "b": 2})
    kw = dict(t=(100, 400), stages="down,mid,up", attn_maps="up", prompt="blip")
    extract(request_for(data, store=str(tmp_path / "s1"), batch_size=1, shard_size=2, **kw))
    extract(request_for(data, store=str(tmp_path / "s2"), batch_size=4, shard_size=4, **kw))
    extract(request_for(data, store=str(tmp_path / "s3"), batch_size=1, shard_size=4, **kw))
    # same shard size: every file identical; the record content too
    assert store_bytes(tmp_path / "s2") == store_bytes(tmp_path / "s3")
    assert record_content(tmp_path / "s2") == record_content(tmp_path / "s3")
    # a different shard size changes the chunking, never a value
    a, b = Store(tmp_path / "s1"), Store(tmp_path / "s2")
    for ea in a.entries():
        eb = b.find(ea.kind, ea.key)
        assert ea.key == eb.key
        for name in ea.array_names():
            np.testing.assert_array_equal(ea.read(name), eb.read(name))


def test_keys_depend_on_recipe_not_on_paths_or_batching(request_for, tmp_path, folder):
    import shutil

    r1 = extract(request_for(folder, store=str(tmp_path / "s1"), prompt="null", stages="mid"))
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    r2 = extract(request_for(moved, store=str(tmp_path / "s2"), prompt="null", stages="mid", batch_size=1))
    assert r1.entries == r2.entries
    r3 = extract(request_for(folder, store=str(tmp_path / "s1"), prompt="null", stages="mid", seed=1))
    assert r3.entries["latents"] == r1.entries["latents"] and r3.entries["text"] == r1.entries["text"]
    assert r3.entries["features t=200"] != r1.entries["features t=200"]
    r4 = extract(request_for(folder, store=str(tmp_path / "s1"), prompt="null", stages="mid", dtype="fp32"))
    assert r4.entries["features t=200"] not in (r1.entries["features t=200"], r3.entries["features t=200"])
    (folder / "cat" / "00.png").write_bytes((folder / "dog" / "00.png").read_bytes())  # same name, new bytes
    r5 = extract(request_for(folder, store=str(tmp_path / "s1"), prompt="null", stages="mid"))
    assert r5.dataset["identity"] != r1.dataset["identity"]
    assert r5.entries["latents"] != r1.entries["latents"]


def _counting(monkeypatch):
    """Count real model calls by wrapping the library methods, not our own bookkeeping."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import BlipForConditionalGeneration, CLIPTextModel

    calls = {"vae": 0, "blip": 0, "clip": 0, "unet": 0, "up_blocks": 0}
    for cls, attr, name in ((AutoencoderKL, "encode", "vae"), (BlipForConditionalGeneration, "generate", "blip"),
                            (CLIPTextModel, "forward", "clip"), (UNet2DConditionModel, "forward", "unet")):
        orig = getattr(cls, attr)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, attr, wrapped)
    from diffusers.models.unets import unet_2d_blocks

    for cls in (unet_2d_blocks.UpBlock2D, unet_2d_blocks.CrossAttnUpBlock2D):
        orig = cls.forward

        def up(self, *a, _orig=orig, **k):
            calls["up_blocks"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "forward", up)
    return calls


def test_second_timestep_runs_only_the_unet(request_for, folder, monkeypatch):
    calls = _counting(monkeypatch)
    extract(request_for(folder, t=(200,), stages="mid"))
    assert calls["vae"] == 5 and calls["blip"] == 5 and calls["clip"] == 5 and calls["unet"] == 5
    before = dict(calls)
    rep = extract(request_for(folder, t=(200, 600), stages="mid"))
    assert calls["vae"] == before["vae"] and calls["blip"] == before["blip"] and calls["clip"] == before["clip"]
    assert calls["unet"] == before["unet"] + 5  # only t=600, only once per image
    assert rep.computed["unet"] == 5 and not rep.computed["vae"]
    # an extra stage at an existing t computes only that stage's taps, for every image
    before = dict(calls)
    rep = extract(request_for(folder, t=(200,), stages="mid,up"))
    assert calls["vae"] == before["vae"] and calls["unet"] == before["unet"] + 5
    # and a request fully present runs nothing
    before = dict(calls)
    rep = extract(request_for(folder, t=(200, 600), stages="mid"))
    assert calls == before and not any(rep.computed.values())


def test_early_exit_never_runs_up_blocks(request_for, folder, monkeypatch):
    calls = _counting(monkeypatch)
    extract(request_for(folder, t=(200,), stages="down,mid", prompt="null"))
    assert calls["unet"] == 5 and calls["up_blocks"] == 0
    extract(request_for(folder, t=(200,), taps="up_blocks.0", prompt="null"))
    assert calls["up_blocks"] == 5  # exactly the first up block of each of 5 images


def test_uncomputed_samples_never_read_as_zeros(request_for, folder):
    req = request_for(folder, stages="mid", prompt="null")
    rep = extract(req)
    entry = Store(req.store).find("features", rep.entries["features t=200"])
    (entry.root / "shards" / "mid_block" / "000001.json").unlink()  # shard 1 = samples 2, 3
    with pytest.raises(Exception, match="never computed"):
        entry.read("mid_block", [2])
    np.testing.assert_array_equal(entry.read("mid_block", [0, 4]).shape[0], 2)
    raw = entry._array("mid_block")
    import shutil

    shutil.rmtree(entry.root / "arrays" / "mid_block" / "c" / "1")  # the chunk too: a bypassing read gets NaN
    assert np.isnan(raw[2:4]).all()


def test_ls_and_export(request_for, folder, tmp_path):
    req = request_for(folder, t=(200,), stages="mid,up")
    rep = extract(req)
    store = Store(req.store)
    listing = table(store, summarize_taps=summarize_taps)
    assert "mid,up" in listing and "5/5" in listing and "features" in listing and "blip" in listing
    out = tmp_path / "feats.h5"
    res = __import__("vermouth_cache.store.export", fromlist=["export_h5"]).export_h5(store, out, taps=["mid_block"])
    assert res["samples"] == 5 and not (tmp_path / ".feats.h5.tmp").exists()
    entry = store.find("features", rep.entries["features t=200"])
    captions = store.find("captions", rep.entries["captions"]).values("captions")
    with h5py.File(out) as f:
        assert [s.decode() for s in f["sample_ids"][:]] == ["cat/00.png", "cat/01.png", "cat/02.png", "dog/00.png",
                                                             "dog/01.png"]
        assert list(f["labels"][:]) == [0, 0, 0, 1, 1]
        assert [s.decode() for s in f["captions"][:]] == captions
        np.testing.assert_array_equal(f["features/mid_block"][:], entry.read("mid_block"))
        assert list(f["features"]) == ["mid_block"]
        assert json.loads(f.attrs["recipe"])["t"] == 200 and f.attrs["key"] == entry.key
        assert json.loads(f.attrs["classnames"]) == ["cat", "dog"]


def test_the_next_shard_decodes_in_the_background_and_the_bytes_do_not_change(request_for, folder, tmp_path,
                                                                              monkeypatch):
    """While a shard runs its models, the next shard's images decode (and become the VAE's pixels) in a
    background thread; the store's bytes are those of the serial path."""
    import threading

    from conftest import store_bytes
    from vermouth_cache.extract import shards

    threads = []
    real = shards._decode
    monkeypatch.setattr(shards, "_decode", lambda samples, size: threads.append(
        (samples[0].id, threading.current_thread().name, size)) or real(samples, size))
    req = request_for(folder, prompt="null", stages="mid", store=str(tmp_path / "a"))  # 5 images, shards of 2
    extract(req)
    background = {first: name.startswith("vermouth-cache-decode") for first, name, _ in threads}
    assert {size for *_, size in threads} == {128}  # the VAE's pixels are made in the decoding thread too
    assert background == {"cat/00.png": False, "cat/02.png": True, "dog/01.png": True}  # shards 0, 1, 2
    monkeypatch.setattr(shards, "PREFETCH", False)
    extract(req.with_(store=str(tmp_path / "b")))
    assert store_bytes(tmp_path / "a") == store_bytes(tmp_path / "b")
