"""The feature store: Zarr v3 arrays keyed by recipe, with completeness tracked per shard.

Layout of a store directory:

    vermouth-store.json                     schema version (a newer one is refused)
    datasets/<dataset-key>.json             sample ids, labels, class names, image sha256s
    <kind>/<key>/manifest.json              recipe (what the key hashes), readable facts, versions
    <kind>/<key>/arrays/<name>/...          Zarr v3 array (N, ...) chunked one shard per chunk
    <kind>/<key>/shards/<name>/<i>.json     shard i of array <name> is complete: per-sample status,
                                            device, seconds (written after the chunk, atomically)

kinds: captions, text, latents, features, expert. A shard is `shard_size` consecutive samples of
the dataset (sorted by id); each shard of each array is written whole by one writer, then its
record. A chunk without a record is not data: reads refuse it, and extraction recomputes it.
Float arrays are filled with NaN, so even a bypassing reader never sees zeros for a missing chunk.
Chunks carry a CRC32C checksum.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from . import SCHEMA_VERSION, __version__
from .errors import VermouthError
from .hashing import canonical_json, recipe_key

KINDS = ("captions", "text", "latents", "features", "expert", "masks", "classtext")
STORE_MARKER = "vermouth-store.json"
STORAGE_DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}
OK = "ok"


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise VermouthError(f"corrupt store file {path}: {exc}") from None


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: keep the raw bits as uint16
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return np.asarray(x, dtype=dtype)


def _from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).float().numpy()
    return x


def _nan_fill(dtype: str):
    return 0x7FC0 if dtype == "bfloat16" else (np.nan if np.dtype(dtype).kind == "f" else 0)


@dataclass(frozen=True)
class ShardRecord:
    shard: int
    start: int
    stop: int
    status: list[str]  # "ok" or "error: <reason>" per sample
    values: list | None = None  # captions are stored here, not in an array
    run: dict | None = None  # device, precision, seconds: what may differ between runs

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Entry:
    """One keyed artifact: a manifest, its arrays and their per-shard completion records."""

    def __init__(self, root: Path, kind: str, key: str):
        self.root = root
        self.kind = kind
        self.key = key
        self._manifest: dict | None = None
        self._arrays: dict[str, zarr.Array] = {}

    def __repr__(self) -> str:
        return f"Entry({self.kind}/{self.key})"

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            path = self.root / "manifest.json"
            if not path.is_file():
                raise VermouthError(f"store entry {self.kind}/{self.key} has no manifest")
            self._manifest = read_json(path)
        return self._manifest

    @property
    def n_samples(self) -> int:
        return self.manifest["n_samples"]

    @property
    def shard_size(self) -> int:
        return self.manifest["shard_size"]

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.shard_size)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min(self.n_samples, (shard + 1) * self.shard_size)

    def array_names(self) -> list[str]:
        return sorted(self.manifest.get("arrays", {}))

    # -- arrays ---------------------------------------------------------------------------------
    def ensure_array(self, name: str, sample_shape: tuple[int, ...], dtype: str) -> None:
        """Create array `name` (N, *sample_shape) once; later calls must agree on shape and dtype."""
        arrays = self.manifest.setdefault("arrays", {})
        spec = {"shape": list(sample_shape), "dtype": dtype}
        if name in arrays:
            if arrays[name] != spec:
                raise VermouthError(f"store entry {self.kind}/{self.key} array {name}: has {arrays[name]}, asked {spec}")
            return
        zarr.create_array(
            store=str(self.root / "arrays"),
            name=name,
            shape=(self.n_samples, *sample_shape),
            chunks=(self.shard_size, *sample_shape),
            dtype="uint16" if dtype == "bfloat16" else dtype,
            fill_value=_nan_fill(dtype),
            serializer=BytesCodec(),
            compressors=[Crc32cCodec()],
            attributes={"vermouth_dtype": dtype},
            overwrite=True,  # an array dir without a manifest line is debris of a killed run
        )
        arrays[name] = spec
        write_json_atomic(self.root / "manifest.json", self.manifest)

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            if name not in self.manifest.get("arrays", {}):
                raise VermouthError(f"store entry {self.kind}/{self.key} has no array {name!r}")
            self._arrays[name] = zarr.open_array(store=str(self.root / "arrays"), path=name, mode="r+")
        return self._arrays[name]

    # -- completion records ---------------------------------------------------------------------
    def _record_path(self, name: str, shard: int) -> Path:
        return self.root / "shards" / name / f"{shard:06d}.json"

    def done_shards(self, name: str) -> set[int]:
        folder = self.root / "shards" / name
        if not folder.is_dir():
            return set()
        return {int(p.stem) for p in folder.glob("*.json")}

    def record(self, name: str, shard: int) -> ShardRecord | None:
        path = self._record_path(name, shard)
        if not path.is_file():
            return None
        return ShardRecord(**read_json(path))

    def write_shard(self, name: str, shard: int, status: list[str], data: np.ndarray | None = None,
                    values: list | None = None, run: dict | None = None) -> None:
        """Write shard `shard` of `name` whole (one chunk), then its record; the record is the commit."""
        start, stop = self.shard_bounds(shard)
        if len(status) != stop - start:
            raise ValueError(f"shard {shard} of {name}: {len(status)} statuses for {stop - start} samples")
        if data is not None:
            spec = self.manifest["arrays"][name]
            arr = self._array(name)
            arr[start:stop] = _to_storage(data, spec["dtype"])
        rec = ShardRecord(shard, start, stop, list(status), values, run)
        write_json_atomic(self._record_path(name, shard), rec.to_json())

    def statuses(self, name: str) -> list[str | None]:
        """Per sample: "ok", "error: ...", or None where the shard was never completed."""
        known = self._statuses_of(name, self.done_shards(name))
        return [known.get(i) for i in range(self.n_samples)]

    def _statuses_of(self, name: str, shards: set[int]) -> dict[int, str]:
        """{sample index: status} for the samples of `shards` that have a record."""
        out: dict[int, str] = {}
        for shard in shards:
            rec = self.record(name, shard)
            if rec is not None:
                out.update(zip(range(rec.start, rec.stop), rec.status))
        return out

    def values(self, name: str) -> list:
        """Per-sample values kept in records (captions); None where not computed."""
        out: list = [None] * self.n_samples
        for shard in self.done_shards(name):
            rec = self.record(name, shard)
            if rec.values is not None:
                out[rec.start:rec.stop] = rec.values
        return out

    def read(self, name: str, indices: np.ndarray | list[int] | slice | None = None) -> np.ndarray:
        """Rows of array `name`; refuses any requested sample whose shard is not complete or failed."""
        idx = np.arange(self.n_samples)[indices if indices is not None else slice(None)]
        statuses = self._statuses_of(name, {int(i) // self.shard_size for i in idx})  # only the shards read
        bad = [int(i) for i in idx if statuses.get(int(i)) != OK]
        if bad:
            i = bad[0]
            why = "was never computed" if statuses.get(i) is None else statuses[i]
            raise VermouthError(
                f"store entry {self.kind}/{self.key} array {name}: {len(bad)} requested sample(s) not available "
                f"(sample #{i} {why})"
            )
        spec = self.manifest["arrays"][name]
        arr = self._array(name)
        if len(idx) and np.all(np.diff(idx) == 1):
            data = arr[int(idx[0]): int(idx[-1]) + 1]
        else:
            data = arr.get_orthogonal_selection((idx,) + (slice(None),) * (arr.ndim - 1))
        return _from_storage(np.asarray(data), spec["dtype"])

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "arrays").rglob("*") if p.is_file()) if (self.root / "arrays").exists() else 0


class Store:
    """A directory of keyed entries. `open(create=True)` makes an empty store."""

    def __init__(self, root: str | os.PathLike, *, create: bool = False):
        self.root = Path(root)
        marker = self.root / STORE_MARKER
        if not marker.is_file():
            if not create:
                raise VermouthError(f"{self.root} is not a vermouth-cache store (no {STORE_MARKER})")
            if self.root.exists() and any(self.root.iterdir()):
                raise VermouthError(f"{self.root} exists, is not empty and is not a vermouth-cache store")
            write_json_atomic(marker, {"schema_version": SCHEMA_VERSION, "created_by": f"vermouth-cache {__version__}"})
        info = read_json(marker)
        if info.get("schema_version", 0) > SCHEMA_VERSION:
            raise VermouthError(
                f"store {self.root} was written by a newer vermouth-cache (schema {info['schema_version']} > "
                f"{SCHEMA_VERSION}): upgrade vermouth-cache to read it"
            )

    # -- datasets -------------------------------------------------------------------------------
    def put_dataset(self, record: dict) -> str:
        """Store a dataset record (ids, labels, ...); its key hashes the whole record."""
        key = recipe_key(record)
        path = self.root / "datasets" / f"{key}.json"
        if not path.is_file():
            write_json_atomic(path, record)
        return key

    def dataset(self, key: str) -> dict:
        path = self.root / "datasets" / f"{key}.json"
        if not path.is_file():
            raise VermouthError(f"store {self.root} has no dataset record {key}")
        return read_json(path)

    # -- entries --------------------------------------------------------------------------------
    def entry(self, kind: str, recipe: dict, *, n_samples: int, shard_size: int, about: dict) -> Entry:
        """The entry for `recipe`, created if new. `about` holds readable facts outside the key."""
        if kind not in KINDS:
            raise ValueError(kind)
        key = recipe_key(recipe)
        entry = Entry(self.root / kind / key, kind, key)
        path = entry.root / "manifest.json"
        if path.is_file():
            if canonical_json(entry.manifest["recipe"]) != canonical_json(recipe):
                raise VermouthError(f"store entry {kind}/{key}: stored recipe differs from the request (hash collision?)")
            return entry
        import diffusers
        import torch
        import transformers

        manifest = {
            "kind": kind,
            "key": key,
            "recipe": recipe,
            "about": about,
            "n_samples": n_samples,
            "shard_size": shard_size,
            "arrays": {},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {
                "vermouth-cache": __version__,
                "schema": SCHEMA_VERSION,
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "zarr": zarr.__version__,
                "numpy": np.__version__,
            },
        }
        if (entry.root / "arrays").exists():  # debris of a run killed before its manifest landed
            shutil.rmtree(entry.root / "arrays")
        write_json_atomic(path, manifest)
        return entry

    def entries(self, kind: str | None = None) -> list[Entry]:
        out = []
        for k in [kind] if kind else KINDS:
            folder = self.root / k
            if folder.is_dir():
                out += [Entry(p, k, p.name) for p in sorted(folder.iterdir()) if (p / "manifest.json").is_file()]
        return out

    def find(self, kind: str, key_prefix: str) -> Entry:
        exact = self.root / kind / key_prefix
        if key_prefix and (exact / "manifest.json").is_file():  # a whole key: no scan of the kind's entries
            return Entry(exact, kind, key_prefix)
        matches = [e for e in self.entries(kind) if e.key.startswith(key_prefix)]
        if not matches:
            raise VermouthError(f"store {self.root} has no {kind} entry with key {key_prefix!r}")
        if len(matches) > 1:
            raise VermouthError(f"key {key_prefix!r} matches {len(matches)} {kind} entries; give more digits")
        return matches[0]
