"""Referring-expression datasets in the LAVT / REFER layout, one sample per (image, sentence) pair.

    ROOT/instances.json          COCO annotations of the referred objects (polygons or RLE)
    ROOT/refs(unc).p             REFER's refs: ref_id, ann_id, image_id, split, sentences [{sent}]
    IMAGES/<file_name>           the COCO train2014 images (--image-root; default ROOT/images, else
                                 ROOT/../images/mscoco/images/train2014 as LAVT lays them out)

`refs(*.p)` is a pickle: it is read through a loader that refuses every global (data/pickles.py).
Each sentence of each ref of the split is a sample (id `<file>#<ref_id>.<k>`, its text the
sentence), so every (image, sentence) pair has its own cached features: the sentence conditions
the U-net. Images and masks are squashed to the resolution (VPD: 512x512, aspect not kept; mask
nearest). The referred mask is REFER's `getMask`: pycocotools decodes the annotation's polygons,
sums over them, and VPD keeps pixels equal to 1 (overlaps of two polygons are dropped).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from vermouth_cache.core.errors import VermouthError, require
from vermouth_cache.data.pickles import load_plain_pickle
from vermouth_cache.data.samples import Dataset, Sample
from vermouth_cache.data.views import View

SPLIT_BYS = ("unc", "umd", "google")


def refs_file(root: Path) -> Path | None:
    found = [root / f"refs({by}).p" for by in SPLIT_BYS if (root / f"refs({by}).p").is_file()]
    return found[0] if found else None


def is_refer_root(path: Path) -> bool:
    return path.is_dir() and (path / "instances.json").is_file() and refs_file(path) is not None


def half_refer_root(path: Path) -> bool:
    """COCO instances without the REFER refs pickle: a REFER root missing its refs."""
    return path.is_dir() and (path / "instances.json").is_file() and refs_file(path) is None


def _image_root(root: Path, image_root: str | Path | None) -> Path:
    if image_root is not None:
        return Path(image_root)
    for cand in (root / "images", root.parent / "images" / "mscoco" / "images" / "train2014"):
        if cand.is_dir():
            return cand
    raise VermouthError(f"{root}: no images/ folder beside it; give --image-root (the COCO train2014 images)")


def region_mask(segmentation, height: int, width: int) -> np.ndarray:
    """REFER getMask: polygons (or an RLE) decoded, summed over polygons, == 1 kept (uint8 0/1)."""
    require("pycocotools", "referring segmentation masks")
    from pycocotools import mask as coco_mask

    with warnings.catch_warnings():  # pycocotools 2.0 and numpy 2: a DeprecationWarning per call
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(segmentation, list):
            m = coco_mask.decode(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
            m = coco_mask.decode(coco_mask.frPyObjects(segmentation, height, width))
        else:
            m = coco_mask.decode(segmentation)
    if m.ndim == 3:
        m = m.sum(axis=2)
    return (m == 1).astype(np.uint8)


def load_refer_dataset(root: str | Path, split: str, *, image_root: str | Path | None = None) -> Dataset:
    root = Path(root)
    refs_path = refs_file(root)
    refs = load_plain_pickle(refs_path)
    try:
        inst = json.loads((root / "instances.json").read_text())
        images = {im["id"]: im for im in inst["images"]}
        anns = {a["id"]: a for a in inst["annotations"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VermouthError(f"{root / 'instances.json'}: not COCO instances ({exc})") from None
    if not isinstance(refs, list):
        raise VermouthError(f"{refs_path}: expected a list of refs")
    splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
    if split not in splits:
        raise VermouthError(f"{root}: no refs of split {split!r} (splits: {', '.join(splits)})")
    img_dir = _image_root(root, image_root)
    samples = []
    for r in refs:
        if not isinstance(r, dict) or r.get("split") != split:
            continue
        try:
            im, ann = images[r["image_id"]], anns[r["ann_id"]]
        except KeyError as exc:
            raise VermouthError(f"{refs_path}: ref {r.get('ref_id')} names a missing image or annotation {exc}") from None
        path = img_dir / im["file_name"]
        if not path.is_file():
            raise VermouthError(f"{root}: image {path} of ref {r['ref_id']} is missing")
        view = View((0, 0, int(im["width"]), int(im["height"])), geometry="squash")
        region = json.dumps(ann["segmentation"], separators=(",", ":"))
        for k, sent in enumerate(r.get("sentences", [])):
            samples.append(Sample(f"{im['file_name']}#{r['ref_id']}.{k}", path, None, None, split=split,
                                  text=str(sent["sent"]), view=view, region=region))
    if not samples:
        raise VermouthError(f"{root}: split {split!r} has no sentences")
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise VermouthError(f"{refs_path}: ref {s.id.split('#')[1].split('.')[0]} of {s.id.split('#')[0]} appears "
                                "twice (ref ids must be unique)")
        seen.add(s.id)
    samples.sort(key=lambda s: s.id)
    source = {"kind": "refer", "spec": str(root), "split": split, "refs": refs_path.name,
              "image_root": str(img_dir)}
    return Dataset(f"{root.name}/{split}", root, tuple(samples), (), source)
