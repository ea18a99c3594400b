"""SBIR layouts, the seen/unseen split and the join of photos and sketches by class name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.sbir import (SbirSplit, find_sbir_trees, load_sbir, relevance,
                                      sbir_split)


def errmsg(fn, *args, **kwargs) -> str:
    with pytest.raises(VermouthError) as exc:
        fn(*args, **kwargs)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def tree(d: Path, classes, ext=".png", per_class=2) -> Path:
    for c, cls in enumerate(classes):
        for i in range(per_class):
            p = d / cls / f"{i}{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            arr = np.full((4, 4, 3), 10 * c + i, dtype=np.uint8)
            Image.fromarray(arr).save(p, format="JPEG" if ext == ".jpg" else "PNG")
    return d


@pytest.mark.parametrize("root_name, photo, sketch, guess", [
    ("data", "photo/tx_000000000000", "sketch/tx_000000000000", "sketchy"),
    ("Sketchy_extended", "photo", "sketch", "sketchy"),
    ("TU-Berlin", "images", "sketches", "tuberlin"),
    ("QuickDraw", "images", "sketch", "quickdraw"),
    ("Quick_Draw", "photo", "sketch", "quickdraw"),
    ("mine", "photo", "sketch", None),
])
def test_layouts(tmp_path, root_name, photo, sketch, guess):
    root = tmp_path / root_name
    tree(root / photo, ["cat", "dog"], ".jpg")
    tree(root / sketch, ["cat", "dog"])
    assert find_sbir_trees(root) == (root / photo, root / sketch, guess)


def test_missing_trees_are_named(tmp_path):
    tree(tmp_path / "photo", ["cat"])
    (tmp_path / "sketch").mkdir()  # no class folders
    msg = errmsg(find_sbir_trees, tmp_path)
    assert "photo/tx_000000000000/<class>" in msg and "images/<class> + sketches/<class>" in msg
    assert "not a directory" in errmsg(find_sbir_trees, tmp_path / "nope")


def test_split_checks_names():
    assert sbir_split(["a", "b", "c"], ("c", "b", "a"), ["c", "a"]) == SbirSplit(("b",),
                                                                                ("a", "c"))
    msg = errmsg(sbir_split, ["a", "b", "x"], ["a", "b", "y", "z"], ["a"])
    assert "only in photos: x" in msg and "only in sketches: y, z" in msg
    assert "not in the trees: nope" in errmsg(sbir_split, ["a"], ["a"], ["a", "nope"])


def test_load_joins_by_class_name(tmp_path):
    root = tmp_path / "set"
    tree(root / "photo", ["ant", "bee", "cow", "dog"], ".jpg", per_class=3)
    # the sketch tree has one hidden folder more: class names match, so the split is fine
    tree(root / "sketch", ["ant", "bee", "cow", "dog", ".cache"], per_class=2)
    (root / "unseen.txt").write_text("dog\nbee\n")
    data = load_sbir(root)
    assert data.name is None and data.split == SbirSplit(("ant", "cow"), ("bee", "dog"))
    assert len(data.photos) == 12 and len(data.sketches) == 8
    assert data.photos.root == root / "photo" and data.sketches.root == root / "sketch"
    queries, gallery = data.samples("sketch"), data.samples("photo", "unseen")
    assert {s.classname for s in queries} == {"bee", "dog"} and len(gallery) == 6
    assert len(data.samples("photo", "all")) == 12 and len(data.samples("sketch", "seen")) == 4
    rel = relevance([s.classname for s in queries], [s.classname for s in gallery])
    assert rel.shape == (4, 6) and rel.sum() == 4 * 3
    assert relevance(["b", "a"], ["a", "a", "b"]).tolist() == [[False, False, True],
                                                             [True, True, False]]
    assert load_sbir(root, unseen=["cow"]).split.unseen == ("cow",)
    (tmp_path / "u.txt").write_text("ant\n")
    assert load_sbir(root, unseen=tmp_path / "u.txt").split.seen == ("bee", "cow", "dog")
    assert "part is seen|unseen|all" in errmsg(data.samples, "photo", "test")
    (root / "unseen.txt").unlink()
    assert "unseen classes not given" in errmsg(load_sbir, root)


def test_differing_trees_are_refused(tmp_path):
    tree(tmp_path / "photo", ["ant", "bee"])
    tree(tmp_path / "sketch", ["ant", "bea"])
    msg = errmsg(load_sbir, tmp_path, unseen=["ant"])
    assert "only in photos: bee" in msg and "only in sketches: bea" in msg
