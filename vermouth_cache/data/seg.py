"""Segmentation datasets: images plus label maps in the layouts open-vocabulary segmentation uses.

Each layout is a declarative `SegLayout` (directories, split names, suffixes, label rule, default
class-name list); `detect_layout` recognises one from the directory structure and
`load_seg_dataset` turns it into a `Dataset` whose samples carry ``mask`` (absolute path) and no
label. The dataset root is the split's image directory and ids are relative to it, so the same
images under two annotations (Pascal Context 59 and 459 share JPEGImages) have one identity and
their cached features are shared.

Masks and dtypes. `read_mask` returns class indices of shape (H, W). The dtype is the rule's,
never the file's, so every mask of a dataset has the same one:
  * uint8 rules ("identity", "reduce-zero"): classes 0..254, ignore = 255;
  * the uint16 rule ("identity16", ADE20K-847 and Pascal Context-459 with more than 254
    classes): classes 0..65534, ignore = 65535, as the 16-bit TIFFs of the detectron2
    preparations store it (there 255 is a real class).
The ignore value is always ``np.iinfo(mask.dtype).max``; `ignore_index` gives it.

Geometry. `mask_for_training` is `images.resize_center_crop` with nearest-neighbour sampling and
`crop_box` the part of the ORIGINAL image that crop covers, so evaluation can compare
predictions with the mask at its native resolution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data import vocab
from vermouth_cache.data.paths import abspath, check_inside
from vermouth_cache.data.samples import Dataset, Sample

MAX_PIXELS = 100_000_000  # images.MAX_PIXELS, not imported: that module pulls in torch


@dataclass(frozen=True)
class LabelRule:
    name: str
    dtype: type  # np.uint8 or np.uint16
    shift: int  # 1: stored 0 means "other"/background -> ignore, v -> v - 1
    doc: str

    @property
    def ignore(self) -> int:
        return int(np.iinfo(self.dtype).max)


LABEL_RULES = {r.name: r for r in (
    LabelRule("identity", np.uint8, 0, "stored value = class (0..254); 255 ignore"),
    LabelRule("reduce-zero", np.uint8, 1, "0 -> 255 (ignore), v -> v - 1; 255 stays 255"),
    LabelRule("identity16", np.uint16, 0,
              "stored value = class (0..65534); 65535 ignore (255 in an 8-bit file)"),
)}


@dataclass(frozen=True)
class SegLayout:
    name: str
    title: str  # readable dataset name; "" = the root's name
    image_dirs: tuple[str, ...]  # relative to the root, "{split}" filled in; first existing wins
    mask_dirs: tuple[str, ...]
    splits: tuple[str, ...]  # the usual ones (others are accepted when on disk)
    image_suffixes: tuple[str, ...]
    mask_suffixes: tuple[str, ...]  # in order of preference
    label_rule: str
    vocab: str | None  # class-name list of vermouth_cache.data.vocab; None: root/classnames.txt
    markers: tuple[tuple[str, ...], ...]  # detection: each group needs one existing path
    walk: str = "images"  # enumerate "images" (each needs a mask), "masks" or a split "list"
    split_list: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()  # ("val", "validation"): short split names
    recursive: bool = False


def _splits(*names):
    return tuple(f"{d}/{s}" for d in names for s in ("training", "validation"))


_ADE_ALIASES = (("train", "training"), ("val", "validation"))
_PC = ("annotations_detectron2/pc59_train", "annotations_detectron2/pc59_val")
_PC459 = ("annotations_detectron2/pc459_train", "annotations_detectron2/pc459_val")
_COCO_MASKS = ("annotations_detectron2/{split}", "stuffthingmaps_detectron2/{split}")

# In detection order: the more specific structure first (VOC2010 holds the VOC files too).
LAYOUTS: dict[str, SegLayout] = {lay.name: lay for lay in (
    SegLayout("generic", "", ("images/{split}",), ("masks/{split}",), (),
              (".jpg", ".jpeg", ".png", ".bmp", ".webp"), (".png",), "identity", None,
              (("images",), ("masks",), ("classnames.txt",)), recursive=True),
    SegLayout("ade847", "ADE20K-847", ("images_detectron2/{split}",),
              ("annotations_detectron2/{split}",), ("training", "validation"), (".jpg",),
              (".tif", ".tiff", ".png"), "identity16", "ade847",
              (_splits("images_detectron2"), _splits("annotations_detectron2")),
              aliases=_ADE_ALIASES),
    SegLayout("ade20k", "ADE20K-150", ("images/{split}",), ("annotations/{split}",),
              ("training", "validation"), (".jpg",), (".png",), "reduce-zero", "ade150",
              (_splits("images"), _splits("annotations")), aliases=_ADE_ALIASES),
    SegLayout("coco-stuff", "COCO-Stuff-171", ("images/{split}", "{split}"), _COCO_MASKS,
              ("train2017", "val2017"), (".jpg",), (".png",), "identity", "coco_stuff171",
              (("images/train2017", "images/val2017", "train2017", "val2017"),
               tuple(m.format(split=s) for m in _COCO_MASKS for s in ("train2017", "val2017"))),
              aliases=(("train", "train2017"), ("val", "val2017"))),
    SegLayout("pascal-context", "PascalContext-59", ("JPEGImages",),
              ("annotations_detectron2/pc59_{split}",), ("train", "val"), (".jpg",), (".png",),
              "identity", "pc59", (("JPEGImages",), _PC), walk="masks"),
    SegLayout("pascal-context-459", "PascalContext-459", ("JPEGImages",),
              ("annotations_detectron2/pc459_{split}",), ("train", "val"), (".jpg",),
              (".tif", ".tiff", ".png"), "identity16", "pc459", (("JPEGImages",), _PC459),
              walk="masks"),
    SegLayout("voc", "VOC-20", ("JPEGImages",), ("SegmentationClass",), ("train", "val"),
              (".jpg",), (".png",), "reduce-zero", "voc20",
              (("JPEGImages",), ("SegmentationClass",), ("ImageSets/Segmentation",)),
              walk="list", split_list="ImageSets/Segmentation/{split}.txt"),
)}


def detect_layout(root: str | Path) -> str | None:
    """The first layout whose marker paths exist under `root`, or None.

    A Pascal Context root with both annotation sets is "pascal-context" (59 classes); ask for
    "pascal-context-459" by name.
    """
    root = Path(root)
    for lay in LAYOUTS.values():
        if all(any((root / p).exists() for p in group) for group in lay.markers):
            return lay.name
    return None


def load_seg_dataset(root: str | Path, layout: str | None, split: str | None,
                     classnames_file: str | Path | None = None) -> Dataset:
    """Images with masks of one split; layout None = `detect_layout(root)`."""
    root = abspath(root)
    if not root.is_dir():
        raise VermouthError(f"segmentation dataset root is not a directory: {root}")
    name = layout if layout is not None else detect_layout(root)
    if name not in LAYOUTS:
        what = f"unknown layout {name!r}" if layout is not None else "no known layout"
        raise VermouthError(f"{root}: {what} (layouts: {', '.join(LAYOUTS)})")
    lay = LAYOUTS[name]
    if split is None and lay.splits:
        raise VermouthError(f"{root}: layout {name} needs a split ({', '.join(lay.splits)})")
    split = dict(lay.aliases).get(split, split)
    image_dir = _first_dir(root, lay, lay.image_dirs, split, "image")
    mask_dir = _first_dir(root, lay, lay.mask_dirs, split, "mask")

    if classnames_file is not None:
        classnames = vocab.read_name_list(abspath(classnames_file))
    elif lay.vocab is None:
        if not (root / "classnames.txt").is_file():
            raise VermouthError(f"{root}: layout {name} needs classnames.txt (one name a line)")
        classnames = vocab.read_name_list(root / "classnames.txt")
    else:
        classnames = vocab.classnames(lay.vocab)
    rule = LABEL_RULES[lay.label_rule]
    if lay.vocab is None and len(classnames) > LABEL_RULES["identity"].ignore:
        rule = LABEL_RULES["identity16"]  # a generic set with more classes than uint8 holds
    if len(classnames) > rule.ignore:
        raise VermouthError(f"{root}: {len(classnames)} class names, but label rule "
                            f"{rule.name} holds at most {rule.ignore}")

    images = _scan(image_dir, lay.image_suffixes, lay.recursive, "image", root)
    masks = _scan(mask_dir, lay.mask_suffixes, lay.recursive, "mask", root)
    pairs = []  # (image, mask)
    if lay.walk == "images":
        for stem, img in images.items():
            if stem not in masks:
                raise VermouthError(f"{root}: sample {img.relative_to(image_dir).as_posix()!r} "
                                    f"has no mask {mask_dir / stem}{'|'.join(lay.mask_suffixes)}")
            pairs.append((img, masks[stem]))
    else:
        if lay.walk == "list":
            stems = _read_split_list(root / lay.split_list.format(split=split))
        else:
            stems = list(masks)
        seen: set[str] = set()
        for stem in stems:
            if stem in seen:
                raise VermouthError(f"{root}: sample {stem!r} listed twice for split {split!r}")
            seen.add(stem)
            if stem not in images:
                raise VermouthError(f"{root}: no image {image_dir / stem}"
                                    f"{'|'.join(lay.image_suffixes)} for sample {stem!r}")
            if stem not in masks:
                raise VermouthError(f"{root}: sample {stem!r} has no mask "
                                    f"{mask_dir / stem}{'|'.join(lay.mask_suffixes)}")
            pairs.append((images[stem], masks[stem]))
    if not pairs:
        raise VermouthError(f"dataset is empty: split {split!r} of {root} (layout {name})")
    samples = tuple(sorted((Sample(img.relative_to(image_dir).as_posix(), img, None, None,
                                   split=split, mask=mask) for img, mask in pairs),
                           key=lambda s: s.id))
    title = lay.title or root.name
    source = {"kind": "seg", "layout": name, "spec": str(root), "split": split,
              "label_rule": rule.name}
    if classnames_file is not None:
        source["classnames_file"] = str(abspath(classnames_file))
    return Dataset(f"{title}/{split}" if split else title, image_dir, samples, classnames, source)


def _first_dir(root: Path, lay: SegLayout, templates, split, what: str) -> Path:
    fill = (lambda t: t.replace("/{split}", "")) if split is None else \
        (lambda t: t.format(split=split))
    for t in templates:
        if (root / fill(t)).is_dir():
            return root / fill(t)
    present = [s for s in lay.splits if all(any((root / t.format(split=s)).is_dir() for t in ts)
                                            for ts in (lay.image_dirs, lay.mask_dirs))]
    raise VermouthError(f"{root}: layout {lay.name}: {what} directory not found: "
                        f"{' or '.join(fill(t) for t in templates)}"
                        + (f" (splits present: {', '.join(present)})" if present else ""))


def _scan(d: Path, suffixes, recursive: bool, what: str, root: Path) -> dict[str, Path]:
    """{relative POSIX path without suffix: file}; suffixes earlier in the list win.

    A symbolic link among the files is refused if it is broken or leads out of `root` (the
    dataset root), as in image folders."""
    rank = {s: i for i, s in enumerate(suffixes)}
    root_real = os.path.realpath(root)
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")) if recursive else []
        for f in sorted(filenames):
            stem, ext = os.path.splitext(f)
            if f.startswith(".") or ext.lower() not in rank:
                continue
            p = Path(dirpath) / f
            if os.path.islink(p):
                check_inside(root_real, p, str(root), what)
            key = p.relative_to(d).with_suffix("").as_posix()
            if key in found:
                if what == "image":
                    raise VermouthError(f"{d}: two images for one mask: {found[key].name}, {f}")
                if rank[ext.lower()] > rank[found[key].suffix.lower()]:
                    continue
            found[key] = p
    return found


def _read_split_list(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise VermouthError(f"split list not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VermouthError(f"{path}: cannot read split list: {e}") from None
    return [ln.split()[0] for ln in lines if ln.strip()]


def ignore_index(dtype) -> int:
    """The ignore value of a mask dtype: 255 for uint8, 65535 for uint16."""
    return int(np.iinfo(np.dtype(dtype)).max)


_COLOUR_MODES = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "LA", "La", "PA"}


def read_mask(path: str | Path, rule: str | LabelRule = "identity", *,
              n_classes: int | None = None) -> np.ndarray:
    """A label map file -> class indices (H, W) in the rule's dtype (see the module docstring).

    Palette PNGs are read as their indices, 16-bit PNG/TIFF as 16-bit values. Colour masks are
    refused, as are values the rule cannot hold and, with `n_classes`, classes >= n_classes.
    """
    rule = LABEL_RULES[rule] if isinstance(rule, str) and rule in LABEL_RULES else rule
    if not isinstance(rule, LabelRule):
        raise VermouthError(f"unknown label rule {rule!r} (rules: {', '.join(LABEL_RULES)})")
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise VermouthError(f"mask {path}: too large ({img.size[0]}x{img.size[1]})")
            if img.mode in _COLOUR_MODES:
                raise VermouthError(f"mask {path}: {img.mode} colour mask refused; label maps "
                                    "must hold class indices in one channel (L, P, I;16)")
            if img.mode == "F":
                raise VermouthError(f"mask {path}: floating-point mask refused")
            raw = np.array(img, dtype=np.uint8 if img.mode == "1" else None)
    except VermouthError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise VermouthError(f"cannot read mask {path}: {e}") from None
    if raw.ndim != 2:
        raise VermouthError(f"mask {path}: expected one channel, got shape {raw.shape}")
    src_ignore = 255 if raw.dtype == np.uint8 else 65535
    v = raw.astype(np.int64)
    ignore = v == src_ignore
    if rule.shift:
        ignore |= v == 0
        v = v - rule.shift
    limit = rule.ignore if n_classes is None else min(rule.ignore, n_classes)
    bad = ~ignore & ((v < 0) | (v >= limit))
    if bad.any():
        value = int(raw[bad].max()) if (raw[bad] >= 0).all() else int(raw[bad].min())
        raise VermouthError(f"mask {path}: stored value {value} is outside the classes "
                            f"0..{limit - 1} of label rule {rule.name}")
    return np.where(ignore, rule.ignore, v).astype(rule.dtype)


def _resized_size(width: int, height: int, r: int) -> tuple[int, int]:
    # exactly images.resize_center_crop's arithmetic
    if width <= height:
        return r, round(height * r / width)
    return round(width * r / height), r


def _check(width, height, resolution) -> int:
    r = int(resolution)
    if r < 1 or width < 1 or height < 1:
        raise VermouthError(f"bad size {width}x{height} or resolution {resolution}")
    return r


def crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the original image that resize_center_crop keeps.

    Edges are rounded to whole pixels (at most half a pixel off), so ``mask[top:bottom,
    left:right]`` is the region a prediction of `resolution` x `resolution` pixels covers.
    """
    r = _check(width, height, resolution)
    w2, h2 = _resized_size(width, height, r)
    left, top = (w2 - r) // 2, (h2 - r) // 2
    sx, sy = width / w2, height / h2
    return (round(left * sx), round(top * sy), round((left + r) * sx), round((top + r) * sy))


def mask_for_training(mask: np.ndarray, resolution: int) -> np.ndarray:
    """The (R, R) mask aligned with resize_center_crop(image, R): same resize and crop, nearest.

    Output pixel x samples source pixel floor((x + 0.5) * in / out) (pixel centres, the
    convention PIL's resize uses; PIL's fixed-point NEAREST can pick the other neighbour when a
    sample falls exactly on a pixel edge), computed only for the cropped rows and columns.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise VermouthError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    h, w = mask.shape
    r = _check(w, h, resolution)
    if (w, h) == (r, r):
        return mask.copy()
    w2, h2 = _resized_size(w, h, r)
    left, top = (w2 - r) // 2, (h2 - r) // 2

    def take(n_in, n_out, start):
        x = (np.arange(start, start + r) + 0.5) * (n_in / n_out)
        return np.minimum(x.astype(np.int64), n_in - 1)

    return mask[np.ix_(take(h, h2, top), take(w, w2, left))]
