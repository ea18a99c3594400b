"""The bytes of one image inside an archive: a WebDataset tar member (by its data offset, one
`os.pread`, so decoding threads never share a file position) or a row of a saved Hugging Face
dataset (its Image column's stored bytes). `data/archives.py` lists archives into samples; this
module only reads, so samples and decoding can use it without importing the listing.
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
import threading
from pathlib import Path

from vermouth_cache.core.errors import VermouthError, require

HF_ROW = re.compile(r"^hf:([^:]*):(\d+)$")  # hf:SPLIT:ROW (SPLIT empty for a single Dataset)


def file_state(path) -> tuple:
    """What changes when a file is rewritten or replaced (a cache of its contents is keyed by it)."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino


def folder_state(path) -> tuple:
    """file_state of every file of a folder (a saved Hugging Face dataset: its Arrow and JSON files)."""
    return tuple((p.name, *file_state(p)) for p in sorted(Path(path).rglob("*")) if p.is_file())


def tar_index(path: str) -> dict[str, tuple[int, int]]:
    return _tar_index(path, file_state(path))


def hf_split(path: str, split: str | None):
    """The saved dataset (split) at `path`, re-read when any of its files changed since."""
    return _hf_split(path, split, folder_state(path))


@functools.lru_cache(maxsize=64)
def _tar_index(path: str, state: tuple) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of one tar's regular files (read once per process)."""
    try:
        with tarfile.open(path, "r:") as tar:  # plain tar only: a compressed one has no offsets to pread
            return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise VermouthError(f"{path}: not a readable (uncompressed) tar shard ({exc})") from None


@functools.lru_cache(maxsize=8)
def _hf_split(path: str, split: str | None, state: tuple):
    datasets = require("datasets", "reading a saved Hugging Face dataset")
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds for a damaged folder
        raise VermouthError(f"{path}: not a saved Hugging Face dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise VermouthError(f"{path} holds the splits {', '.join(loaded)}: give --split")
        loaded = loaded[split]
    elif split is not None:
        raise VermouthError(f"{path}: split {split!r} given, but the saved dataset has no splits")
    column, _ = hf_columns(loaded, Path(path))
    return loaded.cast_column(column, datasets.Image(decode=False))  # bytes as stored, decoded by us


def hf_columns(ds, spec: Path) -> tuple[str, str | None]:
    import datasets

    images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if len(images) != 1:
        raise VermouthError(f"{spec}: expected one Image column, found {len(images)} ({', '.join(ds.features)})")
    labels = [k for k, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    return images[0], (labels[0] if labels else None)


_hf_lock = threading.Lock()


# -- bytes ------------------------------------------------------------------------------------
def member_bytes(path: Path, member: str) -> bytes:
    """The bytes of `member` of the archive at `path` (a tar member name, or hf:ROW)."""
    row = HF_ROW.match(member)
    if row is not None:
        return _hf_bytes(path, row.group(1) or None, int(row.group(2)))
    index = tar_index(str(path))
    if member not in index:
        raise FileNotFoundError(f"{member} is no longer in {path}")
    offset, size = index[member]
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: {member} is cut short ({len(data)} of {size} bytes)")
    return data


def _hf_bytes(path: Path, split: str | None, row: int) -> bytes:
    ds = hf_split(str(path), split)
    if row >= len(ds):
        raise FileNotFoundError(f"row {row} is no longer in {path}")
    column, _ = hf_columns(ds, path)
    with _hf_lock:  # Arrow reads are memory maps, but the datasets wrapper keeps per-object state
        cell = ds[row][column]
    if cell.get("bytes") is not None:
        return cell["bytes"]
    if cell.get("path"):
        return Path(cell["path"]).read_bytes()
    raise OSError(f"row {row} of {path} holds no image bytes")
