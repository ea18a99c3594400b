"""Sketch-based image retrieval data: a photo tree and a sketch tree with the same classes.

Both trees are ordinary image folders (``<dir>/<class>/<image>``) loaded with `load_dataset`, so
photos and sketches are two datasets with their own identities and caches. They are joined by
class NAME (never by label index), and the zero-shot split names the unseen classes: their
sketches query a gallery of their photos.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.paths import abspath
from vermouth_cache.data.samples import Dataset, Sample
from vermouth_cache.data.vocab import read_name_list, unseen_classes

# (photo dir, sketch dir, dataset) in the order they are tried; None: guessed from the root name.
SBIR_TREES = (
    ("photo/tx_000000000000", "sketch/tx_000000000000", "sketchy"),
    ("images", "sketches", "tuberlin"),
    ("images", "sketch", "quickdraw"),
    ("photo", "sketch", None),  # Sketchy "extended", QuickDraw, generic
)
_NAME_HINTS = (("sketchy", "sketchy"), ("tuberlin", "tuberlin"), ("quickdraw", "quickdraw"))


@dataclass(frozen=True)
class SbirSplit:
    seen: tuple[str, ...]  # sorted class names
    unseen: tuple[str, ...]


@dataclass(frozen=True)
class SbirData:
    name: str | None  # "sketchy", "tuberlin", "quickdraw" or None
    photos: Dataset
    sketches: Dataset
    split: SbirSplit

    def samples(self, modality: str, part: str = "unseen") -> tuple[Sample, ...]:
        """Photos or sketches of the "seen", "unseen" or "all" classes, in id order."""
        ds = {"photo": self.photos, "sketch": self.sketches}.get(modality)
        classes = {"seen": self.split.seen, "unseen": self.split.unseen,
                   "all": self.split.seen + self.split.unseen}.get(part)
        if ds is None or classes is None:
            raise VermouthError(f"samples({modality!r}, {part!r}): modality is photo|sketch, "
                                "part is seen|unseen|all")
        keep = set(classes)
        return tuple(s for s in ds.samples if s.classname in keep)


def _has_classes(d: Path) -> bool:
    return d.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in d.iterdir())


def find_sbir_trees(root: str | Path) -> tuple[Path, Path, str | None]:
    """(photo_dir, sketch_dir, name_guess) of the first known layout with class folders."""
    root = abspath(root)
    if not root.is_dir():
        raise VermouthError(f"SBIR dataset root is not a directory: {root}")
    for photo, sketch, name in SBIR_TREES:
        if _has_classes(root / photo) and _has_classes(root / sketch):
            if name is None:
                key = re.sub(r"[^a-z]", "", root.name.lower())
                name = next((n for hint, n in _NAME_HINTS if hint in key), None)
            return root / photo, root / sketch, name
    looked = "; ".join(f"{p}/<class> + {s}/<class>" for p, s, _ in SBIR_TREES)
    raise VermouthError(f"{root}: no photo and sketch class folders found (looked for {looked})")


def _names(names) -> str:
    names = sorted(names)
    more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
    return ", ".join(names[:8]) + more


def sbir_split(classnames_photo, classnames_sketch, unseen) -> SbirSplit:
    """Seen/unseen class names; the trees must have the same classes and hold every unseen one."""
    photo, sketch = set(classnames_photo), set(classnames_sketch)
    if photo != sketch:
        parts = [f"only in photos: {_names(photo - sketch)}" if photo - sketch else "",
                 f"only in sketches: {_names(sketch - photo)}" if sketch - photo else ""]
        raise VermouthError("photo and sketch trees have different classes: "
                            + "; ".join(p for p in parts if p))
    unseen = set(unseen)
    missing = unseen - photo
    if missing:
        raise VermouthError(f"unseen classes not in the trees: {_names(missing)}")
    return SbirSplit(tuple(sorted(photo - unseen)), tuple(sorted(unseen)))


def load_sbir(root: str | Path, unseen=None) -> SbirData:
    """Photos, sketches and the split of an SBIR root.

    `unseen`: a list of class names, a file of them (one a line), or None: root/unseen.txt when
    present, else the dataset's standard list from `vermouth_cache.data.vocab.unseen_classes`.
    """
    photo_dir, sketch_dir, name = find_sbir_trees(root)
    photos, sketches = load_dataset(photo_dir), load_dataset(sketch_dir)
    root = abspath(root)
    if unseen is None and (root / "unseen.txt").is_file():
        unseen = root / "unseen.txt"
    if isinstance(unseen, (str, Path)):
        unseen = read_name_list(abspath(unseen))
    elif unseen is None:
        if name is None:
            raise VermouthError(f"{root}: unseen classes not given and the dataset is not "
                                "recognised; pass a list or write root/unseen.txt")
        unseen = unseen_classes(name)
    split = sbir_split(photos.classnames, sketches.classnames, list(unseen))
    return SbirData(name, photos, sketches, split)


def relevance(query_classnames, gallery_classnames) -> np.ndarray:
    """bool (n_queries, n_gallery): True where a query and a gallery item share a class name."""
    names = sorted(set(query_classnames) | set(gallery_classnames))
    index = {n: i for i, n in enumerate(names)}
    q = np.array([index[n] for n in query_classnames], dtype=np.int64)
    g = np.array([index[n] for n in gallery_classnames], dtype=np.int64)
    return q[:, None] == g[None, :]
