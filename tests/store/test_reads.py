"""A read never lies: every read path (Entry.read, export, lazy views, the training loader, ls)
refuses what `verify --deep` would flag, naming entry, array and shard. Issue 11, cases 1-5 and 10.

Each test damages a copy of one small extracted store the way a hostile user or failing hardware
would (swap, delete, edit files) and checks what every reader and `verify` then say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli as run_cli
from conftest import make_images
from vermouth_cache.extract.repair import repair
from vermouth_cache.store.check import verify
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.lazy import open_tap
from vermouth_cache.train.loader import CacheLoader, Field
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.store.entries import Store

TAP = "mid_block"


@pytest.fixture(scope="module")
def pristine(tiny, tmp_path_factory):
    """One extraction (5 images, shards of 2, fp32, mid + up_blocks.0), made once for the module."""
    base = tmp_path_factory.mktemp("reads")
    imgs = make_images(base / "imgs", {"cat": 3, "dog": 2})
    req = ExtractRequest(dataset=str(imgs), store=str(base / "store"), sd_model=str(tiny["sd"]),
                         captioner=str(tiny["blip"]), resolution=128, device="cpu", shard_size=2, batch_size=2,
                         progress=False, taps="mid_block,up_blocks.0", prompt="null", dtype="fp32")
    rep = extract(req)
    store = Store(req.store)
    feats = store.find("features", rep.entries["features t=200"])
    return {"req": req, "root": Path(req.store), "key": feats.key,
            "data": {n: feats.read(n) for n in feats.array_names()}}


@pytest.fixture
def damaged(pristine, tmp_path):
    """A fresh copy of the store to damage; returns (store root, features entry of the copy)."""
    root = tmp_path / "store"
    shutil.copytree(pristine["root"], root)
    return root, Store(root).find("features", pristine["key"])


def chunk(entry, name, shard) -> Path:
    return entry.loc.path(entry.chunk_key(name, shard))


def meta_path(entry, name) -> Path:
    return entry.loc.path(f"{entry.prefix}/arrays/{name}/zarr.json")


def cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The real entry point; returns (exit code, stderr + stdout) and fails on a traceback."""
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert "Traceback" not in err + out
    return code, err + out


def every_reader_refuses(root: Path, key: str, name: str, match: str, monkeypatch, capsys, tmp_path) -> None:
    """Entry.read, export, a lazy view's statistic and the training loader (memory and stream) all raise."""
    entry = Store(root, read_only=True).find("features", key)
    with pytest.raises(VermouthError, match=match):
        entry.read(name)
    code, err = cli(monkeypatch, capsys, "export", root, "--out", tmp_path / "x.h5", "--entry", key)
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(VermouthError, match=match):
        open_tap(str(root), f"features/{key}", name).data.astype("float64").mean().compute()
    for mode in ("memory", "stream"):
        with pytest.raises(VermouthError, match=match):
            loader = CacheLoader({"x": Field(entry, name)}, range(entry.n_samples), 2, mode=mode)
            for _ in loader:
                pass


def test_an_intact_store_reads_what_was_written(damaged, pristine):
    _, feats = damaged
    for name, data in pristine["data"].items():
        np.testing.assert_array_equal(feats.read(name, [4, 0, 3]), data[[4, 0, 3]])
    assert verify(Store(damaged[0]), deep=True, progress=False).ok


# -- 1. swapped chunks ---------------------------------------------------------------------------

def test_swapped_chunks_are_refused_by_every_read(damaged, pristine, monkeypatch, capsys, tmp_path):
    root, feats = damaged
    a, b = chunk(feats, TAP, 0), chunk(feats, TAP, 1)
    ba, bb = a.read_bytes(), b.read_bytes()
    assert len(ba) == len(bb) and ba != bb  # same size, each with a valid CRC32C trailer
    a.write_bytes(bb)
    b.write_bytes(ba)
    every_reader_refuses(root, feats.key, TAP, f"{feats.prefix} array {TAP} shard [01]: .*not the one its record "
                                                "committed", monkeypatch, capsys, tmp_path)
    assert feats.read(TAP, [4]).shape[0] == 1  # shard 2 is untouched and still serves
    deep = verify(Store(root), deep=True, progress=False)
    assert {(p.array, p.shard) for p in deep.problems} == {(TAP, 0), (TAP, 1)}


