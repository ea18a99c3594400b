"""An entry and the chain it is made from (captions -> text, latents -> features; expert) stay usable
together: gc keeps what a kept entry needs, every recipe field that tells entries apart can be
selected, one extraction's entries share one shard size, and repair works from any directory."""

from __future__ import annotations

import json

from test_errors import cli
from vermouth_cache.check import repair, verify
from vermouth_cache.extract import extract
from vermouth_cache.store import Store


def _features(store: Store, t: int):
    return [e for e in store.entries("features") if e.manifest["recipe"]["t"] == t]


# ---------------------------------------------------------------- 10a: shard sizes of a chain


def test_a_second_run_with_another_shard_size_keeps_the_chains_and_says_so(monkeypatch, capsys, tiny, folder,
                                                                            tmp_path):
    store = tmp_path / "store"
    base = [folder, "--store", store, "--sd-model", tiny["sd"], "--captioner", tiny["blip"], "--resolution", "128",
            "--device", "cpu", "--quiet", "--prompt", "null", "--stages", "mid"]
    code, _, err = cli(monkeypatch, capsys, "extract", *base, "--t", "100", "--shard-size", "3")
    assert code == 0, err
    # the default shard size (64, i.e. 5 for 5 images) used to make a t=200 entry of 5-sample
    # shards beside captions of 3: "ValueError: 3 statuses for 5 samples", broken for good
    code, out, err = cli(monkeypatch, capsys, "extract", *base, "--t", "200")
    assert code == 0, err
    assert "note: shard size 3 kept" in out and "asked 64" in out
    st = Store(store)
    (f200,) = _features(st, 200)
    assert f200.shard_size == 3 and f200.read("mid_block").shape[0] == 5
    assert verify(Store(store, read_only=True), deep=True, progress=False).ok
    # later runs, with yet another shard size and more work, go on using the store
    code, out, err = cli(monkeypatch, capsys, "extract", *base, "--t", "100,200,300", "--stages", "mid,up",
                         "--shard-size", "2")
    assert code == 0, err
    assert "note: shard size 3 kept" in out and "asked 2" in out
    assert all(e.shard_size == 3 for e in Store(store).entries())
    assert _features(Store(store), 300)[0].read("up_blocks.1").shape[0] == 5
    assert verify(Store(store, read_only=True), deep=True, progress=False).ok
    code, out, _ = cli(monkeypatch, capsys, "extract", *base, "--t", "300", "--stages", "mid,up", "--shard-size", "3")
    assert code == 0 and "note:" not in out and "nothing (all cached)" in out


def test_a_chain_of_mixed_shard_sizes_is_refused_in_one_line_naming_the_odd_entry(monkeypatch, capsys, tiny,
                                                                                   folder, tmp_path):
    store = tmp_path / "store"
    base = [folder, "--store", store, "--sd-model", tiny["sd"], "--captioner", tiny["blip"], "--resolution", "128",
            "--device", "cpu", "--quiet", "--prompt", "null", "--stages", "mid", "--shard-size", "3"]
    assert cli(monkeypatch, capsys, "extract", *base, "--t", "100,200")[0] == 0
    # what an older vermouth-cache left: a features entry whose shards differ from its upstream's
    (f200,) = _features(Store(store), 200)
    manifest = store / f200.prefix / "manifest.json"
    m = json.loads(manifest.read_text())
    m["shard_size"] = 5
    manifest.write_text(json.dumps(m))
    for rec in (store / f200.prefix / "shards").rglob("*.json"):
        rec.unlink()
    before = sorted(p for p in store.rglob("*") if p.is_file())
    code, out, err = cli(monkeypatch, capsys, "extract", *base, "--t", "100,200")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "different shard sizes" in err and f"features/{f200.key[:12]}: 5" in err and "captions/" in err
    assert f"gc --entry features/{f200.key[:12]}" in err
    assert sorted(p for p in store.rglob("*") if p.is_file()) == before  # refused before any work
    # the remedy it names works
    code, _, err = cli(monkeypatch, capsys, "gc", store, "--entry", f"features/{f200.key[:12]}", "--yes")
    assert code == 0, err
    assert cli(monkeypatch, capsys, "extract", *base, "--t", "100,200")[0] == 0
    assert verify(Store(store, read_only=True), deep=True, progress=False).ok


# ---------------------------------------------------------------- 10b: repair from another directory


def test_repair_from_another_directory_finds_a_dataset_given_as_a_relative_path(request_for, folder, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.chdir(folder.parent)
    req = request_for("imgs", stages="mid", prompt="null")  # DATASET as typed: relative to the cwd
    rep = extract(req)
    store = Store(req.store)
    feats = store.find("features", rep.entries["features t=200"])
    chunk = feats.loc.path(feats.chunk_key("mid_block", 1))
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-7])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = repair(Store(req.store), progress=False)
    assert not out.refused, out.refused
    assert out.repaired == {feats.prefix: {"mid_block": [1]}} and out.after.ok
    assert chunk.read_bytes() == good
    assert feats.manifest["about"]["request"]["dataset"] == str(folder)  # kept absolute
