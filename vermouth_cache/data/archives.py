"""Images inside archives people already have: WebDataset tar shards and saved Hugging Face datasets.

    shards/000000.tar, 000001.tar, ...    WebDataset: members KEY.jpg|png|webp (the image) beside
                                          KEY.cls (an integer label) or KEY.json ({"label": ...});
                                          optional classes.txt beside the shards (one name per label)
    hf/ (datasets.Dataset.save_to_disk)   a column of datasets.Image (bytes or a path) and, if there
                                          is one, a ClassLabel column (its names are the classes);
                                          a saved DatasetDict needs --split

A sample is one image: its id is `SHARD/KEY.EXT` (tar) or `SPLIT/ROW` (Hugging Face) and its
`member` says where its bytes are. Identity is the rule of every dataset: the sha256 of the
image's bytes, so the same images give the same keys whether they come as files, a tar or Arrow.
Bytes are read by offset (a tar member's data start, found once per shard per process) with one
`os.pread`, so decoding threads never share a file position; nothing is unpacked to disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.members import hf_columns, hf_split, tar_index, member_bytes
from vermouth_cache.data.samples import Sample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def is_webdataset(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".tar") or (path.is_dir() and any(path.glob("*.tar"))
                                                        and not any(p.is_dir() for p in path.iterdir()))


def is_hf_dataset(path: Path) -> bool:
    """A folder `save_to_disk` wrote: one Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


# -- WebDataset ---------------------------------------------------------------------------------
def load_webdataset(spec: Path, split: str | None) -> tuple[list[Sample], tuple[str, ...]]:
    """(samples in shard and member order, class names) of one .tar or a folder of them."""
    if split is not None:
        raise VermouthError(f"{spec}: split {split!r} given, but WebDataset shards have no splits (give the shards "
                            "of one split)")
    shards = [spec] if spec.is_file() else sorted(spec.glob("*.tar"))
    root = spec.parent if spec.is_file() else spec
    rows = []
    for shard in shards:
        groups: dict[str, dict[str, str]] = {}
        for name in _members(shard):
            base = name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key, ext = name[: len(name) - len(base) + base.index(".")], base[base.index(".") + 1:].lower()
            groups.setdefault(key, {})[ext] = name
        for key, parts in groups.items():
            images = [e for e in IMAGE_EXTS if e in parts]
            if not images:
                continue  # a key without an image (e.g. metadata only) is not a sample
            if len(images) > 1:
                raise VermouthError(f"{shard}: key {key!r} has two images ({', '.join(images)})")
            label = _wds_label(shard, parts)
            rows.append((f"{shard.name}/{key}.{images[0]}", shard, parts[images[0]], label))
    if not rows:
        raise VermouthError(f"no images in the WebDataset shards at {spec}")
    labels = sorted({r[3] for r in rows if r[3] is not None})
    names = _class_file(root / "classes.txt", labels)
    samples = [Sample(sid, shard.resolve(), label, names[label] if label is not None else None, member=member)
               for sid, shard, member, label in rows]
    return samples, tuple(names)


def _members(shard: Path) -> list[str]:
    return list(tar_index(str(shard.resolve())))


def _wds_label(shard: Path, parts: dict[str, str]) -> int | None:
    raw = None
    if "cls" in parts:
        raw = member_bytes(shard.resolve(), parts["cls"]).decode("utf-8", "replace").strip()
    elif "json" in parts:
        try:
            meta = json.loads(member_bytes(shard.resolve(), parts["json"]))
        except ValueError:
            raise VermouthError(f"{shard}: {parts['json']} is not JSON") from None
        raw = meta.get("label", meta.get("cls")) if isinstance(meta, dict) else None
    if raw is None:
        return None
    try:
        label = int(raw)
    except (TypeError, ValueError):
        raise VermouthError(f"{shard}: label {str(raw)[:40]!r} of {parts.get('cls') or parts.get('json')} is not an "
                            "integer") from None
    if not 0 <= label < 100_000:
        raise VermouthError(f"{shard}: label {label} is outside 0-99999")
    return label


def _class_file(path: Path, labels: list[int]) -> list[str]:
    """Class names by label: classes.txt's lines, else the labels' numbers."""
    n = (max(labels) + 1) if labels else 0
    if path.is_file():
        names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) < n:
            raise VermouthError(f"{path}: {len(names)} class names for labels up to {n - 1}")
        return names
    return [str(i) for i in range(n)]


# -- Hugging Face datasets ------------------------------------------------------------------------
def load_hf(spec: Path, split: str | None) -> tuple[list[Sample], tuple[str, ...]]:
    """(samples in row order, class names) of a saved Dataset (or one split of a DatasetDict)."""
    ds = hf_split(str(spec.resolve()), split)
    column, label_col = hf_columns(ds, spec)
    names: tuple[str, ...] = tuple(ds.features[label_col].names) if label_col else ()
    labels = ds[label_col] if label_col else [None] * len(ds)
    prefix = f"{split}/" if split else ""
    samples = [Sample(f"{prefix}{i:08d}", spec.resolve(), lab if lab is None or lab >= 0 else None,
                      names[lab] if lab is not None and lab >= 0 else None, split=split, member=f"hf:{split or ''}:{i}")
               for i, lab in enumerate(labels)]
    if not samples:
        raise VermouthError(f"{spec}: the dataset has no rows")
    return samples, names