def test_a_chunk_swapped_in_from_another_entry_is_refused(pristine, tiny, tmp_path):
    """Two datasets of equal shapes in one store (say a test and a validation split): moving one's
    chunk into the other's place must not serve validation images as test features."""
    root = tmp_path / "store"
    shutil.copytree(pristine["root"], root)
    other = make_images(tmp_path / "other", {"cat": 3, "dog": 2}, seed=5)
    req = ExtractRequest(**{**pristine["req"].to_json(), "dataset": str(other), "store": str(root), "progress": False})
    rep = extract(req)
    store = Store(root)
    mine, theirs = store.find("features", pristine["key"]), store.find("features", rep.entries["features t=200"])
    chunk(mine, TAP, 1).write_bytes(chunk(theirs, TAP, 1).read_bytes())
    with pytest.raises(VermouthError, match="shard 1: the chunk is well formed but not the one"):
        mine.read(TAP, [2])


# -- 2. a missing chunk whose record says ok ------------------------------------------------------

def test_a_missing_chunk_with_a_record_is_damage_not_nan(damaged, monkeypatch, capsys, tmp_path):
    root, feats = damaged
    chunk(feats, TAP, 1).unlink()
    every_reader_refuses(root, feats.key, TAP, f"{feats.prefix} array {TAP} shard 1: chunk missing",
                         monkeypatch, capsys, tmp_path)
    problems = verify(Store(root), deep=False, progress=False).problems
    assert [(p.array, p.shard, p.what) for p in problems] == [(TAP, 1, "chunk missing although its record says it "
                                                                          "was committed")]


def test_a_chunk_deleted_mid_training_stops_the_stream_naming_the_shard(damaged):
    _, feats = damaged
    loader = CacheLoader({"x": Field(feats, TAP)}, range(5), 1, mode="stream", shuffle=True, prefetch=1,
                         shuffle_window=1)
    assert sum(len(b["x"]) for b in loader) == 5  # epoch 0 reads every shard
    chunk(feats, TAP, 2).unlink()  # between two epochs: the loader checked the records when it was made
    loader.set_epoch(1)
    with pytest.raises(VermouthError, match=f"array {TAP} shard 2: chunk missing"):
        for _ in loader:
            pass


# -- 3. array metadata edits ----------------------------------------------------------------------

def _edit_meta(meta: dict, what: str) -> None:
    if what == "endian":
        meta["codecs"][0]["configuration"]["endian"] = "big"
    elif what == "sample shape":
        meta["shape"][1], meta["shape"][2] = meta["shape"][2], meta["shape"][1]
        cs = meta["chunk_grid"]["configuration"]["chunk_shape"]
        cs[1], cs[2] = cs[2], cs[1]
    elif what == "data type":
        meta["data_type"] = "int32"
        meta["attributes"]["vermouth_dtype"] = "int32"
    elif what == "bf16 marker":
        meta["data_type"] = "uint16"
        meta["attributes"]["vermouth_dtype"] = "bfloat16"
    elif what == "key separator":
        meta["chunk_key_encoding"]["configuration"]["separator"] = "."
    elif what == "fill value only":
        meta["fill_value"] = 0.0


@pytest.mark.parametrize("what", ["endian", "sample shape", "data type", "bf16 marker", "key separator",
                                  "fill value only"])
def test_array_metadata_edits_are_refused_and_verified(damaged, what, monkeypatch, capsys, tmp_path):
    root, feats = damaged
    path = meta_path(feats, TAP)
    meta = json.loads(path.read_text())
    _edit_meta(meta, what)
    path.write_text(json.dumps(meta))
    every_reader_refuses(root, feats.key, TAP, f"{feats.prefix} array {TAP}.*(altered|changed after)",
                         monkeypatch, capsys, tmp_path)
    deep = verify(Store(root), deep=True, progress=False)
    assert {p.array for p in deep.problems} == {TAP} and not deep.ok
    code, out = cli(monkeypatch, capsys, "verify", root, "--deep")
    assert code == 1 and TAP in out


def test_repair_rebuilds_an_array_whose_metadata_was_edited(damaged, pristine):
    root, feats = damaged
    path = meta_path(feats, TAP)
    meta = json.loads(path.read_text())
    _edit_meta(meta, "endian")
    path.write_text(json.dumps(meta))
    rep = repair(Store(root), progress=False)
    assert rep.after.ok, rep.after.summary()
    np.testing.assert_array_equal(Store(root).find("features", feats.key).read(TAP), pristine["data"][TAP])


# -- 4. an edited recipe ------------------------------------------------------------------------

def test_an_edited_manifest_recipe_is_not_served(damaged, monkeypatch, capsys, tmp_path):
    root, feats = damaged
    path = feats.loc.path(f"{feats.prefix}/manifest.json")
    man = json.loads(path.read_text())
    man["recipe"]["t"], man["about"]["t"] = 300, 300
    path.write_text(json.dumps(man))
    with pytest.raises(VermouthError, match="recipe does not hash to the key"):
        Store(root).find("features", feats.key).read(TAP)
    code, out = cli(monkeypatch, capsys, "ls", root)
    assert code == 0 and "300" not in out and "damaged" in out
    code, out = cli(monkeypatch, capsys, "export", root, "--out", tmp_path / "x.h5", "--dataset",
                    Path(root).parent / "missing-on-purpose", "--t", "300")
    assert code == 1
    v = verify(Store(root), progress=False)
    assert any("does not hash to the key" in p.what and p.entry == feats.prefix for p in v.problems)


