"""Bad input: one clear line naming the culprit, exit status 1, no traceback, a consistent store."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO_SPLIT, cli
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.run import extract
from vermouth_cache.store.listing import table
from vermouth_cache.store.entries import Store


@pytest.fixture
def base_args(tiny, tmp_path, folder):
    return [folder, "--store", tmp_path / "store", "--sd-model", tiny["sd"], "--captioner", tiny["blip"],
            "--resolution", "128", "--device", "cpu", "--quiet", "--shard-size", "2"]


@pytest.mark.parametrize("extra,culprit", [
    (["--stages", "mid,sideways"], "unknown stage 'sideways'"),
    (["--taps", "up_blocks.7"], "unknown tap 'up_blocks.7'"),
    (["--t", "1000"], "timestep 1000 is outside 0-999"),
    (["--t", "-5"], "timestep -5 is outside 0-999"),
    (["--t", "ten"], "--t takes whole numbers"),
    (["--prompt", "caption-please"], "unknown prompt mode 'caption-please'"),
    (["--attn-maps", "left"], "unknown stage 'left'"),
    (["--resolution", "100"], "--resolution 100 must be a multiple of 64"),
    (["--noise", "none", "--noise-draws", "2"], "noise mode 'none' has none"),
    (["--device", "tpu"], "device 'tpu'"),
])
def test_bad_options(monkeypatch, capsys, base_args, extra, culprit):
    code, out, err = cli(monkeypatch, capsys, "extract", *base_args, *extra)
    assert code == 1 and culprit in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_and_wrong_models(monkeypatch, capsys, base_args, tmp_path, tiny):
    args = list(base_args)
    i = args.index("--sd-model")
    args[i + 1] = tmp_path / "no-such-dir"
    code, _, err = cli(monkeypatch, capsys, "extract", *args)
    assert code == 1 and "no-such-dir" in err and "no such model directory" in err
    args[i + 1] = tiny["blip"]  # a transformers dir, not a diffusers pipeline
    code, _, err = cli(monkeypatch, capsys, "extract", *args)
    assert code == 1 and "not a diffusers pipeline directory" in err
    args[i + 1] = "some-org/some-model"  # a hub id, and no hub here
    code, _, err = cli(monkeypatch, capsys, "extract", *args)
    assert code == 1 and "some-org/some-model" in err and "cannot fetch" in err
    j = args.index("--captioner")
    args[i + 1], args[j + 1] = tiny["sd"], tiny["sd"] / "unet"  # no BLIP there
    code, _, err = cli(monkeypatch, capsys, "extract", *args)
    assert code == 1 and "BlipProcessor" in err and "Traceback" not in err


def test_empty_dataset_and_missing_dataset(monkeypatch, capsys, base_args, tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    code, _, err = cli(monkeypatch, capsys, "extract", tmp_path / "empty", *base_args[1:])
    assert code == 1 and "empty" in err
    code, _, err = cli(monkeypatch, capsys, "extract", tmp_path / "nothing-here", *base_args[1:])
    assert code == 1 and "nothing-here" in err


def test_newer_schema_store_is_refused(monkeypatch, capsys, base_args, tmp_path):
    store = tmp_path / "store"
    Store(store, create=True)
    marker = store / "vermouth-store.json"
    marker.write_text(json.dumps({"schema_version": 99}))
    code, _, err = cli(monkeypatch, capsys, "extract", *base_args)
    assert code == 1 and "newer vermouth-cache (schema 99" in err
    code, _, err = cli(monkeypatch, capsys, "ls", store)
    assert code == 1 and "schema 99" in err


def test_not_a_store(monkeypatch, capsys, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "ls", tmp_path)
    assert code == 1 and "not a vermouth-cache store" in err


def _corrupt(folder):
    good = (folder / "cat" / "01.png").read_bytes()
    (folder / "cat" / "01.png").write_bytes(good[: len(good) // 2])  # truncated
    (folder / "dog" / "00.png").write_bytes(b"")  # 0 bytes


def test_corrupt_image_fails_by_default_and_leaves_a_consistent_store(monkeypatch, capsys, base_args, folder, tmp_path):
    _corrupt(folder)
    code, _, err = cli(monkeypatch, capsys, "extract", *base_args)
    assert code == 1 and "cat/01.png" in err and "truncated" in err and "--on-error skip" in err
    store = Store(tmp_path / "store")
    feats = store.entries("features")
    # shard 0 (cat/00, cat/01) holds the bad image: nothing of it was committed
    for entry in store.entries():
        for name in entry.array_names() or ["captions"]:
            assert 0 not in entry.done_shards(name)
    assert feats  # the entry exists, and reading its missing samples refuses
    with pytest.raises(VermouthError):
        feats[0].read(feats[0].array_names()[0] if feats[0].array_names() else "mid_block", [0])


def test_corrupt_images_skipped_are_recorded_per_sample(request_for, folder, tmp_path):
    _corrupt(folder)
    rep = extract(request_for(folder, on_error="skip", stages="mid", t=(200,)))
    assert set(rep.failed) == {"cat/01.png", "dog/00.png"}
    assert "truncated" in rep.failed["cat/01.png"] and "0 bytes" in rep.failed["dog/00.png"]
    store = Store(tmp_path / "store")
    entry = store.find("features", rep.entries["features t=200"])
    st = entry.statuses("mid_block")
    assert st[0] == "ok" and st[1].startswith("error: truncated") and st[3].startswith("error: empty")
    with pytest.raises(VermouthError, match="truncated"):
        entry.read("mid_block", [1])
    assert np.isfinite(entry.read("mid_block", [0, 2, 4])).all()
    assert np.isnan(entry._array("mid_block")[1]).all()  # a failed sample's row is NaN, never zeros
    assert "3/5 (2 failed)" in table(store, "features")
    from vermouth_cache.store.export import export_h5

    res = export_h5(store, tmp_path / "f.h5")
    assert res["samples"] == 3 and res["excluded"] == 2


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vermouth_cache.cli", "extract", str(tmp_path), "--store",
                           str(tmp_path / "s"), "--t", "1200"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: timestep 1200 is outside 0-999"


def test_train_bad_input_is_one_line(monkeypatch, capsys, tmp_path):
    code, _, err = cli(monkeypatch, capsys, "train", "fewshot", "--store", tmp_path / "nostore", "--dataset",
                       DEMO_SPLIT, "--out", tmp_path / "run")
    assert code == 1 and "is not a vermouth-cache store" in err and "Traceback" not in err
    code, _, err = cli(monkeypatch, capsys, "train", "sbir", "--store", tmp_path, "--dataset", tmp_path,
                       "--out", tmp_path / "run", "--t", "1200")
    assert code == 1 and "outside 0-999" in err
    code, _, err = cli(monkeypatch, capsys, "train", "seg", "--store", tmp_path, "--dataset", tmp_path,
                       "--out", tmp_path / "run", "--iters", "0")
    assert code == 1 and "at least 1" in err
    code, out, _ = cli(monkeypatch, capsys, "train", "fewshot", "--help")
    for option in ("--shots", "--stages", "--expert", "--head", "--text-proj", "--temperature", "--schedule",
                   "--memory-gb", "--lr"):
        assert option in out
