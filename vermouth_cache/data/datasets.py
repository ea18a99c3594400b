"""`load_dataset`: which images exist, what they are called, and what labels they carry.

`load_dataset` accepts an image-folder tree ``root/<class>/<image>``, a CoOp split file
``split_zhou_<Name>.json`` (``{"train": [[rel_path, label, classname], ...], ...}``), or a CSV /
JSONL manifest (``path`` plus optional ``label``, ``classname``, ``split``, ``domain``, ``mask``;
both files are read by `vermouth_cache.data.manifests`). Segmentation roots (ADE20K, COCO-Stuff,
VOC, Pascal Context, generic images/ + masks/) are loaded by `vermouth_cache.data.seg` when a
layout is named or recognised. A CoOp-style K-shot subset is drawn here (`shots`, `shot_seed`).

A sample's id is its relative POSIX path under the image root, and samples are always sorted by
id, so the dataset identity (`samples.Dataset.identity`) and any sharding built on the order do
not depend on directory listing order, mtimes or where the dataset happens to live on disk. Only
existence is checked here; decoding happens later (`vermouth_cache.data.images`) so one bad image
is recorded per sample instead of failing the load.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace
import re
from pathlib import Path

from PIL import Image

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.depth import is_depth_root, load_depth_dataset
from vermouth_cache.data.archives import is_hf_dataset, is_webdataset, load_hf, load_webdataset
from vermouth_cache.data.refer import half_refer_root, is_refer_root, load_refer_dataset
from vermouth_cache.data.manifests import load_coop, load_manifest
from vermouth_cache.data.paths import abspath, check_inside, path_exists
from vermouth_cache.data.samples import Dataset, Sample
from vermouth_cache.data.seg import LAYOUTS, detect_layout, load_seg_dataset
from vermouth_cache.data.views import SLIDE_STRIDE, slide_views

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
_COOP_NAME = re.compile(r"^split_zhou_(?P<name>.+)\.json$")


def load_dataset(spec: str | Path, *, image_root: str | Path | None = None,
                 split: str | None = None, shots: int | None = None,
                 shot_seed: int = 0, layout: str | None = None, views: int = 1,
                 slide: int | None = None) -> Dataset:
    """Load a folder tree, CoOp split file or CSV/JSONL manifest; see the module docstring.

    With `layout`, or a directory that `seg.detect_layout` recognises, the spec is a
    segmentation dataset root: see `seg.load_seg_dataset`. A recognised root whose layout
    has fixed splits (all but "generic") needs `split`; without one it is refused rather than
    read as an image folder whose "classes" would be its image and mask directories.
    """
    depth = is_depth_root(abspath(spec)) if layout is None and path_exists(abspath(spec), "dataset") else False
    if views != 1 and not (depth and split == "train"):  # options that do not apply are refused, never ignored
        raise VermouthError(f"--views draws training crops of a depth dataset's train split; {spec} "
                            + ("split test has its fixed views (two windows, each mirrored)" if depth else
                               "is not a depth root"))
    if slide and (depth or (layout is None and is_refer_root(abspath(spec)))):
        raise VermouthError(f"--slide cuts sliding windows of a segmentation dataset; {spec} is a "
                            + ("depth root (its views: --views)" if depth else "referring dataset (512 squash)"))
    if slide:  # sliding windows of the images (data/views.py), for slide inference
        return as_slide_views(load_dataset(spec, image_root=image_root, split=split, shots=shots, shot_seed=shot_seed,
                                           layout=layout, views=views), slide)
    spec = abspath(spec)
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise VermouthError(f"shots must be an integer >= 1, got {shots!r}")
    if not path_exists(spec, "dataset"):
        raise VermouthError(f"dataset not found: {spec}")
    if layout is None and half_refer_root(spec):
        raise VermouthError(f"{spec} has instances.json but no refs(unc|umd|google).p: a REFER root needs both "
                            "(refs from https://github.com/lichengunc/refer)")
    if layout is None and is_refer_root(spec):  # referring expressions: one sample per sentence (data/refer.py)
        if split is None or shots is not None:
            raise VermouthError(f"{spec} is a referring dataset: give --split (train, val, testA, ...); no shots")
        return load_refer_dataset(spec, split, image_root=image_root)
    if depth:  # a depth dataset: views of its images (data/depth.py)
        if image_root is not None or shots is not None:
            raise VermouthError(f"{spec} is a depth root: image_root and shots do not apply")
        return load_depth_dataset(spec, split, views=views, seed=shot_seed)
    if layout is None and (is_webdataset(spec) or is_hf_dataset(spec)):  # images inside archives (data/archives.py)
        if image_root is not None:
            raise VermouthError(f"{spec}: image_root given, but an archive holds its images")
        kind = "webdataset" if is_webdataset(spec) else "hf"
        samples, classnames = (load_webdataset if kind == "webdataset" else load_hf)(spec, split)
        name = spec.stem if spec.is_file() else spec.name
        root = spec if spec.is_dir() else spec.parent
        return _finish(samples, classnames, spec, split, shots, shot_seed, kind, name, root)
    if layout is None and spec.is_dir():
        layout = detect_layout(spec)
        if layout is not None and split is None and LAYOUTS[layout].splits:
            raise VermouthError(f"{spec} is a {layout} segmentation root: give a split "
                                f"({', '.join(LAYOUTS[layout].splits)})")
    if layout is not None:
        if image_root is not None:
            raise VermouthError(f"{spec}: image_root given, but a {layout} layout fixes it")
        if shots is not None:
            raise VermouthError(f"{spec}: shots needs class labels; segmentation samples have none")
        return load_seg_dataset(spec, layout, split)
    if spec.is_dir():
        if split is not None:
            raise VermouthError(f"{spec}: split {split!r} given, but image folders have no splits")
        if image_root is not None:
            raise VermouthError(f"{spec}: image_root given, but an image folder is its own root")
        kind, name, root = "folder", spec.name, spec
        samples, classnames = _load_folder(spec)
    else:
        root = abspath(image_root) if image_root is not None else spec.parent
        suffix = spec.suffix.lower()
        if suffix == ".json":
            m = _COOP_NAME.match(spec.name)
            name = m.group("name") if m else spec.stem
            if image_root is None and (spec.parent / "images").is_dir():
                root = spec.parent / "images"  # the layout CoOp's data preparation produces
            kind, (samples, classnames) = "coop", load_coop(spec, root, split)
        elif suffix in (".csv", ".jsonl"):
            kind, name = "manifest", spec.stem
            samples, classnames = load_manifest(spec, root, split)
        else:
            raise VermouthError(f"unknown dataset file type: {spec} "
                                "(expected a directory, .json, .csv or .jsonl)")
    return _finish(samples, classnames, spec, split, shots, shot_seed, kind, name, root)


def _finish(samples, classnames, spec: Path, split, shots, shot_seed: int, kind: str, name: str, root: Path) -> Dataset:
    """The Dataset of a listing: K shots drawn if asked, samples in id order, its source recorded."""
    if not samples:
        what = f"split {split!r} of {spec}" if split is not None else str(spec)
        raise VermouthError(f"dataset is empty: {what}")
    if shots is not None:
        samples = _few_shot(samples, classnames, shots, shot_seed, spec)
    # shot_seed is recorded only when it mattered, so it cannot split otherwise equal sources.
    seed = shot_seed if shots is not None else None
    source = {"kind": kind, "spec": str(spec), "split": split, "shots": shots, "shot_seed": seed}
    # the subset is part of the readable name: listings then tell train from test
    name += f"/{split}" if split else ""
    name += f"/{shots}-shot-seed{shot_seed}" if shots else ""
    return Dataset(name, root, tuple(sorted(samples, key=lambda s: s.id)), classnames, source)


def _load_folder(root: Path) -> tuple[list[Sample], tuple[str, ...]]:
    # Hidden entries (.git, .ipynb_checkpoints, .DS_Store) are tooling litter, not classes.
    # Symbolic links are followed only inside the root: a broken one, or one leading out of the
    # root (evil.png -> /etc/passwd, a class directory linked from elsewhere), is refused here,
    # when listing, rather than silently dropped or read.
    root_real = os.path.realpath(root)
    visible = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    for p in visible:
        if p.is_symlink():
            check_inside(root_real, p, str(root), "class directory" if p.is_dir() else "entry")
    classes = [p.name for p in visible if p.is_dir()]
    if not classes:
        raise VermouthError(f"{root}: no class subdirectories (expected root/<class>/<image>)")
    samples = []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir(), key=lambda p: p.name):
            if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                if f.is_symlink():
                    check_inside(root_real, f, str(root))
                if f.is_file():
                    samples.append(Sample(f"{cls}/{f.name}", f, label, cls))
    return samples, tuple(classes)


def _few_shot(samples: list[Sample], classnames, k: int, seed: int, spec: Path) -> list[Sample]:
    """CoOp-style K-shot subset: K samples per label, one seeded RNG consumed in label order."""
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        if s.label is None:
            raise VermouthError(f"{spec}: shots needs labels, but sample {s.id!r} has none")
        by_label.setdefault(s.label, []).append(s)
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda s: s.id)
        if len(items) < k:
            raise VermouthError(f"{spec}: class {classnames[label]!r} (label {label}) has only "
                                f"{len(items)} samples, fewer than shots={k}")
        chosen.extend(rng.sample(items, k))
    return sorted(chosen, key=lambda s: s.id)


def as_slide_views(ds, resolution: int, stride: int | None = None):
    """The dataset's images as sliding windows (one sample each, id `<image>@x1,y1,x2,y2,slide<short>`),
    for slide inference at the image's native size: crops of `resolution` of the image resized to a
    shorter side of `resolution` (VPD's ADE20K test: 512, stride 341)."""
    samples = []
    for s in ds.samples:
        try:
            with Image.open(s.path) as im:
                w, h = im.size
        except OSError as exc:
            raise VermouthError(f"cannot read the size of {s.path}: {exc}") from None
        samples += [replace(s, id=s.id + v.suffix(), view=v) for v in slide_views(w, h, resolution, resolution, stride)]
    samples.sort(key=lambda x: x.id)
    return Dataset(ds.name, ds.root, tuple(samples), ds.classnames,
                   {**ds.source, "slide": {"short": resolution, "crop": resolution,
                                                       "stride": stride or round(resolution * SLIDE_STRIDE / 512)}})
