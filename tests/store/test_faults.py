"""Faults: kill -9 at random points, a truncated and a corrupted chunk, a full disk. After each,
the store is consistent (nothing uncomputed reads back), `verify` names what is wrong, and a
resumed run or `repair` ends with exactly the bytes of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import is_debris, make_images, record_content, store_bytes
from vermouth_cache.extract.repair import repair
from vermouth_cache.store.check import verify
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store

# Counts every write of a store (JSON through LocalLocation, chunks and Zarr metadata through
# zarr's LocalStore); in "kill" mode, at write number K it leaves half of that write's bytes in a
# temporary file, as a kill during the write would, and SIGKILLs itself.
KILLER = textwrap.dedent("""
    import json, os, signal, sys
    import zarr.storage._local as zlocal
    import vermouth_cache.store.local as storage
    mode, k, count_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    seen = {"n": 0, "kinds": []}

    def hit(kind, leave_half):
        seen["n"] += 1
        seen["kinds"].append(kind)
        if mode == "kill" and seen["n"] == k:
            leave_half()
            os.kill(os.getpid(), signal.SIGKILL)

    orig_temp = storage.LocalLocation._write_temp
    def write_temp(self, key, data):
        p = self.path(key)
        def half():
            p.parent.mkdir(parents=True, exist_ok=True)
            (p.parent / f".{p.name}.killed.tmp").write_bytes(data[: len(data) // 2])
        hit("record" if "/shards/" in key else "claim" if "/claims/" in key else "json", half)
        return orig_temp(self, key, data)
    storage.LocalLocation._write_temp = write_temp

    orig_put = zlocal._put
    def put(path, value, exclusive=False):
        def half():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_name(path.name + ".killed.partial").write_bytes(value.to_bytes()[: len(value) // 2])
        hit("chunk" if "/c/" in str(path) else "zarr-meta", half)
        return orig_put(path, value, exclusive)
    zlocal._put = put

    from vermouth_cache.cli.main import main
    try:
        main(sys.argv[4:], standalone_mode=False)
    finally:
        with open(count_file, "w") as f:
            json.dump(seen, f)
""")


@pytest.fixture(scope="module")
def kill_setup(tiny, tmp_path_factory):
    base = tmp_path_factory.mktemp("kill")
    data = make_images(base / "d", {"a": 4, "b": 3})
    args = ["extract", str(data), "--sd-model", str(tiny["sd"]), "--captioner", str(tiny["blip"]), "--resolution",
            "128", "--device", "cpu", "--shard-size", "2", "--t", "100,300", "--stages", "mid,up", "--quiet"]
    env = {**os.environ, "VERMOUTH_CACHE_HOME": str(base / "home")}
    script = base / "killer.py"
    script.write_text(KILLER)
    ref = subprocess.run([sys.executable, str(script), "count", "0", str(base / "count.json"), *args,
                          "--store", str(base / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    kinds = json.loads((base / "count.json").read_text())["kinds"]
    return {"base": base, "args": args, "env": env, "script": script, "kinds": kinds}


# three seeded random write numbers, and the first record after a chunk (between data and commit)
POINTS = ["random-0", "random-1", "random-2", "after-chunk"]


@pytest.mark.parametrize("point", POINTS)
def test_kill9_at_random_points_then_resume_is_bit_identical(kill_setup, point, monkeypatch):
    s = kill_setup
    kinds = s["kinds"]
    if point == "after-chunk":
        k = next(i for i in range(1, len(kinds)) if kinds[i - 1] == "chunk" and kinds[i] == "record") + 1
    else:
        k = random.Random(int(point[-1]) + 11).randrange(1, len(kinds) + 1)
    store = s["base"] / f"s-{point}"
    killed = subprocess.run([sys.executable, str(s["script"]), "kill", str(k), str(s["base"] / "c.json"), *s["args"],
                             "--store", str(store)], env=s["env"], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    ref = s["base"] / "ref"
    if (store / "vermouth-store.json").is_file():
        # consistent at the kill: no damage, only shards not computed yet, and none of those reads
        v = verify(Store(store), deep=True, progress=False)
        assert v.ok, v.summary()
        for entry in Store(store).entries():
            for name in entry.array_names():
                st = entry.statuses(name)
                missing = [i for i, x in enumerate(st) if x is None]
                if missing:
                    with pytest.raises(VermouthError, match="never computed"):
                        entry.read(name, missing[:1])
    resumed = subprocess.run([sys.executable, "-m", "vermouth_cache.cli", *s["args"], "--store", str(store)],
                             env=s["env"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert store_bytes(store) == store_bytes(ref)
    assert record_content(store) == record_content(ref)
    assert not list(store.rglob("claims/*.json"))  # every claim released
    # what the kill left half-written is never read; repair removes it (here: however young)
    from vermouth_cache.store import check

    monkeypatch.setattr(check, "DEBRIS_AGE", 0.0)
    out = repair(Store(store), progress=False)
    assert out.after.ok and not out.repaired and not out.after.debris
    assert not [p for p in store.rglob("*") if is_debris(p)]


@pytest.fixture
def small_store(request_for, folder):
    req = request_for(folder, t=(200,), stages="mid", prompt="null", dtype="fp32")
    rep = extract(req)
    return req, rep, Store(req.store)


def _chunk_path(entry, name, shard):
    return entry.loc.path(entry.chunk_key(name, shard))


def test_flipped_byte_and_truncated_chunk_are_found_refused_and_repaired(small_store, tmp_path):
    req, rep, store = small_store
    pristine = tmp_path / "pristine"
    shutil.copytree(req.store, pristine)
    feats = store.find("features", rep.entries["features t=200"])
    lat = store.find("latents", rep.entries["latents"])
    flipped, cut = _chunk_path(feats, "mid_block", 1), _chunk_path(lat, "latent", 2)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 3] ^= 0x10
    flipped.write_bytes(bytes(raw))
    cut.write_bytes(cut.read_bytes()[:-7])

    shallow = verify(store, deep=False, progress=False)
    assert [(p.entry, p.array, p.shard) for p in shallow.problems] == [(lat.prefix, "latent", 2)]
    assert "truncated" in shallow.problems[0].what and shallow.problems[0].samples == ["dog/01.png"]
    deep = verify(Store(req.store), deep=True, progress=False)
    found = {(p.entry, p.array, p.shard): p for p in deep.problems}
    assert set(found) == {(lat.prefix, "latent", 2), (feats.prefix, "mid_block", 1)}
    assert "checksum" in found[(feats.prefix, "mid_block", 1)].what
    assert found[(feats.prefix, "mid_block", 1)].samples == ["cat/02.png", "dog/00.png"]
    for entry, name, row in ((feats, "mid_block", 2), (lat, "latent", 4)):
        with pytest.raises(VermouthError, match="corrupt"):
            Store(req.store).find(entry.kind, entry.key).read(name, [row])
    assert Store(req.store).find("features", feats.key).read("mid_block", [0]).shape[0] == 1  # the rest reads

    rep_ = repair(Store(req.store), progress=False)
    assert rep_.repaired == {feats.prefix: {"mid_block": [1]}, lat.prefix: {"latent": [2]}}
    assert rep_.after.ok, rep_.after.summary()
    assert store_bytes(tmp_path / "store") == store_bytes(pristine)
    assert record_content(tmp_path / "store") == record_content(pristine)


def test_a_corrupt_record_is_named_and_repaired(small_store, tmp_path):
    req, rep, store = small_store
    pristine = tmp_path / "pristine"
    shutil.copytree(req.store, pristine)
    text = store.find("text", rep.entries["text"])
    rec = text.loc.path(text.record_key("cond", 0))
    rec.write_text(rec.read_text()[:20])
    v = verify(store, progress=False)
    assert [(p.entry, p.array, p.shard) for p in v.problems] == [(text.prefix, "cond", 0)]
    assert "unreadable record" in v.problems[0].what
    out = repair(store, progress=False)
    assert out.after.ok and record_content(tmp_path / "store") == record_content(pristine)
    assert store_bytes(tmp_path / "store") == store_bytes(pristine)


def test_repair_refuses_when_the_images_changed(small_store, folder):
    req, rep, store = small_store
    feats = store.find("features", rep.entries["features t=200"])
    chunk = _chunk_path(feats, "mid_block", 0)
    chunk.write_bytes(chunk.read_bytes()[:-1])
    (folder / "cat" / "00.png").write_bytes((folder / "dog" / "00.png").read_bytes())  # other bytes, same name
    out = repair(store, progress=False)
    assert feats.prefix in out.refused and "changed" in out.refused[feats.prefix]
    assert not out.after.ok


def test_disk_full_gives_a_clear_error_a_consistent_store_and_resumes(request_for, folder, tmp_path, monkeypatch):
    import zarr.storage._local as zlocal

    from vermouth_cache.store import local as storage

    req = request_for(folder, t=(200,), stages="mid", prompt="null", dtype="fp32")
    ref = extract(req.with_(store=str(tmp_path / "ref")))
    budget = {"writes": 25}

    def full(exc_source):
        def patched(*a, **k):
            budget["writes"] -= 1
            if budget["writes"] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return exc_source(*a, **k)
        return patched

    monkeypatch.setattr(storage.LocalLocation, "_write_temp", full(storage.LocalLocation._write_temp))
    monkeypatch.setattr(zlocal, "_put", full(zlocal._put))
    with pytest.raises(VermouthError, match="no space left") as exc:
        extract(req)
    assert "run the same command again" in str(exc.value)
    monkeypatch.undo()
    store = Store(req.store)
    v = verify(store, deep=True, progress=False)
    assert v.ok and v.incomplete, v.summary()  # cut short, nothing damaged
    assert not [p for p in (tmp_path / "store").rglob("*") if p.name.endswith(".tmp")]  # no temp file left
    extract(req)  # space is back
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "ref")
    assert record_content(tmp_path / "store") == record_content(tmp_path / "ref")
    assert ref.entries == extract(req).entries


def test_disk_full_on_the_command_line_is_one_line(request_for, folder, tmp_path, monkeypatch, capsys):
    from vermouth_cache.store import local as storage
    from vermouth_cache.cli.main import run

    def no_space(self, key, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage.LocalLocation, "_write_temp", no_space)
    req = request_for(folder)
    monkeypatch.setattr(sys, "argv", ["vermouth-cache", "extract", str(folder), "--store", str(tmp_path / "x"),
                                      "--sd-model", req.sd_model, "--captioner", req.captioner, "--quiet"])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_uncomputed_and_failed_samples_never_read_as_numbers(small_store):
    req, rep, store = small_store
    feats = store.find("features", rep.entries["features t=200"])
    feats.loc.delete(feats.record_key("mid_block", 1))
    with pytest.raises(VermouthError, match="never computed"):
        feats.read("mid_block", [2])
    assert np.isfinite(feats.read("mid_block", [0, 4])).all()
