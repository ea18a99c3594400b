"""The feature store: Zarr v3 arrays keyed by recipe, with completeness tracked per shard.

Layout (on a local or shared directory, or under an object-store URL, see `storage`):

    vermouth-store.json                     schema version (a newer one is refused)
    datasets/<dataset-key>.json             sample ids, labels, class names, image sha256s
    <kind>/<key>/manifest.json              recipe (what the key hashes), readable facts, versions
    <kind>/<key>/arrays/<name>/...          Zarr v3 array (N, ...) chunked one shard per chunk
    <kind>/<key>/shards/<name>/<i>.json     shard i of array <name> is complete: per-sample status,
                                            the chunk's size and CRC32C, device, seconds
    <kind>/<key>/claims/<i>.<gen>.json      a writer is computing shard i (see `claims`)
    <kind>/<key>/used.json                  when the entry was last extracted into or read (gc)

kinds: captions, text, latents, features, expert, masks, classtext. A shard is `shard_size`
consecutive samples of the dataset (sorted by id); each shard of each array is written whole by
one writer, as one chunk object written atomically, then its record. A chunk without a record is
not data: reads refuse it, and extraction recomputes it. Float arrays are filled with NaN, so
even a bypassing reader never sees zeros for a missing chunk.

Every read checks what `verify --deep` checks, for the shards it touches (`Entry.read`): the
record parses and covers the shard; it was written under this manifest and this array metadata
(their sha256s are in the record); the chunk exists, has the record's size, and its bytes have the
record's CRC32C (so a chunk swapped for another well-formed one is refused). The chunk is then
decoded from those very bytes with numpy, by the metadata just checked. Every JSON file read is
validated (`store_files`). Nothing in a store is a pickle: JSON, and Zarr arrays of plain numbers
whose codecs are checked before any byte is decoded.

Every file is created or replaced atomically, and manifests, array metadata and dataset records
are created only if absent, so several writers may share a store (see `claims`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec

from vermouth_cache import SCHEMA_VERSION, __version__
from vermouth_cache.core.atomic import atomic_write_json
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json, recipe_key
from vermouth_cache.store.location import Location, LocalLocation, open_location, space_error
from vermouth_cache.store.files import (ArrayMeta, Record, StoreMarker, check_dataset_record, check_key, check_manifest,
                          digest, parse)

KINDS = ("captions", "text", "latents", "features", "expert", "masks", "classtext")
STORE_MARKER = "vermouth-store.json"
STORAGE_DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}
OK = "ok"
# what a store's arrays may hold and how they may be encoded: numbers only, never objects
SAFE_DATA_TYPES = {"float16", "float32", "float64", "uint8", "uint16", "uint32", "int8", "int16", "int32", "int64",
                   "bool"}
SAFE_CODECS = {"bytes", "crc32c"}
TOUCH_EVERY = 3600.0  # seconds between two `used.json` updates of one entry by one process


def write_json_atomic(path: Path, obj) -> None:
    """Write a local file to a temporary name in the same directory, fsync, then rename it over the target."""
    atomic_write_json(path, obj)


class ShardDamage(VermouthError):
    """A committed shard that cannot be served: its record, chunk or metadata do not agree."""

    def __init__(self, entry: str, array: str, shard: int, reason: str):
        super().__init__(f"store entry {entry} array {array} shard {shard}: {reason}; `vermouth-cache verify --deep` "
                         "names every damaged shard, `vermouth-cache repair` recomputes them")
        self.entry, self.array, self.shard, self.reason = entry, array, shard, reason


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
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


def _zarr_dtype(dtype: str) -> str:
    return "uint16" if dtype == "bfloat16" else dtype


def chunk_checksum(block: np.ndarray) -> dict:
    """Size and CRC32C of a chunk object as Zarr stores it: the C-order little-endian bytes of
    the whole chunk (an edge chunk padded with the fill value), then their CRC32C in 4 bytes."""
    raw = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).tobytes()
    return {"nbytes": len(raw) + 4, "crc32c": google_crc32c.value(raw)}


@dataclass(frozen=True)
class ShardRecord:
    shard: int
    start: int
    stop: int
    status: list[str]  # "ok" or "error: <reason>" per sample
    values: list | None = None  # captions are stored here, not in an array
    run: dict | None = None  # device, precision, seconds: what may differ between runs
    chunk: dict | None = None  # {"nbytes", "crc32c", "meta": sha256 of zarr.json} of the chunk it commits
    manifest: str = ""  # sha256 of the manifest it was written under

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Entry:
    """One keyed artifact: a manifest, its arrays and their per-shard completion records."""

    def __init__(self, loc: Location, kind: str, key: str):
        self.loc = loc
        self.kind = kind
        self.key = key
        self.prefix = f"{kind}/{key}"
        self._manifest: dict | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._specs: dict[str, dict] | None = None
        self._broken: dict[str, str] = {}  # array -> why it cannot be read (its metadata is gone or altered)
        self._manifest_digest = ""
        self._zstore = None
        self._touched = 0.0

    def __repr__(self) -> str:
        return f"Entry({self.prefix})"

    @property
    def root(self):
        """The entry's directory (a Path) on a filesystem, its URL on an object store."""
        return self.loc.root / self.prefix if isinstance(self.loc, LocalLocation) else self.loc.join(self.prefix)

    @property
    def manifest(self) -> dict:
        """The manifest, once checked: well formed, of this entry, its recipe hashing to the key."""
        if self._manifest is None:
            where = f"{self.prefix}/manifest.json"
            try:
                body = self.loc.read_json(where)
            except FileNotFoundError:
                raise VermouthError(f"store entry {self.prefix} has no manifest") from None
            check_manifest(body, where, self.kind, self.key)
            self._manifest, self._manifest_digest = body, digest(body)
        return self._manifest

    @property
    def manifest_digest(self) -> str:
        self.manifest
        return self._manifest_digest

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

    # -- arrays ---------------------------------------------------------------------------------
    @property
    def arrays(self) -> dict[str, dict]:
        """{name: {"shape": per-sample shape, "dtype", "meta": sha256 of zarr.json}} of every readable
        array; arrays whose metadata is missing or altered are in `broken` instead."""
        if self._specs is None:
            self._specs, self._broken = self._read_specs()
        return self._specs

    @property
    def broken(self) -> dict[str, str]:
        """{array: why it cannot be read}: committed data whose metadata is missing or not vermouth's."""
        self.arrays
        return self._broken

    def array_names(self) -> list[str]:
        """Every array the entry holds, broken ones included (reading those raises, naming why)."""
        return sorted(set(self.arrays) | set(self.broken))

    def array_spec(self, name: str) -> dict:
        if name not in self.arrays:
            self._specs = None  # another writer may have added it since we looked
        if name in self.broken:
            raise VermouthError(f"store entry {self.prefix} array {name}: {self.broken[name]}; `vermouth-cache repair` "
                                "recomputes it")
        if name not in self.arrays:
            raise VermouthError(f"store entry {self.prefix} has no array {name!r}")
        return self.arrays[name]

    def _read_specs(self) -> tuple[dict[str, dict], dict[str, str]]:
        specs, broken = {}, {}
        for name in self.loc.list(f"{self.prefix}/arrays"):
            if name == "zarr.json":
                continue  # the group's own metadata
            where = f"{self.prefix}/arrays/{name}/zarr.json"
            try:
                body = self.loc.read_json(where)
            except FileNotFoundError:
                broken[name] = "its metadata (zarr.json) is missing"
                continue
            _refuse_unsafe(body, f"{self.prefix}/arrays/{name}")
            try:
                spec = self._check_meta(parse(ArrayMeta, body, where), name)
            except VermouthError as exc:
                broken[name] = str(exc)
                continue
            specs[name] = {**spec, "meta": digest(body)}
        for name in self.record_names():  # records that commit chunks of an array whose folder is gone
            if name in specs or name in broken:
                continue
            shards = sorted(self.done_shards(name))
            rec = self.record(name, shards[0]) if shards else None
            if rec is not None and rec.chunk is not None:
                broken[name] = "its records commit chunks but its metadata (zarr.json) is missing"
        return specs, broken

    def _check_meta(self, meta: ArrayMeta, name: str) -> dict:
        """The array's per-sample spec, if its metadata is exactly what `ensure_array` writes."""
        dtype = meta.attributes.get("vermouth_dtype", meta.data_type)
        sample = list(meta.shape[1:])
        expected = {
            "shape[0]": (meta.shape[:1], [self.n_samples]),
            "data_type": (meta.data_type, _zarr_dtype(dtype) if isinstance(dtype, str) else None),
            "chunk_grid": (meta.chunk_grid, {"name": "regular", "configuration": {"chunk_shape": [self.shard_size, *sample]}}),
            "chunk_key_encoding": (meta.chunk_key_encoding, {"name": "default", "configuration": {"separator": "/"}}),
            "codecs": (meta.codecs, [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]),
            "storage_transformers": (getattr(meta, "storage_transformers", None) or [], []),
        }
        recipe_dtype = self.manifest["recipe"].get("dtype")  # the recipe is checked against the key
        if isinstance(recipe_dtype, str):
            expected["attributes.vermouth_dtype"] = (dtype, STORAGE_DTYPES.get(recipe_dtype, recipe_dtype))
        for what, (have, want) in expected.items():
            if have != want:
                raise VermouthError(f"its metadata was altered ({what} is {str(have)[:80]}, vermouth-cache wrote {want})")
        return {"shape": sample, "dtype": dtype}

    def _zarr_store(self):
        if self._zstore is None:
            self._zstore = self.loc.zarr_store(f"{self.prefix}/arrays")
        return self._zstore

    def ensure_array(self, name: str, sample_shape: tuple[int, ...], dtype: str) -> None:
        """Create array `name` (N, *sample_shape) once; later calls, by any writer, must agree."""
        spec = {"shape": list(sample_shape), "dtype": dtype}
        self.loc.check_writable(f"{self.prefix}/arrays/{name}")
        if name not in self.arrays:
            self._specs = None
        if name in self.arrays:
            if _shape_dtype(self.arrays[name]) != spec:
                raise VermouthError(f"store entry {self.prefix} array {name}: has {_shape_dtype(self.arrays[name])}, "
                                    f"asked {spec}")
            return
        if name in self.broken:
            self.array_spec(name)  # raises: altered metadata is never written over
        try:
            zarr.create_array(
                store=self._zarr_store(), name=name, shape=(self.n_samples, *sample_shape),
                chunks=(self.shard_size, *sample_shape), dtype=_zarr_dtype(dtype), fill_value=_nan_fill(dtype),
                serializer=BytesCodec(), compressors=[Crc32cCodec()], attributes={"vermouth_dtype": dtype},
                overwrite=False,  # never: it would delete chunks another writer has committed
            )
        except zarr.errors.ContainsArrayError:
            pass  # another writer created it first; its metadata is checked below
        except OSError as exc:
            raise space_error(exc, f"{self.prefix}/arrays/{name}") from None
        self._specs = None
        if name in self.broken or _shape_dtype(self.arrays.get(name)) != spec:
            raise VermouthError(f"store entry {self.prefix} array {name}: has {self.broken.get(name) or self.arrays.get(name)}, "
                                f"asked {spec}")

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self.array_spec(name)
            self._arrays[name] = zarr.open_array(store=self._zarr_store(), path=name,
                                                 mode="r" if self.loc.read_only else "r+")
        return self._arrays[name]

    def chunk_key(self, name: str, shard: int) -> str:
        """The store key of shard `shard`'s chunk of array `name`."""
        ndim = 1 + len(self.array_spec(name)["shape"])
        return f"{self.prefix}/arrays/{name}/c/" + "/".join([str(shard)] + ["0"] * (ndim - 1))

    def chunk_nbytes(self, name: str) -> int:
        """The size every chunk object of `name` has (an edge chunk is padded to the full shape)."""
        spec = self.array_spec(name)
        item = np.dtype(_zarr_dtype(spec["dtype"])).itemsize
        return self.shard_size * int(np.prod(spec["shape"], dtype=np.int64)) * item + 4

    # -- completion records ---------------------------------------------------------------------
    def record_key(self, name: str, shard: int) -> str:
        return f"{self.prefix}/shards/{name}/{shard:06d}.json"

    def record_names(self) -> list[str]:
        """Arrays (and caption lists) that have at least one record."""
        return self.loc.list(f"{self.prefix}/shards")

    def done_shards(self, name: str) -> set[int]:
        out = set()
        for n in self.loc.list_files(f"{self.prefix}/shards/{name}"):  # a directory named 000003.json is no record
            if n.endswith(".json"):
                try:
                    out.add(int(n[:-5]))
                except ValueError:
                    continue
        return out

    def record(self, name: str, shard: int) -> ShardRecord | None:
        """Shard `shard`'s record of `name` (shape-checked), or None if the shard was never committed."""
        where = self.record_key(name, shard)
        try:
            body = self.loc.read_json(where)
        except FileNotFoundError:
            return None
        rec = parse(Record, body, where).model_dump()
        if rec.pop("seal") != digest({k: v for k, v in body.items() if k != "seal"}):
            raise VermouthError(f"shard record {where} was edited after it was written (its seal does not match)")
        return ShardRecord(**rec)

    def checked_record(self, name: str, shard: int) -> ShardRecord | None:
        """The record, if it belongs to this shard, this manifest and (for arrays) this metadata; else ShardDamage."""
        try:
            rec = self.record(name, shard)
        except VermouthError as exc:
            raise ShardDamage(self.prefix, name, shard, f"unreadable record ({exc})") from None
        if rec is None:
            return None
        start, stop = self.shard_bounds(shard)
        damage = None
        if (rec.shard, rec.start, rec.stop) != (shard, start, stop) or len(rec.status) != stop - start:
            damage = (f"record covers samples {rec.start}-{rec.stop} with {len(rec.status)} statuses, the shard is "
                      f"{start}-{stop}")
        elif rec.values is not None and len(rec.values) != stop - start:
            damage = f"record holds {len(rec.values)} values for {stop - start} samples"
        elif rec.manifest != self.manifest_digest:
            damage = "the manifest was changed after this shard was written"
        elif rec.chunk is None and any(st == OK for st in rec.status) and rec.values is None:
            damage = "record commits no chunk although samples are ok"
        elif rec.chunk is not None and rec.chunk["meta"] != self.array_spec(name)["meta"]:
            damage = "the array's metadata (zarr.json) was changed after this shard was written"
        if damage:
            raise ShardDamage(self.prefix, name, shard, damage)
        return rec

    def checked_chunk(self, name: str, shard: int, rec: ShardRecord, *, read: bool = True) -> bytes | None:
        """The chunk's bytes, if they are exactly those `rec` committed (size, CRC32C); else ShardDamage.
        `read=False` checks only the size (no bytes are read)."""
        key = self.chunk_key(name, shard)
        expected = self.chunk_nbytes(name)
        if not read:
            size = self.loc.size(key)
            data = None
        else:
            try:  # never more than one byte past the size it must have: a huge file is not loaded
                data = self.loc.read_bytes(key, limit=expected)
            except FileNotFoundError:
                data = None
            except VermouthError as exc:
                raise ShardDamage(self.prefix, name, shard, f"chunk is corrupt: {exc}") from None
            size = None if data is None else len(data)
        if size is None:
            raise ShardDamage(self.prefix, name, shard, "chunk missing although its record says it was committed")
        if size != expected or size != rec.chunk["nbytes"]:
            raise ShardDamage(self.prefix, name, shard, f"chunk is corrupt: {size} bytes, expected {expected} "
                                                        "(truncated or overwritten)")
        if data is not None:
            crc = google_crc32c.value(np.frombuffer(data, np.uint8)[:-4])  # a numpy view: no copy, any buffer
            if crc != int.from_bytes(data[-4:], "little"):
                raise ShardDamage(self.prefix, name, shard, "checksum mismatch: the chunk's bytes are corrupt")
            if crc != rec.chunk["crc32c"]:
                raise ShardDamage(self.prefix, name, shard, "the chunk is well formed but not the one its record "
                                                            "committed (swapped or overwritten)")
        return data

    def write_shard(self, name: str, shard: int, status: list[str], data: np.ndarray | None = None,
                    values: list | None = None, run: dict | None = None, before_commit=None) -> None:
        """Write shard `shard` of `name` whole (one chunk object), then its record; the record is
        the commit. `before_commit()` runs before each of the two writes (a claim check)."""
        start, stop = self.shard_bounds(shard)
        self.loc.check_writable(self.record_key(name, shard))
        if len(status) != stop - start:
            raise ValueError(f"shard {shard} of {name}: {len(status)} statuses for {stop - start} samples")
        chunk = None
        if data is not None:
            spec = self.array_spec(name)
            stored = _to_storage(data, spec["dtype"])
            padded = np.full((self.shard_size, *stored.shape[1:]), _nan_fill(spec["dtype"]), dtype=stored.dtype)
            padded[: stop - start] = stored
            chunk = {**chunk_checksum(padded), "meta": spec["meta"]}
            if before_commit:
                before_commit()
            try:
                self._array(name)[start:stop] = stored
            except OSError as exc:  # e.g. ENOSPC from zarr's own atomic write
                raise space_error(exc, self.chunk_key(name, shard)) from None
        rec = ShardRecord(shard, start, stop, list(status), values, run, chunk, self.manifest_digest)
        if before_commit:
            before_commit()
        body = rec.to_json()
        self.loc.write_json(self.record_key(name, shard), {**body, "seal": digest(body)})

    def invalidate(self, name: str, shard: int) -> None:
        """Forget shard `shard` of `name` (its record, then its chunk): the next extraction redoes it."""
        self.loc.delete(self.record_key(name, shard))
        if name in self.arrays:
            self.loc.delete(self.chunk_key(name, shard))

    def statuses(self, name: str) -> list[str | None]:
        """Per sample: "ok", "error: ...", or None where the shard was never completed."""
        known = self._statuses_of(name, self.done_shards(name))
        return [known.get(i) for i in range(self.n_samples)]

    def _statuses_of(self, name: str, shards: set[int]) -> dict[int, str]:
        """{sample index: status} for the samples of `shards` that have a record."""
        out: dict[int, str] = {}
        for shard in shards:
            rec = self.checked_record(name, shard)
            if rec is not None:
                out.update(zip(range(rec.start, rec.stop), rec.status))
        return out

    def values(self, name: str, rows=None) -> list:
        """Per-sample values kept in records (captions); None where not computed. With `rows`, those
        samples' values, and a VermouthError naming the shard if one of them was never computed."""
        out: list = [None] * self.n_samples
        done = self.done_shards(name)
        for shard in done:
            rec = self.checked_record(name, shard)
            if rec is not None and rec.values is not None:
                out[rec.start:rec.stop] = rec.values
        if rows is None:
            return out
        rows = [int(i) for i in rows]
        missing = sorted({i // self.shard_size for i in rows if i // self.shard_size not in done})
        if missing:
            raise VermouthError(f"store entry {self.prefix} {name}: shard(s) {', '.join(map(str, missing))} were never "
                                "committed, so the values of samples served beside them are unknown; run extract "
                                "again (or `vermouth-cache repair`) to compute them")
        return [out[i] for i in rows]

    def read(self, name: str, indices: np.ndarray | list[int] | slice | None = None) -> np.ndarray:
        """Rows of array `name`, in the order asked. Refuses any requested sample whose shard is not
        committed or whose image failed, and any shard whose record, metadata or chunk bytes do not
        agree (`ShardDamage`, naming entry, array and shard): exactly the checks of `verify --deep`."""
        idx = np.arange(self.n_samples)[indices if indices is not None else slice(None)]
        spec = self.array_spec(name)
        shard_of = idx // self.shard_size
        records = {int(s): self.checked_record(name, int(s)) for s in np.unique(shard_of)}
        bad = [int(i) for i, s in zip(idx, shard_of)
               if records[int(s)] is None or records[int(s)].status[int(i) - int(s) * self.shard_size] != OK]
        if bad:
            i = bad[0]
            rec = records[i // self.shard_size]
            why = "was never computed" if rec is None else rec.status[i - i // self.shard_size * self.shard_size]
            raise VermouthError(
                f"store entry {self.prefix} array {name}: {len(bad)} requested sample(s) not available "
                f"(sample #{i} {why})"
            )
        dtype = np.dtype(_zarr_dtype(spec["dtype"])).newbyteorder("<")
        blocks = {}
        for s, rec in records.items():
            data = self.checked_chunk(name, s, rec)
            if isinstance(data, bytes):  # an object store's read: numpy needs a writable buffer to hand out
                data = bytearray(data)
            block = np.frombuffer(data, dtype=dtype, count=(len(data) - 4) // dtype.itemsize)  # then the CRC32C
            blocks[s] = block.reshape(self.shard_size, *spec["shape"])
        if len(blocks) == 1:  # the loader's case: rows of one shard, served from the chunk's own buffer
            (s, block), = blocks.items()
            return _from_storage(_rows(block, idx - s * self.shard_size), spec["dtype"])
        out = np.empty((len(idx), *spec["shape"]), dtype=dtype.newbyteorder("="))
        for s, block in blocks.items():
            at = np.flatnonzero(shard_of == s)
            if len(at) == at[-1] - at[0] + 1:
                out[at[0]:at[-1] + 1] = _rows(block, idx[at] - s * self.shard_size)
            else:
                out[at] = block[idx[at] - s * self.shard_size]
        return _from_storage(out, spec["dtype"])

    def size_bytes(self) -> int:
        return self.loc.du(f"{self.prefix}/arrays")

    # -- use, for gc ----------------------------------------------------------------------------
    def touch(self) -> None:
        """Note that the entry was used now (at most once an hour per process; not when read-only)."""
        now = time.time()
        if self.loc.read_only or now - self._touched < TOUCH_EVERY:
            return
        self._touched = now
        try:
            self.loc.write_json(f"{self.prefix}/used.json", {"last_used": now})
        except (VermouthError, OSError):
            pass  # a full disk (or a directory in its place) must not fail a read; gc then sees an older date

    def last_used(self) -> float:
        try:
            return float(self.loc.read_json(f"{self.prefix}/used.json")["last_used"])
        except (FileNotFoundError, KeyError, TypeError, ValueError, VermouthError):
            try:
                created = self.manifest.get("created_unix")
            except VermouthError:
                return 0.0  # damaged: as old as can be, so gc offers it
            return float(created) if created else 0.0


def _rows(block: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """block[rows]: a view when the rows are consecutive and ascending, else a gathered copy."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (len(rows) < 2 or np.all(np.diff(rows) == 1)):
        return block[rows[0]:rows[-1] + 1]
    return block[rows]


def _shape_dtype(spec: dict | None) -> dict | None:
    return None if spec is None else {"shape": spec["shape"], "dtype": spec["dtype"]}


def _refuse_unsafe(meta: dict, where: str) -> None:
    """Refuse arrays that could hold or decode to Python objects (pickles) before reading a byte."""
    dtype = meta.get("data_type")
    codecs = [c.get("name") if isinstance(c, dict) else c for c in meta.get("codecs", [])]
    if not isinstance(dtype, str) or dtype not in SAFE_DATA_TYPES:
        raise VermouthError(f"{where}: data type {dtype!r} is not a plain number type; vermouth-cache refuses "
                            "arrays that may hold Python objects")
    unsafe = [c for c in codecs if c not in SAFE_CODECS]
    if unsafe:
        raise VermouthError(f"{where}: codec(s) {', '.join(map(str, unsafe))} are not allowed (only "
                            f"{', '.join(sorted(SAFE_CODECS))}); vermouth-cache never decodes pickles")


class Store:
    """A directory or bucket prefix of keyed entries. `create=True` makes an empty store;
    `read_only=True` opens one for reading only (no claims, no use dates, no writes)."""

    def __init__(self, root: str | os.PathLike, *, create: bool = False, read_only: bool = False,
                 storage_options: dict | None = None):
        self.loc = open_location(root, read_only=read_only, storage_options=storage_options)
        self.root = self.loc.root if isinstance(self.loc, LocalLocation) else self.loc.url
        self.read_only = read_only
        try:
            info = self.loc.read_json(STORE_MARKER)
        except FileNotFoundError:
            info = None
        if info is None:
            if not create or read_only:
                raise VermouthError(f"{self.root} is not a vermouth-cache store (no {STORE_MARKER})")
            if not self.loc.list(""):
                self.loc.create_json(STORE_MARKER, {"schema_version": SCHEMA_VERSION,
                                                    "created_by": f"vermouth-cache {__version__}"})
            try:  # ours, or that of a writer creating the same store at the same moment (it writes the marker first)
                info = self.loc.read_json(STORE_MARKER)
            except FileNotFoundError:
                raise VermouthError(f"{self.root} exists, is not empty and is not a vermouth-cache store") from None
        version = parse(StoreMarker, info, f"{self.root}/{STORE_MARKER}").schema_version
        if version > SCHEMA_VERSION:
            raise VermouthError(
                f"store {self.root} was written by a newer vermouth-cache (schema {version} > "
                f"{SCHEMA_VERSION}): upgrade vermouth-cache to read it"
            )
        if version < SCHEMA_VERSION:
            raise VermouthError(
                f"store {self.root} was written by an older vermouth-cache (schema {version}), whose records do not "
                f"carry the digests every read of schema {SCHEMA_VERSION} checks: extract into a new store (vermouth-cache "
                "0.1.0 still reads this one)"
            )

    def __repr__(self) -> str:
        return f"Store({self.root!s})"

    # -- datasets -------------------------------------------------------------------------------
    def put_dataset(self, record: dict) -> str:
        """Store a dataset record (ids, labels, ...); its key hashes the whole record."""
        key = recipe_key(record)
        self.loc.create_json(f"datasets/{key}.json", record)  # the same key is the same record
        return key

    def dataset(self, key: str) -> dict:
        """The dataset record `key`, once checked: well formed and hashing to its key."""
        check_key(key, f"store {self.root}: dataset record reference")
        where = f"datasets/{key}.json"
        try:
            body = self.loc.read_json(where)
        except FileNotFoundError:
            raise VermouthError(f"store {self.root} has no dataset record {key}") from None
        check_dataset_record(body, where, key)
        return body

    # -- entries --------------------------------------------------------------------------------
    def entry(self, kind: str, recipe: dict, *, n_samples: int, shard_size: int, about: dict) -> Entry:
        """The entry for `recipe`, created if new. `about` holds readable facts outside the key."""
        if kind not in KINDS:
            raise ValueError(kind)
        key = recipe_key(recipe)
        entry = Entry(self.loc, kind, key)
        path = f"{entry.prefix}/manifest.json"
        if not self.loc.exists(path):
            self.loc.create_json(path, _manifest(kind, key, recipe, about, n_samples, shard_size))
        # ours, or the one another writer created first: either way it must be this recipe
        if canonical_json(entry.manifest["recipe"]) != canonical_json(recipe):
            raise VermouthError(f"store entry {kind}/{key}: stored recipe differs from the request (hash collision?)")
        return entry

    def entries(self, kind: str | None = None) -> list[Entry]:
        out = []
        for k in [kind] if kind else KINDS:
            for key in self.loc.list(k):
                if self.loc.exists(f"{k}/{key}/manifest.json"):
                    out.append(Entry(self.loc, k, key))
        return out

    def find(self, kind: str, key_prefix: str) -> Entry:
        if kind not in KINDS:
            raise VermouthError(f"store {self.root}: {str(kind)[:40]!r} is not an entry kind ({', '.join(KINDS)})")
        check_key(key_prefix, f"store {self.root}: {kind} entry reference")
        if key_prefix and self.loc.exists(f"{kind}/{key_prefix}/manifest.json"):  # a whole key: no scan
            return Entry(self.loc, kind, key_prefix)
        matches = [e for e in self.entries(kind) if e.key.startswith(key_prefix)]
        if not matches:
            raise VermouthError(f"store {self.root} has no {kind} entry with key {key_prefix!r}")
        if len(matches) > 1:
            raise VermouthError(f"key {key_prefix!r} matches {len(matches)} {kind} entries; give more digits")
        return matches[0]

    def remove(self, entry: Entry) -> None:
        """Delete an entry: its manifest first, so that no reader finds a half-deleted entry."""
        self.loc.delete(f"{entry.prefix}/manifest.json")
        self.loc.delete_prefix(entry.prefix)


def _manifest(kind: str, key: str, recipe: dict, about: dict, n_samples: int, shard_size: int) -> dict:
    import diffusers
    import torch
    import transformers

    return {
        "kind": kind,
        "key": key,
        "recipe": recipe,
        "about": about,
        "n_samples": n_samples,
        "shard_size": shard_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "created_unix": time.time(),
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
