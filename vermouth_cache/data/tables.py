"""Context tables: rows of text features that condition a U-net directly (VPD's class embeddings).

A table is one safetensors file holding `context`, a float32 (rows, width) array, and metadata
`rows` (a JSON list naming each row, e.g. ADE20K's 150 class names) and `about` (JSON: how it was
made). The sha256 of the file's bytes is its identity: it enters the key of every feature the
table conditions, so editing a table can never be served another table's features.

`vermouth-cache tables` writes them (models/text_tables.py, from a CLIP model and templates) and
converts VPD's shipped `.pth` tables (read without unpickling code: data/pickles.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from vermouth_cache.core.atomic import atomic_write
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import file_sha256
from vermouth_cache.data.pickles import load_torch_tensors

ARRAY = "context"


@dataclass(frozen=True)
class ContextTable:
    path: Path
    sha256: str
    rows: tuple[str, ...]
    values: np.ndarray  # (rows, width) float32
    about: dict

    def check_width(self, width: int) -> None:
        """Refuse a table whose rows the U-net cannot attend to."""
        if self.values.shape[1] != width:
            raise VermouthError(f"context table {self.path.name} has rows {self.values.shape[1]} wide; this U-net "
                                f"attends to {width}-wide text (make the table with its text encoder)")

    def row(self, name: str, *, sample: str = "") -> np.ndarray:
        """The (1, width) row called `name`; refuses a name the table lacks."""
        try:
            i = self.rows.index(name)
        except ValueError:
            raise VermouthError(f"context table {self.path.name} has no row {name!r}"
                                + (f" (sample {sample})" if sample else "")) from None
        return self.values[i:i + 1]


def _bytes_of(values: np.ndarray, rows, about: dict) -> bytes:
    """The safetensors bytes of a table, written here rather than by `safetensors.numpy.save`, whose
    header order varies between calls: the same table must be the same bytes, hence the same key."""
    values = np.ascontiguousarray(values, dtype="<f4")
    data = values.tobytes()
    header = {"__metadata__": {"about": json.dumps(about, sort_keys=True), "rows": json.dumps(list(rows))},
              ARRAY: {"dtype": "F32", "shape": list(values.shape), "data_offsets": [0, len(data)]}}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + data


def write_table(path: str | Path, values: np.ndarray, rows, about: dict) -> Path:
    """Write a table atomically; rows name the rows in order (unique)."""
    values = np.asarray(values, dtype=np.float32)
    rows = [str(r) for r in rows]
    if values.ndim != 2 or values.shape[0] != len(rows) or not len(rows) or values.shape[1] < 1:
        raise VermouthError(f"a context table needs one row per name: {values.shape} values for {len(rows)} names")
    if len(set(rows)) != len(rows):
        raise VermouthError("context table row names must be unique")
    if not np.isfinite(values).all():
        raise VermouthError("context table values must be finite")
    path = Path(path)
    atomic_write(path, _bytes_of(values, rows, about))
    return path


@lru_cache(maxsize=8)
def _read(path: str, size: int, mtime_ns: int) -> ContextTable:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    p = Path(path)
    raw = p.read_bytes()  # values, metadata and sha256 all from these bytes
    try:
        arrays = load(raw)
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # the safetensors header
        meta = header.get("__metadata__") or {}
        rows = json.loads(meta.get("rows", "null")) or []
        if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
            raise ValueError("its 'rows' metadata is not a list of names")
        rows = tuple(rows)
        about = json.loads(meta.get("about", "{}"))
    except (SafetensorError, ValueError, OSError) as exc:
        raise VermouthError(f"context table {p}: not a readable safetensors table ({exc})") from None
    values = arrays.get(ARRAY)
    if (values is None or values.ndim != 2 or values.shape[0] != len(rows) or 0 in values.shape
            or values.dtype.kind != "f"):
        raise VermouthError(f"context table {p}: needs a non-empty 2-D float {ARRAY!r} array with one row per name "
                            "in its metadata")
    if not isinstance(about, dict) or len(set(rows)) != len(rows):
        raise VermouthError(f"context table {p}: its metadata needs unique row names and an 'about' mapping")
    if not np.isfinite(values).all():
        raise VermouthError(f"context table {p}: holds non-finite values")
    digest = hashlib.sha256(raw).hexdigest()
    return ContextTable(p, digest, rows, values.astype(np.float32), about)


def read_table(path: str | Path) -> ContextTable:
    """The table at `path` (memoised per file size and mtime; the sha256 is of the bytes read)."""
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        raise VermouthError(f"context table {path} does not exist") from None
    return _read(str(p), st.st_size, st.st_mtime_ns)


def table_sha256(path: str | Path) -> str:
    """The table's identity, as keys record it."""
    return read_table(path).sha256


def convert_pth(src: str | Path, dst: str | Path, rows=None) -> Path:
    """A VPD `.pth` table (a (rows, width) tensor) as a safetensors table; `rows` names its rows
    (default: row0, row1, ...). The tensor is read without unpickling code."""
    obj = load_torch_tensors(src)
    if isinstance(obj, dict):
        arrays = [v for v in obj.values() if isinstance(v, np.ndarray)]
        if len(arrays) != 1:
            raise VermouthError(f"{src}: expected one tensor, found {len(arrays)} in a dict")
        obj = arrays[0]
    if not isinstance(obj, np.ndarray) or obj.ndim != 2:
        raise VermouthError(f"{src}: expected a 2-D tensor (rows, width), found {getattr(obj, 'shape', type(obj))}")
    names = list(rows) if rows is not None else [f"row{i}" for i in range(obj.shape[0])]
    if len(names) != obj.shape[0]:
        raise VermouthError(f"{src} has {obj.shape[0]} rows but {len(names)} names were given")
    about = {"source": "converted from a .pth", "pth": Path(src).name, "pth_sha256": file_sha256(Path(src))}
    try:
        return write_table(dst, obj, names, about)
    except VermouthError as exc:
        raise VermouthError(f"{src}: {exc}") from None
