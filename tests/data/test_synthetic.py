"""Synthetic datasets: byte-identical per seed, the right shapes, and classes a colour can tell."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.sbir import load_sbir
from vermouth_cache.data.seg import read_mask
from vermouth_cache.data.synthetic import make_classification, make_sbir, make_segmentation


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def mean_colours(paths) -> np.ndarray:
    return np.array([np.asarray(Image.open(p).convert("RGB"), np.float64).reshape(-1, 3).mean(0)
                     for p in paths])


SMALL = {
    make_classification: dict(n_classes=3, per_class=(3, 1, 2), size=32),
    make_sbir: dict(n_classes=4, photos_per_class=2, sketches_per_class=2, size=32),
    make_segmentation: dict(n_classes=3, n_images=3, size=32),
}


@pytest.mark.parametrize("make", list(SMALL), ids=lambda f: f.__name__)
def test_deterministic_per_seed(tmp_path, make):
    kw = SMALL[make]
    a, b = tmp_path / "a", tmp_path / "b"
    make(a, seed=3, **kw)
    make(b, seed=3, **kw)
    make(tmp_path / "c", seed=4, **kw)
    assert tree_hash(a) == tree_hash(b) != tree_hash(tmp_path / "c")
    images = [p for p in a.rglob("*.png") if "masks" not in p.parts]
    assert len({p.read_bytes() for p in images}) == len(images)  # all different
    assert "overwrite=True" in str(pytest.raises(VermouthError, make, a, seed=3, **kw).value)
    make(a, seed=3, overwrite=True, **kw)
    assert tree_hash(a) == tree_hash(b)


def test_classification(tmp_path):
    split = make_classification(tmp_path, n_classes=4, per_class=(4, 2, 3), size=40)
    assert split == tmp_path / "split_zhou_Synth.json"
    data = json.loads(split.read_text())
    assert {k: len(v) for k, v in data.items()} == {"train": 16, "val": 8, "test": 12}
    train, test = load_dataset(split, split="train"), load_dataset(split, split="test")
    assert train.classnames == ("red circle", "green square", "blue triangle", "yellow diamond")
    assert Image.open(train.samples[0].path).size == (40, 40)
    assert Image.open(train.samples[0].path).mode == "RGB"
    # a nearest-centroid classifier on mean colour alone is perfect
    tr = mean_colours([s.path for s in train.samples])
    centroids = np.array([tr[[s.label == c for s in train.samples]].mean(0) for c in range(4)])
    te = mean_colours([s.path for s in test.samples])
    pred = ((te[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert pred.tolist() == [s.label for s in test.samples]
    assert load_dataset(split, split="train", shots=2).name == "Synth/train/2-shot-seed0"


def test_sbir(tmp_path):
    root = make_sbir(tmp_path / "sb", n_classes=6, photos_per_class=3, sketches_per_class=2,
                     size=32)
    data = load_sbir(root)
    assert len(data.split.unseen) == 3 and len(data.split.seen) == 3
    assert len(data.photos) == 18 and len(data.sketches) == 12
    assert data.photos.classnames == data.sketches.classnames
    sketch = np.asarray(Image.open(data.sketches.samples[0].path))
    assert sketch.shape == (32, 32, 3) and (sketch == 255).all(-1).mean() > 0.6  # white paper
    # the class colour is shared: a sketch's ink is nearest to its own class's photos
    photos = mean_colours([s.path for s in data.photos.samples])
    for s in data.sketches.samples:
        arr = np.asarray(Image.open(s.path), np.float64).reshape(-1, 3)
        ink = arr[(arr < 250).any(1)].mean(0)
        tint = photos - photos.mean(1, keepdims=True)  # colour without brightness
        best = ((tint - (ink - ink.mean())) ** 2).sum(1).argmin()
        assert data.photos.samples[best].classname == s.classname


def test_segmentation(tmp_path):
    root = make_segmentation(tmp_path / "seg", n_classes=4, n_images=4, size=48)
    assert (root / "classnames.txt").read_text().split() == ["red", "green", "blue", "yellow"]
    ds = load_dataset(root, split="train")
    assert ds.source["layout"] == "generic" and len(ds) == 4 and len(ds.classnames) == 4
    assert len(load_dataset(root, split="val")) == 4
    palette = None
    for s in ds.samples:
        m = read_mask(s.mask, "identity", n_classes=4)
        raw = np.asarray(Image.open(s.mask))
        assert raw.dtype == np.uint8 and m.shape == (48, 48) and (m == raw).all()
        classes = set(np.unique(m).tolist()) - {255}
        assert len(classes) >= 2 and 255 in m and (m == 255).mean() < 0.3
        rgb = np.asarray(Image.open(s.path), np.float64)
        means = {c: rgb[m == c].mean(0) for c in classes}
        if palette is None:
            from vermouth_cache.data.synthetic import colour
            palette = np.array([colour(c) for c in range(4)], np.float64)
        for c, mean in means.items():  # every class region has its class colour
            assert ((palette - mean) ** 2).sum(1).argmin() == c
    flat = make_segmentation(tmp_path / "flat", n_images=2, size=16, splits=None)
    assert sorted(p.name for p in (flat / "images").iterdir()) == ["000.png", "001.png"]
