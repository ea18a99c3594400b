"""load_dataset: the three formats, labels, splits, few-shot subsets, identity and every refusal."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.samples import Dataset, Sample
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERMOUTH_CACHE_HOME", str(tmp_path / "cache-home"))


def make_image(path: Path, seed: int = 0, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_folder(root: Path, classes=("cat", "dog"), per_class=3, ext=".png") -> Path:
    for c, cls in enumerate(classes):
        for i in range(per_class):
            make_image(root / cls / f"{i:03d}{ext}", seed=c * 100 + i)
    return root


def write_coop(path: Path, splits: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits))
    return path


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def errmsg(fn, *args, **kwargs) -> str:
    with pytest.raises(VermouthError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- image folders


def test_folder_labels_classnames_and_ids(tmp_path):
    root = make_folder(tmp_path / "pets", classes=("dog", "cat", "bird"), per_class=2)
    (root / "dog" / "notes.txt").write_text("not an image")
    make_image(root / "dog" / "UPPER.JPG", seed=9)
    (root / "dog" / "nested").mkdir()
    make_image(root / "dog" / "nested" / "deep.png")  # not directly in the class folder
    make_image(root / "stray.png")  # not in a class folder
    ds = load_dataset(root)
    assert ds.name == "pets"
    assert ds.root == root
    assert ds.classnames == ("bird", "cat", "dog")
    assert [s.id for s in ds.samples] == sorted(s.id for s in ds.samples)
    by_id = {s.id: s for s in ds.samples}
    assert set(by_id) == {
        "bird/000.png", "bird/001.png", "cat/000.png", "cat/001.png",
        "dog/000.png", "dog/001.png", "dog/UPPER.JPG",
    }
    assert by_id["dog/UPPER.JPG"].label == 2 and by_id["dog/UPPER.JPG"].classname == "dog"
    assert by_id["bird/001.png"].path == root / "bird" / "001.png"
    assert by_id["bird/001.png"].path.is_absolute()
    assert len(ds) == 7
    assert ds.source["kind"] == "folder" and ds.source["split"] is None


def test_folder_refuses_split_and_empty(tmp_path):
    root = make_folder(tmp_path / "pets")
    assert "split" in errmsg(load_dataset, root, split="train")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    assert "empty" in errmsg(load_dataset, tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    make_image(tmp_path / "flat" / "a.png")
    assert str(tmp_path / "flat") in errmsg(load_dataset, tmp_path / "flat")


def test_missing_spec_and_unknown_type(tmp_path):
    assert "nope" in errmsg(load_dataset, tmp_path / "nope")
    (tmp_path / "data.txt").write_text("x")
    assert "data.txt" in errmsg(load_dataset, tmp_path / "data.txt")


# ---------------------------------------------------------------- CoOp split files


def coop_fixture(tmp_path) -> Path:
    base = tmp_path / "oxford_pets"
    for name in ("a.jpg", "b.jpg", "c.jpg", "sub/d.jpg"):
        make_image(base / "images" / name, seed=len(name) + ord(name[0]))
    return write_coop(base / "split_zhou_OxfordPets.json", {
        "train": [["a.jpg", 0, "abyssinian"], ["sub/d.jpg", 1, "beagle"]],
        "val": [["b.jpg", 1, "beagle"]],
        "test": [["c.jpg", 2, "chihuahua"]],
    })


def test_coop_split_and_classnames_from_all_splits(tmp_path):
    spec = coop_fixture(tmp_path)
    ds = load_dataset(spec, split="test")
    assert ds.name == "OxfordPets/test"
    assert ds.root == spec.parent / "images"
    assert ds.classnames == ("abyssinian", "beagle", "chihuahua")
    assert [(s.id, s.label, s.classname, s.split) for s in ds.samples] == [
        ("c.jpg", 2, "chihuahua", "test")
    ]
    train = load_dataset(spec, split="train")
    assert [s.id for s in train.samples] == ["a.jpg", "sub/d.jpg"]
    assert train.classnames == ds.classnames
    assert train.source == {"kind": "coop", "spec": str(spec), "split": "train",
                            "shots": None, "shot_seed": None}


def test_coop_image_root_choices(tmp_path):
    spec = coop_fixture(tmp_path)
    other = tmp_path / "elsewhere"
    make_image(other / "c.jpg")
    assert load_dataset(spec, split="test", image_root=other).samples[0].path == other / "c.jpg"
    # Without an images/ directory, paths are relative to the JSON's directory.
    flat = tmp_path / "flat"
    make_image(flat / "x.png")
    spec2 = write_coop(flat / "split_zhou_Flat.json", {"test": [["x.png", 0, "thing"]]})
    assert load_dataset(spec2, split="test").samples[0].path == flat / "x.png"


def test_coop_split_errors(tmp_path):
    spec = coop_fixture(tmp_path)
    for split in (None, "holdout"):
        msg = errmsg(load_dataset, spec, split=split)
        assert str(spec) in msg and "test, train, val" in msg
    bad = write_coop(tmp_path / "x" / "split_zhou_X.json",
                     {"train": [["a.png", 0, "cat"]], "test": [["b.png", 0, "dog"]]})
    msg = errmsg(load_dataset, bad, split="train")
    assert "label 0" in msg and "'cat'" in msg and "'dog'" in msg
    empty = write_coop(tmp_path / "y" / "split_zhou_Y.json", {"train": [], "test": []})
    msg = errmsg(load_dataset, empty, split="val")
    assert "available: test, train" in msg
    msg = errmsg(load_dataset, empty, split="train")
    assert "empty" in msg and "'train'" in msg and str(empty) in msg
    malformed = write_coop(tmp_path / "z" / "split_zhou_Z.json", {"train": [["a.png", "0"]]})
    assert "train[0]" in errmsg(load_dataset, malformed, split="train")


@pytest.mark.parametrize("bad_path, words", [
    ("/etc/passwd", "absolute"),
    ("../outside.png", "escapes"),
    ("sub/../../outside.png", "escapes"),
])
def test_coop_refuses_unsafe_paths(tmp_path, bad_path, words):
    make_image(tmp_path / "outside.png")
    entries = [["ok.png", 0, "a"], [bad_path, 0, "a"]]
    spec = write_coop(tmp_path / "d" / "split_zhou_D.json", {"test": entries})
    make_image(tmp_path / "d" / "ok.png")
    msg = errmsg(load_dataset, spec, split="test")
    assert words in msg and bad_path in msg and "test[1]" in msg


def test_coop_missing_image_and_duplicates(tmp_path):
    base = tmp_path / "d"
    make_image(base / "a.png")
    spec = write_coop(base / "split_zhou_D.json",
                      {"test": [["a.png", 0, "x"], ["gone.png", 0, "x"]]})
    msg = errmsg(load_dataset, spec, split="test")
    assert str(base / "gone.png") in msg and "test[1]" in msg
    spec = write_coop(base / "split_zhou_D.json",
                      {"test": [["a.png", 0, "x"], ["./a.png", 0, "x"]]})
    msg = errmsg(load_dataset, spec, split="test")
    assert "duplicate" in msg and "'a.png'" in msg


# ---------------------------------------------------------------- CSV / JSONL manifests


def manifest_images(base: Path) -> Path:
    for i, name in enumerate(("p/1.png", "p/2.png", "s/1.png", "s/2.png")):
        make_image(base / name, seed=i)
    make_image(base / "m" / "1.png")
    return base


def test_csv_manifest_full_columns(tmp_path):
    base = manifest_images(tmp_path / "pacs")
    spec = write_csv(base / "pacs.csv", ["path", "label", "classname", "split", "domain", "mask"], [
        ["s/2.png", 1, "horse", "test", "sketch", ""],
        ["p/1.png", 0, "dog", "train", "photo", "m/1.png"],
        ["p/2.png", 1, "horse", "train", "photo", ""],
        ["s/1.png", 0, "dog", "test", "sketch", ""],
    ])
    ds = load_dataset(spec)
    assert ds.name == "pacs" and ds.source["kind"] == "manifest"
    assert ds.classnames == ("dog", "horse")
    assert [s.id for s in ds.samples] == ["p/1.png", "p/2.png", "s/1.png", "s/2.png"]
    first = ds.samples[0]
    assert first == Sample("p/1.png", base / "p/1.png", 0, "dog", "train", "photo",
                           base / "m/1.png")
    assert ds.samples[1].mask is None
    test = load_dataset(spec, split="test")
    assert [(s.id, s.domain, s.split) for s in test.samples] == [
        ("s/1.png", "sketch", "test"), ("s/2.png", "sketch", "test")]
    msg = errmsg(load_dataset, spec, split="val")
    assert "'val'" in msg and str(spec) in msg and "empty" in msg


def test_jsonl_manifest_name_labels_and_image_root(tmp_path):
    base = manifest_images(tmp_path / "imgs")
    spec = write_jsonl(tmp_path / "lists" / "mini.jsonl", [
        {"path": "p/1.png", "label": "zebra", "split": "train"},
        {"path": "p/2.png", "label": "ant", "split": "train"},
        {"path": "s/1.png", "label": "mole", "split": "test"},
    ])
    ds = load_dataset(spec, image_root=base, split="train")
    # Labels from sorted unique names over ALL rows, so train and test agree.
    assert ds.classnames == ("ant", "mole", "zebra")
    assert [(s.id, s.label, s.classname) for s in ds.samples] == [
        ("p/1.png", 2, "zebra"), ("p/2.png", 0, "ant")]
    assert ds.name == "mini/train" and ds.root == base
    # Without image_root, paths are relative to the manifest's directory, where they don't exist.
    msg = errmsg(load_dataset, spec, split="train")
    assert str(tmp_path / "lists" / "p/1.png") in msg and "line 1" in msg


def test_manifest_int_labels_without_classnames_and_unlabelled(tmp_path):
    base = manifest_images(tmp_path)
    spec = write_jsonl(base / "ints.jsonl",
                       [{"path": "p/1.png", "label": 2}, {"path": "p/2.png", "label": 0}])
    ds = load_dataset(spec)
    assert ds.classnames == ("0", "1", "2") and [s.label for s in ds.samples] == [2, 0]
    spec = write_csv(base / "plain.csv", ["path"], [["p/1.png"], ["s/1.png"]])
    ds = load_dataset(spec)
    assert ds.classnames == () and all(s.label is None and s.classname is None for s in ds.samples)
    assert "label" in errmsg(load_dataset, spec, shots=1)


def test_manifest_errors_name_the_culprit(tmp_path):
    base = manifest_images(tmp_path)
    spec = write_csv(base / "nosplit.csv", ["path", "label"], [["p/1.png", 0]])
    msg = errmsg(load_dataset, spec, split="train")
    assert "split" in msg and str(spec) in msg
    spec = write_csv(base / "nopath.csv", ["file", "label"], [["p/1.png", 0]])
    assert "path" in errmsg(load_dataset, spec)
    spec = write_csv(base / "abs.csv", ["path"], [["p/1.png"], [str(base / "p/2.png")]])
    msg = errmsg(load_dataset, spec)
    assert "line 3" in msg and "absolute" in msg and str(base / "p/2.png") in msg
    spec = write_csv(base / "esc.csv", ["path"], [["../p/1.png"]])
    msg = errmsg(load_dataset, spec)
    assert "line 2" in msg and "../p/1.png" in msg
    spec = write_csv(base / "dup.csv", ["path"], [["p/1.png"], ["s/1.png"], ["p//1.png"]])
    msg = errmsg(load_dataset, spec)
    assert "duplicate" in msg and "line 4" in msg and "p/1.png" in msg
    spec = write_csv(base / "gone.csv", ["path"], [["p/1.png"], ["p/nope.png"]])
    msg = errmsg(load_dataset, spec)
    assert "line 3" in msg and str(base / "p/nope.png") in msg
    spec = write_csv(base / "nomask.csv", ["path", "mask"], [["p/1.png", "m/none.png"]])
    msg = errmsg(load_dataset, spec)
    assert "mask" in msg and str(base / "m/none.png") in msg
    spec = write_csv(base / "conflict.csv", ["path", "label", "classname"],
                     [["p/1.png", 0, "dog"], ["p/2.png", 0, "cat"]])
    msg = errmsg(load_dataset, spec)
    assert "label 0" in msg and "'dog'" in msg and "'cat'" in msg
    spec = write_jsonl(base / "badjson.jsonl", [{"path": "p/1.png"}])
    spec.write_text(spec.read_text() + "{oops\n")
    assert "line 2" in errmsg(load_dataset, spec)
    spec = write_csv(base / "empty.csv", ["path"], [])
    msg = errmsg(load_dataset, spec)
    assert "empty" in msg and str(spec) in msg


# ---------------------------------------------------------------- few-shot subsets


def test_shots_deterministic_seeded_and_coop_style(tmp_path):
    root = make_folder(tmp_path / "pets", classes=("a", "b", "c"), per_class=6)
    ds = load_dataset(root, shots=2, shot_seed=1)
    again = load_dataset(root, shots=2, shot_seed=1)
    assert [s.id for s in ds.samples] == [s.id for s in again.samples]
    assert len(ds) == 6 and [s.id for s in ds.samples] == sorted(s.id for s in ds.samples)
    assert sorted(s.label for s in ds.samples) == [0, 0, 1, 1, 2, 2]
    assert ds.classnames == ("a", "b", "c")
    assert ds.source["shots"] == 2 and ds.source["shot_seed"] == 1
    # Reference: one Random(seed), sampled in label order from id-sorted members.
    full = load_dataset(root)
    rng = random.Random(1)
    expected = []
    for label in range(3):
        items = sorted((s for s in full.samples if s.label == label), key=lambda s: s.id)
        expected += [s.id for s in rng.sample(items, 2)]
    assert [s.id for s in ds.samples] == sorted(expected)
    subsets = {tuple(s.id for s in load_dataset(root, shots=2, shot_seed=seed).samples)
               for seed in range(5)}
    assert len(subsets) > 1
    assert load_dataset(root, shots=6).samples == full.samples


def test_shots_errors(tmp_path):
    root = make_folder(tmp_path / "pets", classes=("many", "few"), per_class=3)
    os.remove(root / "few" / "000.png")
    msg = errmsg(load_dataset, root, shots=3)
    assert "'few'" in msg and "3" in msg
    for k in (0, -1):
        assert "shots" in errmsg(load_dataset, root, shots=k)


# ---------------------------------------------------------------- identity


def test_identity_content_only(tmp_path):
    a = make_folder(tmp_path / "a")
    ident = load_dataset(a).identity()
    # Reference formula.
    ds = load_dataset(a)
    pairs = sorted([s.id, hashlib.sha256(s.path.read_bytes()).hexdigest()] for s in ds.samples)
    assert ident == hashlib.sha256(canonical_json(pairs).encode()).hexdigest()
    assert ds.describe() == {"name": "a", "n_samples": 6, "identity": ident,
                             "source": ds.source, "classnames": ["cat", "dog"]}
    # Same bytes under another root, written in another order, with other mtimes.
    b = tmp_path / "elsewhere" / "b"
    for s in reversed(ds.samples):
        (b / s.id).parent.mkdir(parents=True, exist_ok=True)
        (b / s.id).write_bytes(s.path.read_bytes())
        os.utime(b / s.id, (1_000_000, 1_000_000))
    assert load_dataset(b).identity() == ident
    # A manifest listing the same files in another order has the same identity.
    rows = [[s.id, s.label] for s in reversed(ds.samples)]
    manifest = write_csv(tmp_path / "m.csv", ["path", "label"], rows)
    assert load_dataset(manifest, image_root=a).identity() == ident
    # Changed bytes under the same name change it.
    make_image(b / "cat" / "001.png", seed=12345)
    assert load_dataset(b).identity() != ident


def test_identity_is_cached_on_the_instance(tmp_path):
    root = make_folder(tmp_path / "a", per_class=1)
    ds = load_dataset(root)
    first = ds.identity()
    make_image(root / "cat" / "000.png", seed=777)  # the memo is not consulted again
    assert ds.identity() == first
    assert load_dataset(root).identity() != first
    assert isinstance(ds, Dataset) and ds == load_dataset(root)


def test_options_a_dense_dataset_cannot_use_are_refused_not_ignored(tmp_path):
    from vermouth_cache.data.synthetic_dense import make_depth, make_refer

    depth = make_depth(tmp_path / "nyu", n_train=2, n_test=1)
    assert len(load_dataset(depth, split="train", views=3)) == 2 * 3
    with pytest.raises(VermouthError, match="split test has its fixed views"):
        load_dataset(depth, split="test", views=3)
    with pytest.raises(VermouthError, match="--slide cuts sliding windows of a segmentation dataset; .* depth root"):
        load_dataset(depth, split="test", slide=64)
    refer = make_refer(tmp_path / "refcoco", n_train=2, n_val=1)
    with pytest.raises(VermouthError, match="referring dataset"):
        load_dataset(refer, split="val", slide=64)
    with pytest.raises(VermouthError, match="is not a depth root"):
        load_dataset(refer, split="val", views=2)
    (refer / "refs(unc).p").unlink()
    with pytest.raises(VermouthError, match=r"has instances.json but no refs\(unc\|umd\|google\).p"):
        load_dataset(refer, split="val")
