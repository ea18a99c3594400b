"""`export` streams: one store shard of one array in memory at a time, expert maps included,
optionally compressed, the values equal to the store's and failed samples left out."""

from __future__ import annotations

import h5py
import numpy as np

from conftest import cli, make_images
from vermouth_cache.extract.run import extract
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry


def test_export_streams_shard_by_shard_with_expert_maps(request_for, tiny, tmp_path, monkeypatch, capsys):
    data = make_images(tmp_path / "imgs", {"cat": 4, "dog": 3})
    (data / "dog" / "01.png").write_bytes(b"broken")
    req = request_for(data, stages="mid", expert="resnet18", expert_model=str(tiny["resnet18"]), on_error="skip",
                      prompt="null")
    rep = extract(req)
    store = Store(req.store)
    feats = store.find("features", rep.entries["features t=200"])
    expert = store.find("expert", rep.entries["expert"])
    reads = []
    real = Entry.read
    monkeypatch.setattr(Entry, "read", lambda self, name, idx=None: reads.append(
        len(range(self.n_samples)[idx] if isinstance(idx, slice) or idx is None else idx)) or real(self, name, idx))
    out = tmp_path / "x.h5"
    code, stdout, _ = cli(monkeypatch, capsys, "export", req.store, "--out", str(out), "--expert",
                          "--compression", "gzip", "--quiet")
    assert code == 0 and f"expert {expert.key[:12]}" in stdout and "1 failed samples excluded" in stdout
    assert reads and max(reads) <= feats.shard_size  # never more than one shard of one array at once
    keep = [i for i, s in enumerate(feats.statuses("mid_block")) if s == "ok"]
    with h5py.File(out) as f:
        assert len(f["sample_ids"]) == 6 and b"dog/01.png" not in list(f["sample_ids"][:])
        assert f["features/mid_block"].compression == "gzip" and f["features/mid_block"].chunks[0] == feats.shard_size
        np.testing.assert_array_equal(f["features/mid_block"][:], real(feats, "mid_block", keep))
        for level in expert.array_names():
            np.testing.assert_array_equal(f[f"expert/{level}"][:], real(expert, level, keep))
        assert f.attrs["expert_key"] == expert.key


def test_export_expert_refusals_are_one_line(request_for, folder, monkeypatch, capsys, tmp_path):
    req = request_for(folder, stages="mid", prompt="null")
    extract(req)
    code, _, err = cli(monkeypatch, capsys, "export", req.store, "--out", str(tmp_path / "x.h5"), "--expert")
    assert code != 0 and "holds no expert features" in err and "Traceback" not in err
    code, _, err = cli(monkeypatch, capsys, "export", req.store, "--out", str(tmp_path / "x.h5"), "--expert-entry", "ab")
    assert code != 0 and "--expert-entry chooses the expert entry of --expert" in err


def test_export_pairs_the_features_with_the_expert_maps_of_their_codec(request_for, tiny, tmp_path, monkeypatch,
                                                                      capsys):
    """Two codecs of one recipe, each with its expert maps: `export --codec zstd --expert` takes the
    zstd features and the zstd expert maps (as `train --codec` does), not an ambiguity error."""
    data = make_images(tmp_path / "imgs", {"cat": 2, "dog": 1})
    req = request_for(data, stages="mid", expert="resnet18", expert_model=str(tiny["resnet18"]), prompt="null")
    extract(req)
    rep = extract(req.with_(codec="zstd"))
    zstd_expert = Store(req.store).find("expert", rep.entries["expert"])
    out = tmp_path / "x.h5"
    code, stdout, err = cli(monkeypatch, capsys, "export", req.store, "--out", str(out), "--dataset", str(data),
                            "--codec", "zstd", "--prompt", "null", "--resolution", "128", "--expert", "--quiet")
    assert code == 0, err
    with h5py.File(out) as f:
        assert f.attrs["expert_key"] == zstd_expert.key and f.attrs["key"] == rep.entries["features t=200"]
