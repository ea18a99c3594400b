"""Segmentation layouts, label rules, mask reading and the mask/image crop geometry."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vermouth_cache.data import seg as seg_data
from vermouth_cache.data import vocab
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.images import MAX_PIXELS, resize_center_crop
from vermouth_cache.data.seg import (LABEL_RULES, LAYOUTS, crop_box, detect_layout, ignore_index,
                                     load_seg_dataset, mask_for_training, read_mask)

N_CLASSES = {"ade150": 150, "ade847": 847, "coco_stuff171": 171, "voc20": 20, "pc59": 59,
             "pc459": 459}


@pytest.fixture(autouse=True)
def fake_vocab(monkeypatch):
    """Small stand-in class-name lists for the named layouts (the real lists are tested in test_vocab)."""
    mod = types.ModuleType("vermouth_cache.data.vocab")
    mod.classnames = lambda name: tuple(f"{name}-{i}" for i in range(N_CLASSES[name]))
    mod.read_name_list = vocab.read_name_list
    monkeypatch.setattr(seg_data, "vocab", mod)


def errmsg(fn, *args, **kwargs) -> str:
    with pytest.raises(VermouthError) as exc:
        fn(*args, **kwargs)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def img(path: Path, seed: int = 0, size=(6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="JPEG" if path.suffix == ".jpg" else "PNG")
    return path


def mask(path: Path, values, dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(values, dtype=dtype).reshape(1, -1)
    Image.fromarray(arr).save(path, format="TIFF" if path.suffix == ".tif" else "PNG")
    return path


def make_tree(root: Path, layout: str, n: int = 2) -> Path:
    """A tiny tree of `layout` with n images (and masks) per split."""
    for s, (split, alt) in enumerate([("training", "train2017"), ("validation", "val2017")]):
        short = ("train", "val")[s]
        for i in range(n):
            stem = f"{short}_{i}"
            if layout == "ade20k":
                img(root / "images" / split / f"{stem}.jpg", i)
                mask(root / "annotations" / split / f"{stem}.png", [0, 1, 2])
            elif layout == "ade847":
                img(root / "images_detectron2" / split / f"{stem}.jpg", i)
                mask(root / "annotations_detectron2" / split / f"{stem}.tif", [0, 846, 65535],
                     np.uint16)
            elif layout == "coco-stuff":
                img(root / "images" / alt / f"{stem}.jpg", i)
                mask(root / "annotations_detectron2" / alt / f"{stem}.png", [0, 170, 255])
            elif layout in ("voc", "pascal-context", "pascal-context-459"):
                img(root / "JPEGImages" / f"{stem}.jpg", i)
                mask(root / "SegmentationClass" / f"{stem}.png", [0, 20, 255])
                (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
                with open(root / "ImageSets" / "Segmentation" / f"{short}.txt", "a") as f:
                    f.write(stem + "\n")
                if layout == "pascal-context":
                    mask(root / "annotations_detectron2" / f"pc59_{short}" / f"{stem}.png", [58])
                elif layout == "pascal-context-459":
                    mask(root / "annotations_detectron2" / f"pc459_{short}" / f"{stem}.tif",
                         [458, 65535], np.uint16)
            elif layout == "generic":
                img(root / "images" / short / "sub" / f"{stem}.png", i)
                mask(root / "masks" / short / "sub" / f"{stem}.png", [0, 1])
    if layout == "voc":  # an extra image outside the split lists is not a sample
        img(root / "JPEGImages" / "unlisted.jpg", 99)
    if layout == "generic":
        (root / "classnames.txt").write_text("sky\n# comment\n\nroad\ncar\n")
    return root


CASES = {  # layout: (val split name as given, resolved split, dataset name, first id, n classes)
    "ade20k": ("val", "validation", "ADE20K-150/validation", "val_0.jpg", 150),
    "ade847": ("validation", "validation", "ADE20K-847/validation", "val_0.jpg", 847),
    "coco-stuff": ("val2017", "val2017", "COCO-Stuff-171/val2017", "val_0.jpg", 171),
    "voc": ("val", "val", "VOC-20/val", "val_0.jpg", 20),
    "pascal-context": ("val", "val", "PascalContext-59/val", "val_0.jpg", 59),
    "pascal-context-459": ("val", "val", "PascalContext-459/val", "val_0.jpg", 459),
    "generic": ("val", "val", "tree/val", "sub/val_0.png", 3),
}


@pytest.mark.parametrize("layout", sorted(CASES))
def test_every_layout_is_detected_and_loads(tmp_path, layout):
    root = make_tree(tmp_path / "tree", layout)
    assert detect_layout(root) == layout
    given, split, name, first, n = CASES[layout]
    ds = load_dataset(root, split=given)  # detected
    assert ds == load_dataset(root, split=given, layout=layout) == load_seg_dataset(root, layout,
                                                                                   given)
    assert ds.name == name and len(ds) == 2 and ds.samples[0].id == first
    assert [s.id for s in ds.samples] == sorted(s.id for s in ds.samples)
    assert len(ds.classnames) == n
    rule = LABEL_RULES[LAYOUTS[layout].label_rule]
    assert ds.source == {"kind": "seg", "layout": layout, "spec": str(root), "split": split,
                         "label_rule": rule.name}
    for s in ds.samples:
        assert s.label is None and s.classname is None and s.split == split
        assert s.path == ds.root / s.id and s.path.is_file() and s.mask.is_absolute()
        assert s.mask.stem == s.path.stem
        m = read_mask(s.mask, rule, n_classes=n)
        assert m.dtype == (np.uint16 if n > 254 else np.uint8)
    train = {"val": "train", "validation": "training", "val2017": "train2017"}[given]
    assert len(load_dataset(root, split=train)) == 2


def test_shared_images_share_identity_and_generic_reads_classnames(tmp_path):
    root = make_tree(tmp_path / "VOC2010", "pascal-context")
    make_tree(root, "pascal-context-459")
    assert detect_layout(root) == "pascal-context"  # 459 only by name
    pc59, pc459 = (load_dataset(root, split="val", layout=x)
                   for x in ("pascal-context", "pascal-context-459"))
    assert pc59.identity() == pc459.identity() and pc59.root == root / "JPEGImages"
    assert [s.mask.suffix for s in pc459.samples] == [".tif", ".tif"]
    gen = make_tree(tmp_path / "gen", "generic")
    assert load_seg_dataset(gen, "generic", None).classnames == ("sky", "road", "car")
    assert [s.id for s in load_seg_dataset(gen, None, None).samples] == [
        "train/sub/train_0.png", "train/sub/train_1.png", "val/sub/val_0.png", "val/sub/val_1.png"]
    names = tmp_path / "names.txt"
    names.write_text("a\nb\n")
    ds = load_seg_dataset(gen, "generic", "val", classnames_file=names)
    assert ds.classnames == ("a", "b") and ds.source["classnames_file"] == str(names)


def test_image_folders_keep_their_behaviour(tmp_path):
    for cls in ("cat", "dog"):
        img(tmp_path / "pets" / cls / "0.png")
    assert detect_layout(tmp_path / "pets") is None
    assert load_dataset(tmp_path / "pets").source["kind"] == "folder"
    assert "image folders have no splits" in errmsg(load_dataset, tmp_path / "pets", split="val")
    # recognised roots are not read as image folders of their image and mask directories
    voc = make_tree(tmp_path / "voc", "voc")
    assert "voc segmentation root: give a split (train, val)" in errmsg(load_dataset, voc)
    gen = make_tree(tmp_path / "gen", "generic")
    assert load_dataset(gen) == load_seg_dataset(gen, "generic", None)
    assert load_dataset(gen).name == "gen" and len(load_dataset(gen)) == 4


def test_layout_errors(tmp_path):
    root = make_tree(tmp_path / "ade", "ade20k")
    assert "unknown layout 'nope'" in errmsg(load_dataset, root, split="val", layout="nope")
    assert "no known layout" in errmsg(load_seg_dataset, tmp_path / "ade" / "images", None, "x")
    assert "needs a split" in errmsg(load_dataset, root, layout="ade20k")
    msg = errmsg(load_dataset, root, split="test", layout="ade20k")
    assert "images/test" in msg and "training, validation" in msg
    assert "shots" in errmsg(load_dataset, root, split="val", shots=1)
    (root / "annotations" / "validation" / "val_1.png").unlink()
    assert "'val_1.jpg' has no mask" in errmsg(load_dataset, root, split="val")
    voc = make_tree(tmp_path / "voc", "voc")
    (voc / "JPEGImages" / "val_0.jpg").unlink()
    assert "val_0" in errmsg(load_dataset, voc, split="val")
    gen = make_tree(tmp_path / "gen", "generic")
    (gen / "classnames.txt").unlink()
    assert "classnames.txt" in errmsg(load_seg_dataset, gen, "generic", "val")


def test_label_rules(tmp_path):
    raw = [0, 1, 3, 150, 254, 255]
    p = mask(tmp_path / "m.png", raw)
    assert read_mask(p, "reduce-zero").tolist() == [[255, 0, 2, 149, 253, 255]]
    assert read_mask(p, "identity").tolist() == [raw]
    wide = read_mask(p, "identity16")
    assert wide.dtype == np.uint16 and wide.tolist() == [[0, 1, 3, 150, 254, 65535]]
    t = mask(tmp_path / "m.tif", [0, 255, 846, 65535], np.uint16)
    assert read_mask(t, "identity16").tolist() == [[0, 255, 846, 65535]]
    assert "846" in errmsg(read_mask, t, "identity")  # does not fit uint8
    assert "value 254 is outside the classes 0..149" in errmsg(read_mask, p, "identity", n_classes=150)
    assert "unknown label rule" in errmsg(read_mask, p, "bogus")
    assert seg_data.MAX_PIXELS == MAX_PIXELS  # a copy, so seg_data does not import torch
    assert ignore_index(np.uint8) == 255 and ignore_index(np.uint16) == 65535


def test_palette_masks_read_as_indices_and_rgb_is_refused(tmp_path):
    pal = Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [7] * (252 * 3) + [224, 224, 192])
    pal.save(tmp_path / "voc.png")
    assert Image.open(tmp_path / "voc.png").mode == "P"
    assert read_mask(tmp_path / "voc.png", "reduce-zero").tolist() == [[255, 0], [1, 255]]
    Image.new("RGB", (2, 2), (128, 0, 0)).save(tmp_path / "rgb.png")
    assert "RGB colour mask refused" in errmsg(read_mask, tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    assert "cannot read mask" in errmsg(read_mask, tmp_path / "junk.png")


@pytest.mark.parametrize("size", [(97, 61), (50, 83), (64, 64), (20, 30)])
def test_training_mask_lines_up_with_the_image_crop(size):
    w, h = size
    r = 32
    rng = np.random.default_rng(w)
    label = rng.integers(0, 4, (h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    palette = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], np.uint8)
    image = resize_center_crop(Image.fromarray(palette[label]), r)
    small = mask_for_training(label.astype(np.uint8), r)
    assert small.shape == (r, r) and small.dtype == np.uint8
    colour = np.asarray(image, dtype=np.int64)
    nearest = ((colour[:, :, None, :] - palette[None, None].astype(np.int64)) ** 2).sum(-1)
    nearest = nearest.argmin(-1)
    pad = np.pad(small, 1, mode="edge")  # interior: all 8 neighbours carry the same label
    interior = np.all([pad[1 + dy:1 + dy + r, 1 + dx:1 + dx + r] == small
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
    assert interior.mean() > 0.3
    assert (nearest[interior] == small[interior]).all()
    # crop_box: the native-resolution region the crop covers, sampled back, is the same mask
    left, top, right, bottom = crop_box(w, h, r)
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    assert min(right - left, bottom - top) == min(w, h) or (w, h) == (r, r)
    region = label[top:bottom, left:right]
    ys = ((np.arange(r) + 0.5) * region.shape[0] / r).astype(int)
    xs = ((np.arange(r) + 0.5) * region.shape[1] / r).astype(int)
    assert (region[np.ix_(ys, xs)] == small).mean() > 0.95


def test_crop_box_and_mask_geometry_edge_cases():
    assert crop_box(64, 64, 64) == (0, 0, 64, 64)
    assert crop_box(200, 100, 50) == (50, 0, 150, 100)
    assert crop_box(100, 300, 10) == (0, 100, 100, 200)
    m = np.arange(12, dtype=np.uint16).reshape(3, 4)
    assert mask_for_training(m, 3).dtype == np.uint16
    assert mask_for_training(m, 3).shape == (3, 3)
    assert "2-D" in errmsg(mask_for_training, np.zeros((2, 2, 3)), 4)
