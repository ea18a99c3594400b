"""What a loaded dataset is: its `Sample`s, sorted by id, and the identity its cached features hang on.

Every loader (`datasets.load_dataset` for folders, split files and manifests, `seg` for
segmentation roots, `sbir` for photo and sketch trees) returns a `Dataset`. The identity is the
sha256 of the sorted ``(id, sha256 of image bytes)`` pairs: moving a dataset keeps its cache,
changing one image's bytes makes a new one, and labels or class names do not enter it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json, file_sha256
from vermouth_cache.data.views import View


@dataclass(frozen=True)
class Sample:
    id: str  # relative POSIX path under the root, e.g. "dog/001.jpg"
    path: Path  # absolute path
    label: int | None
    classname: str | None
    split: str | None = None
    domain: str | None = None
    mask: Path | None = None  # absolute path of a label map, when the manifest has one
    text: str | None = None  # the sample's own sentence (a referring expression), when it has one
    view: View | None = None  # a crop of the image (its id names it), when the dataset is one of views
    depth: Path | None = None  # absolute path of a depth map (uint16 PNG), when the dataset has them
    region: str | None = None  # the referred object's COCO segmentation (JSON), for referring datasets
    member: str | None = None  # where in the archive at `path` its bytes are (data/archives.py), for tar/HF inputs


@dataclass(frozen=True)
class Dataset:
    name: str
    root: Path
    samples: tuple[Sample, ...]
    classnames: tuple[str, ...]  # index = label
    source: dict  # {"kind", "spec", "split", "shots", "shot_seed"}: how it was loaded
    # Memos of identity() and image_hashes(); excluded from eq/repr so two loads of the same data compare equal.
    _identity: str | None = field(default=None, init=False, repr=False, compare=False)
    _hashes: tuple[str, ...] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.samples)

    def image_hashes(self) -> tuple[str, ...]:
        """sha256 hex of each sample's image bytes, in sample order; computed once."""
        if self._hashes is None:
            samples = self.samples
            # Hash one file here first so the process-wide memo is created once, not raced by
            # the pool threads; the rest is I/O bound, so threads overlap reads well.
            hashes = [_hash(samples[0])] if samples else []
            workers = min(32, 2 * (os.cpu_count() or 4))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                hashes += list(pool.map(_hash, samples[1:]))
            object.__setattr__(self, "_hashes", tuple(hashes))  # frozen: bypass only for the memo
        return self._hashes

    def identity(self) -> str:
        """sha256 hex of canonical_json(sorted [[id, sha256 of bytes], ...]); computed once.

        Labels, classnames and paths are deliberately not part of it: the identity says which
        image bytes are in the set, which is what cached features depend on.
        """
        if self._identity is None:
            object.__setattr__(self, "_identity", identity_of([s.id for s in self.samples], self.image_hashes()))
        return self._identity

    def describe(self) -> dict:
        """Readable summary for store manifests."""
        return {"name": self.name, "n_samples": len(self.samples), "identity": self.identity(),
                "source": dict(self.source), "classnames": list(self.classnames)}


def identity_of(ids, hashes) -> str:
    """The identity of a dataset whose samples `ids` have images of sha256 `hashes` (`Dataset.identity`)."""
    pairs = sorted([i, h] for i, h in zip(ids, hashes))
    return hashlib.sha256(canonical_json(pairs).encode()).hexdigest()


def _hash(sample: Sample) -> str:
    try:
        if sample.member is not None:  # an image inside a tar shard or a saved HF dataset
            from vermouth_cache.data.members import member_bytes

            return hashlib.sha256(member_bytes(sample.path, sample.member)).hexdigest()
        return file_sha256(sample.path)
    except OSError as e:  # deleted or unreadable since the load
        raise VermouthError(f"cannot read image {sample.id} ({sample.path}): {e.strerror or e}") from None