def test_an_edited_shard_count_in_the_manifest_is_refused(damaged):
    """n_samples and shard_size are outside the key; the records' manifest digest covers them."""
    root, feats = damaged
    path = feats.loc.path(f"{feats.prefix}/manifest.json")
    man = json.loads(path.read_text())
    man["about"]["resolution"] = 512
    path.write_text(json.dumps(man))
    with pytest.raises(VermouthError, match="shard 0: the manifest was changed after this shard was written"):
        Store(root).find("features", feats.key).read(TAP, [0])


# -- 5. malformed store files ---------------------------------------------------------------------

def _malform(root: Path, feats, what: str) -> None:
    def edit(rel: str, fn):
        p = root / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))

    ds = feats.manifest["about"]["dataset_record"]
    if what == "manifest is a list":
        edit(f"{feats.prefix}/manifest.json", lambda m: [m])
    elif what == "n_samples is text":
        edit(f"{feats.prefix}/manifest.json", lambda m: {**m, "n_samples": "five"})
    elif what == "record of the wrong shape":
        edit(f"{feats.prefix}/shards/{TAP}/000001.json", lambda r: {**r, "status": "ok"})
    elif what == "dataset record reference climbs out":
        edit(f"{feats.prefix}/manifest.json", lambda m: {**m, "about": {**m["about"], "dataset_record": "../../x"}})
    elif what == "dataset record ids are a number":
        edit(f"datasets/{ds}.json", lambda d: {**d, "ids": 5})
    elif what == "store marker":
        edit("vermouth-store.json", lambda m: {"schema_version": "two"})


@pytest.mark.parametrize("what", ["manifest is a list", "n_samples is text", "record of the wrong shape",
                                  "dataset record reference climbs out", "dataset record ids are a number",
                                  "store marker"])
def test_malformed_store_files_give_one_line_from_every_command(damaged, what, monkeypatch, capsys, tmp_path):
    root, feats = damaged
    _malform(root, feats, what)
    for args in (["ls", root], ["verify", root, "--deep"],
                 ["export", root, "--out", tmp_path / "x.h5", "--entry", feats.key]):
        code, out = cli(monkeypatch, capsys, *args)  # asserts no traceback
        if args[0] == "ls" and what.startswith("dataset record"):
            continue  # ls reads no dataset record: it shows nothing that file says
        if args[0] == "ls" and code == 0:
            assert "damaged" in out, out
            continue
        assert code == 1, (args, out)
    if what != "store marker":
        v = verify(Store(root), deep=True, progress=False)
        assert not v.ok


# -- 10. other records that can lie -------------------------------------------------------------

def test_rotated_dataset_ids_are_refused(damaged, monkeypatch, capsys, tmp_path):
    root, feats = damaged
    ds = feats.manifest["about"]["dataset_record"]
    path = root / "datasets" / f"{ds}.json"
    rec = json.loads(path.read_text())
    rec["ids"] = rec["ids"][1:] + rec["ids"][:1]
    path.write_text(json.dumps(rec))
    with pytest.raises(VermouthError, match="does not hash to its key"):
        Store(root).dataset(ds)
    code, out = cli(monkeypatch, capsys, "export", root, "--out", tmp_path / "x.h5", "--entry", feats.key)
    assert code == 1 and "does not hash to its key" in out
    assert any(p.entry == f"datasets/{ds}.json" for p in verify(Store(root), progress=False).problems)


def test_a_tap_whose_metadata_is_deleted_is_not_left_out(damaged, pristine, monkeypatch, capsys, tmp_path):
    root, feats = damaged
    meta_path(feats, TAP).unlink()
    code, out = cli(monkeypatch, capsys, "export", root, "--out", tmp_path / "x.h5", "--entry", feats.key)
    assert code == 1 and TAP in out and "zarr.json" in out
    assert not (tmp_path / "x.h5").exists()
    v = verify(Store(root), progress=False)
    assert {p.array for p in v.problems} == {TAP}
    assert repair(Store(root), progress=False).after.ok
    np.testing.assert_array_equal(Store(root).find("features", feats.key).read(TAP), pristine["data"][TAP])


def test_a_store_of_an_older_schema_is_refused_with_a_message(damaged):
    root, _ = damaged
    (root / "vermouth-store.json").write_text(json.dumps({"schema_version": 1, "created_by": "vermouth-cache 0.1.0"}))
    with pytest.raises(VermouthError, match="older vermouth-cache.*extract into a new store"):
        Store(root)
