"""Regression tests for bugs found by hostile testing (branch `breaker`). Each fails on the commit it
was written against; see the docstrings for the reproduction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import cli, make_images
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
    """5 ids, shards of 2; cat/01b.png is empty, so shard 1 holds a failed sample (#2) beside an ok one (#3)."""
    base = tmp_path_factory.mktemp("breaker")
    imgs = make_images(base / "imgs", {"cat": 3, "dog": 1})
    (imgs / "cat" / "01b.png").write_bytes(b"")
    req = ExtractRequest(dataset=str(imgs), store=str(base / "store"), sd_model=str(tiny["sd"]),
                         captioner=str(tiny["blip"]), resolution=64, device="cpu", shard_size=2, batch_size=2,
                         progress=False, taps=TAP, prompt="null", dtype="fp32", on_error="skip",
                         max_error_rate=0.5)
    rep = extract(req)
    feats = Store(req.store).find("features", rep.entries["features t=200"])
    assert feats.statuses(TAP)[2].startswith("error")
    return {"root": Path(req.store), "key": feats.key, "req": req}


@pytest.fixture
def copy(pristine, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(pristine["root"], root)
    return root, Store(root).find("features", pristine["key"])


def test_a_failed_sample_whose_status_is_edited_to_ok_never_reads_as_nan(copy):
    """Edit shard 1's record of a features tap: status "error: empty file (0 bytes)" -> "ok".
    Found: Entry.read, the lazy view, both loader modes return the NaN fill row for the failed
    sample and `verify --deep` says "no damage found". The record's statuses are not covered by any
    digest, so the commit can be rewritten to serve a number that was never computed."""
    root, entry = copy
    path = entry.loc.path(entry.record_key(TAP, 1))
    rec = json.loads(path.read_text())
    assert rec["status"][0].startswith("error") and rec["status"][1] == "ok"
    rec["status"][0] = "ok"
    path.write_text(json.dumps(rec))
    entry = Store(root, read_only=True).find("features", entry.key)

    def served(fn):
        try:
            x = np.asarray(fn())
        except VermouthError:
            return None
        return x

    readers = {
        "Entry.read": lambda: entry.read(TAP, [2, 3]),
        "lazy": lambda: open_tap(root, f"features/{entry.key}", TAP).data.compute(),
        "loader memory": lambda: next(iter(CacheLoader({"x": Field(entry, TAP)}, [2, 3], 2, mode="memory")))["x"],
        "loader stream": lambda: next(iter(CacheLoader({"x": Field(entry, TAP)}, [2, 3], 2, mode="stream")))["x"],
    }
    for name, fn in readers.items():
        x = served(fn)
        assert x is None or not bool(np.isnan(x).any()), f"{name} served NaN for a sample that was never computed"
    assert verify(Store(root, read_only=True), deep=True).problems, "verify --deep found nothing"


def test_verify_reports_an_entry_whose_dataset_record_is_missing(copy, monkeypatch, capsys):
    """Delete datasets/<key>.json. Found: `verify --deep` prints "no damage found" and exits 0,
    while `export`, lazy views and training all refuse the entry ("has no dataset record")."""
    root, entry = copy
    for p in (root / "datasets").glob("*.json"):
        p.unlink()
    assert cli(monkeypatch, capsys, "export", root, "--out", root.parent / "x.h5", "--entry", entry.key)[0] == 1
    code, out, err = cli(monkeypatch, capsys, "verify", "--deep", root)
    assert code == 1, out + err


def test_an_edited_caption_in_a_committed_record_is_not_served(copy, monkeypatch, capsys, tmp_path):
    """Edit the captions entry's shard 0 record: values[0] "" -> "a photo of a dog" (status stays ok).
    Found: the lazy view's `captions` and `export`'s /captions serve the edited text (the features
    were computed from the original caption) and `verify --deep` says "no damage found"."""
    root, entry = copy
    cap = Store(root).entries("captions")[0]
    path = cap.loc.path(cap.record_key("captions", 0))
    rec = json.loads(path.read_text())
    rec["values"][0] = "a photo of a dog"
    path.write_text(json.dumps(rec))
    try:
        captions = open_tap(root, f"features/{entry.key}", TAP).captions
    except VermouthError:
        captions = None
    assert captions is None or "a photo of a dog" not in captions, "lazy view served an edited caption"
    code, out, err = cli(monkeypatch, capsys, "export", root, "--out", tmp_path / "x.h5", "--entry", entry.key)
    if code == 0:
        import h5py

        with h5py.File(tmp_path / "x.h5") as f:
            assert b"a photo of a dog" not in list(f["captions"][:]), "export wrote an edited caption"
    assert verify(Store(root, read_only=True), deep=True).problems, "verify --deep found nothing"


def test_a_huge_chunk_is_refused_before_it_is_read_into_memory(copy):
    """Grow shard 0's chunk of a features tap to 512 MiB (sparse: `truncate -s 512M`; a symlink to
    /dev/zero is the unbounded case). Found: Entry.read (so export, lazy, loader) reads the whole
    file into memory before comparing its size with the record (`Path.read_bytes`): 512 MiB here,
    a MemoryError traceback under `ulimit -v`, or the machine's memory for /dev/zero. Shallow
    `verify` refuses it from `stat` alone; reads should too."""
    import tracemalloc

    root, entry = copy
    path = entry.loc.path(entry.chunk_key(TAP, 0))
    with open(path, "r+b") as f:
        f.truncate(512 << 20)
    entry = Store(root, read_only=True).find("features", entry.key)
    tracemalloc.start()
    try:
        with pytest.raises(VermouthError, match="shard 0"):
            entry.read(TAP, [0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"read allocated {peak >> 20} MiB for a {entry.chunk_nbytes(TAP)}-byte chunk"


@pytest.mark.parametrize("what", ["chunk", "record"])
def test_repair_mends_a_directory_standing_where_a_chunk_or_record_should_be(copy, monkeypatch, capsys, what):
    """Replace shard 0's chunk (or record) of a features tap with an empty directory of the same
    name, then `vermouth-cache repair STORE`. Found: a Python traceback (IsADirectoryError from
    `unlink` in `Entry.invalidate`), exit 1, nothing repaired. `verify` names the shard; `repair`
    should remove the directory and recompute the exact bytes."""
    root, entry = copy
    before = entry.read(TAP, [0, 1])
    key = entry.chunk_key(TAP, 0) if what == "chunk" else entry.record_key(TAP, 0)
    path = entry.loc.path(key)
    path.unlink()
    path.mkdir()
    code, out, err = cli(monkeypatch, capsys, "repair", root)
    assert "Traceback" not in err
    assert code == 0, err
    np.testing.assert_array_equal(Store(root).find("features", entry.key).read(TAP, [0, 1]), before)


def test_a_rerun_does_not_call_a_shard_cached_when_its_record_is_a_directory(pristine, copy):
    """Replace shard 0's record of a features tap with an empty directory, then run the same
    extraction again. Found: extract prints "computed: nothing (all cached)" and exits 0 (its
    listing counts the name), while every reader says samples #0-1 were "never computed" and
    `export` says "run extract again to finish it": the user is sent in a circle."""

    root, entry = copy
    path = entry.loc.path(entry.record_key(TAP, 0))
    path.unlink()
    path.mkdir()
    try:
        extract(pristine["req"].with_(store=str(root)))
    except VermouthError:
        return  # refusing, naming the shard, is also honest
    Store(root).find("features", entry.key).read(TAP, [0, 1])


def test_a_directory_named_used_json_does_not_crash_a_read(copy, monkeypatch, capsys, tmp_path):
    """Replace every entry's used.json (the gc use date) with a directory, then `export`. Found: a
    Python traceback (IsADirectoryError from `os.replace` in `Entry.touch`, which only catches
    VermouthError although "a full disk must not fail a read"); `extract` fails the same way."""
    root, entry = copy
    for used in root.glob("*/*/used.json"):
        used.unlink()
        used.mkdir()
    code, out, err = cli(monkeypatch, capsys, "export", root, "--out", tmp_path / "x.h5", "--entry", entry.key)
    assert "Traceback" not in err
    assert code == 0, err


@pytest.mark.parametrize("body", ["[]", '{"expires": "soon"}'])
def test_a_malformed_claim_file_is_one_line_not_a_traceback(pristine, copy, body):
    """Delete shard 0's record of a features tap (an interrupted run), write `[]` (or an `expires`
    that is text) to `claims/000000.0.json`, run the same extraction. Found: AttributeError /
    TypeError traceback from `claims.ClaimManager.alive` (claim files are not validated like the
    store's other JSON files). Expected: the damaged claim is taken over (as an unreadable one is)
    or one line naming the file."""

    root, entry = copy
    entry.loc.path(entry.record_key(TAP, 0)).unlink()
    claim = root / entry.prefix / "claims" / "000000.0.json"
    claim.parent.mkdir(exist_ok=True)
    claim.write_text(body)
    try:
        extract(pristine["req"].with_(store=str(root)))
    except VermouthError:
        return
    Store(root).find("features", entry.key).read(TAP, [0, 1])


def test_gc_removes_the_damaged_entry_its_own_message_says_to_remove(copy, monkeypatch, capsys):
    """Edit a features manifest's recipe (t 200 -> 201). Every reader refuses it: "...Remove it with
    `vermouth-cache gc --entry features/KEY` and extract again". Found: that very command fails with
    the same message (exit 1; `gc.Doomed.line` reads the checked manifest), and `gc --unused-days N`
    fails for the whole store as soon as one entry is damaged: a damaged entry can never be removed."""
    root, entry = copy
    path = root / entry.prefix / "manifest.json"
    body = json.loads(path.read_text())
    body["recipe"]["t"] = 201
    path.write_text(json.dumps(body))
    code, out, err = cli(monkeypatch, capsys, "gc", root, "--entry", f"features/{entry.key}", "--yes")
    assert code == 0, err
    assert not (root / entry.prefix).exists()
