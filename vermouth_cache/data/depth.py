"""Depth datasets in the BTS / VPD NYU-v2 layout, as datasets of views (data/views.py).

    ROOT/sync/<scene>/rgb_N.jpg, sync_depth_N.png            training (BTS sync.zip)
    ROOT/official_splits/test/<scene>/rgb_N.jpg, sync_depth_N.png   the 654 test images
    ROOT/official_splits/train/<scene>/...                    (its folder names are the scene classes)
    ROOT/train_list.txt, ROOT/test_list.txt                   optional: "/scene/rgb_N.jpg /scene/sync_depth_N.png"

Depth maps are uint16 PNGs in millimetres (0: no measurement), read as metres (/1000). Views are
square crops of side min(H, W) (480 on NYU's 480x640): `train` holds K seeded crops with a seeded
mirror per image (VPD draws a crop and a flip every step: a cache draws them once), `test` the
two shift windows at both ends of the long side, each also mirrored (VPD's `--shift_window_test
--flip_test`: 4 U-net passes per image). Each sample's class is the image's scene by VPD's rule:
the FIRST class (in list order) whose name, with spaces as underscores, is a substring of
"<folder>_<file>" (`study_room_0001` -> "study"); the class list is the sorted folder names of
`official_splits/train` (VPD's nyu_class_list.json) unless a file gives it. The class is the
label: VPD conditions on it at test time too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.samples import Dataset, Sample
from vermouth_cache.data.views import View, drawn_views, windows

SPLITS = {"train": "sync", "test": "official_splits/test"}
CLASS_FOLDER = "official_splits/train"
MM_PER_M = 1000.0


def is_depth_root(path: Path) -> bool:
    return path.is_dir() and ((path / "sync").is_dir() or (path / "official_splits").is_dir())


def read_depth(path: Path) -> np.ndarray:
    """(H, W) float32 metres from a uint16 millimetre PNG; 0 where nothing was measured."""
    try:
        with Image.open(path) as im:
            a = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise VermouthError(f"cannot read depth map {path}: {exc}") from None
    if a.ndim != 2 or a.dtype not in (np.uint16, np.int32):  # 8-bit maps would read as at most 0.255 m
        raise VermouthError(f"depth map {path} is not a single-channel 16-bit PNG ({a.dtype}, {a.shape})")
    return a.astype(np.float32) / MM_PER_M


def scene_classes(root: Path, classes_file: str | None = None) -> tuple[str, ...]:
    if classes_file:
        from vermouth_cache.data.vocab import read_name_list

        return tuple(read_name_list(classes_file))
    folder = root / CLASS_FOLDER
    if not folder.is_dir():
        folder = root / SPLITS["test"]
    names = sorted(p.name.replace("_", " ") for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not names:
        raise VermouthError(f"{root}: no scene folders under {CLASS_FOLDER} to name the scene classes")
    return tuple(names)


def scene_of(rel: str, classes: tuple[str, ...]) -> int | None:
    """VPD's rule: the first class whose name (spaces as underscores) occurs in "<folder>_<file>"."""
    parts = Path(rel).parts
    key = "_".join(parts[-2:]) if len(parts) >= 2 else parts[-1]
    return next((i for i, c in enumerate(classes) if c.replace(" ", "_") in key), None)


def _pairs(root: Path, split: str) -> list[tuple[str, Path, Path]]:
    base = root / SPLITS[split]
    listing = root / f"{split}_list.txt"
    out = []
    if listing.is_file():
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) < 2:
                raise VermouthError(f"{listing}: line {n}: expected 'IMAGE DEPTH'")
            rel = cols[0].lstrip("/")
            out.append((rel, base / rel, base / cols[1].lstrip("/")))
    else:
        for img in sorted(base.rglob("rgb_*.jpg")) + sorted(base.rglob("rgb_*.png")):
            depth = img.with_name(img.name.replace("rgb_", "sync_depth_", 1)).with_suffix(".png")
            out.append((img.relative_to(base).as_posix(), img, depth))
    for rel, img, depth in out:
        for p, what in ((img, "image"), (depth, "depth map")):
            if not p.is_file():
                raise VermouthError(f"{root}: {what} {p} of {rel} is missing")
    if not out:
        raise VermouthError(f"{root}: no rgb_*.jpg / sync_depth_*.png pairs under {base}")
    return out


def load_depth_dataset(root: str | Path, split: str, *, views: int = 1, seed: int = 0,
                       classes_file: str | None = None) -> Dataset:
    root = Path(root)
    if split not in SPLITS:
        raise VermouthError(f"{root} is a depth root: give --split {' or '.join(SPLITS)}")
    if views < 1:
        raise VermouthError("--views must be at least 1")
    classes = scene_classes(root, classes_file)
    samples = []
    for rel, img, depth in _pairs(root, split):
        label = scene_of(rel, classes)
        if label is None:
            raise VermouthError(f"{root}: no scene class occurs in {rel!r} (classes: {', '.join(classes[:5])} ...)")
        with Image.open(img) as im:
            w, h = im.size
        crop = min(w, h)
        if split == "train":
            chosen = drawn_views(rel, w, h, crop, views, seed)
        else:
            chosen = [View(box, flip) for box in windows(w, h, crop) for flip in (False, True)]
        for v in chosen:
            samples.append(Sample(rel + v.suffix(), img, label, classes[label], split=split, view=v, depth=depth))
    samples.sort(key=lambda s: s.id)
    source = {"kind": "depth", "spec": str(root), "split": split, "views": views if split == "train" else None,
              "view_seed": seed if split == "train" else None, "classes_file": classes_file}
    return Dataset(f"{root.name}/{split}", root, tuple(samples), classes, source)
