"""One store entry, `kind/key`: its manifest, its arrays, and each shard's write and checked read.

    entry = store.find("features", "3f2a")
    entry.ensure_array("mid_block", (1280, 4, 4), "float16")      # once, by any writer
    entry.write_shard("mid_block", 3, status, data)                # the chunk whole, then its record
    entry.read("mid_block", [12, 13])                              # every check of `verify --deep`
    entry.values("captions", rows)                                 # values kept in records

A shard is `shard_size` consecutive samples (sorted by id); each shard of each array is written
whole by one writer, as one chunk object written atomically, then its record (`records`), which
is the commit. A chunk without a record is not data: reads refuse it, and extraction recomputes
it. Every read checks, for the shards it touches, what `verify --deep` checks: the record parses,
is sealed and covers the shard; it was written under this manifest and this array metadata; the
chunk exists, has the record's size, and its bytes have the record's CRC32C (so a chunk swapped
for another well-formed one is refused). The chunk is then decoded from those very bytes
(`arrays.decode_chunk`). Nothing is a pickle: JSON, and Zarr arrays of plain numbers whose codecs
are checked before any byte is decoded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import zarr

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.codecs import codec_named
from vermouth_cache.store.arrays import (check_meta, chunk_checksum, chunk_nbytes, create_array, decode_chunk, gather,
                                         nan_fill, refuse_unsafe, to_storage)
from vermouth_cache.store.files import ArrayMeta, check_manifest, digest, parse
from vermouth_cache.store.local import LocalLocation
from vermouth_cache.store.location import Location, space_error
from vermouth_cache.store.records import OK, ShardDamage, ShardRecord, chunk_damage, parse_record, record_damage

TOUCH_EVERY = 3600.0  # seconds between two `used.json` updates of one entry by one process


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
        specs = self._specs  # one read: the extractor's writer thread may reset it meanwhile
        if specs is None:
            specs, self._broken = self._read_specs()
            self._specs = specs
        return specs

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
                # no metadata yet: an array another writer is creating (zarr writes zarr.json to a
                # temporary name first), or an empty folder; it is damage only once records commit
                # chunks of it (the loop below)
                continue
            refuse_unsafe(body, f"{self.prefix}/arrays/{name}")
            try:  # the recipe is checked against the key, so its dtype is the one asked
                spec = check_meta(parse(ArrayMeta, body, where), self.n_samples, self.shard_size,
                                  self.manifest["recipe"].get("dtype"))
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

    def _zarr_store(self):
        if self._zstore is None:
            self._zstore = self.loc.zarr_store(f"{self.prefix}/arrays")
        return self._zstore

    def ensure_array(self, name: str, sample_shape: tuple[int, ...], dtype: str, codec: str = "raw") -> None:
        """Create array `name` (N, *sample_shape) once; later calls, by any writer, must agree."""
        spec = {"shape": list(sample_shape), "dtype": dtype, "codec": codec}
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
            create_array(self._zarr_store(), name, self.n_samples, self.shard_size, sample_shape, dtype, codec)
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
        return chunk_nbytes(self.array_spec(name), self.shard_size)

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
        return parse_record(body, where)

    def checked_record(self, name: str, shard: int) -> ShardRecord | None:
        """The record, if it belongs to this shard, this manifest and (for arrays) this metadata; else ShardDamage."""
        try:
            rec = self.record(name, shard)
        except VermouthError as exc:
            raise ShardDamage(self.prefix, name, shard, f"unreadable record ({exc})") from None
        if rec is None:
            return None
        damage = record_damage(rec, shard, *self.shard_bounds(shard), self.manifest_digest,
                               lambda: self.array_spec(name)["meta"], array=name)
        if damage:
            raise ShardDamage(self.prefix, name, shard, damage)
        return rec

    def checked_chunk(self, name: str, shard: int, rec: ShardRecord, *, read: bool = True,
                      into: Callable[[int], object] | None = None) -> bytes | memoryview | None:
        """The chunk's bytes, if they are exactly those `rec` committed (size, CRC32C); else ShardDamage.
        `read=False` checks only the size (no bytes are read); `into(n)` gives a writable buffer of
        the n bytes the chunk must have, to read it into (`Location.read_into`)."""
        key = self.chunk_key(name, shard)
        expected = self.chunk_nbytes(name)
        if expected is None:  # a compressed array: each chunk has the size its record committed
            expected = int(rec.chunk["nbytes"])
        if not read:
            size = self.loc.size(key)
            data = None
        else:
            try:  # never more than one byte past the size it must have: a huge file is not loaded
                data = (self.loc.read_bytes(key, limit=expected) if into is None
                        else self.loc.read_into(key, into(expected)))
            except FileNotFoundError:
                data = None
            except VermouthError as exc:
                raise ShardDamage(self.prefix, name, shard, f"chunk is corrupt: {exc}") from None
            size = None if data is None else len(data)
        damage = chunk_damage(rec, size, expected, data)
        if damage:
            raise ShardDamage(self.prefix, name, shard, damage)
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
            codec = codec_named(spec["codec"])
            # a lossy codec quantizes the float32 values themselves, not their fp16 rounding
            stored = np.asarray(data, dtype=np.float32) if codec.lossy else to_storage(data, spec["stored"])
            if codec.lossy:  # one inf would turn its whole channel into NaN: refused, not stored as ok
                bad = [i for i, st in enumerate(status) if st == OK and not np.isfinite(stored[i]).all()]
                if bad:
                    raise VermouthError(f"store entry {self.prefix} array {name} shard {shard}: sample #{start + bad[0]} "
                                        f"has non-finite values, which --codec {spec['codec']} cannot store; "
                                        "extract it with --codec raw or zstd")
            padded = np.full((self.shard_size, *stored.shape[1:]), nan_fill(spec["stored"]) if not codec.lossy
                             else np.nan, dtype=stored.dtype)
            padded[: stop - start] = stored
            encoded = None if spec["codec"] == "raw" else codec.encode(padded)
            chunk = {**(chunk_checksum(padded) if encoded is None else
                        {"nbytes": len(encoded), "crc32c": int.from_bytes(encoded[-4:], "little")}),
                     "meta": spec["meta"], "array": name}
            if before_commit:
                before_commit()
            try:
                if encoded is None:
                    self._array(name)[start:stop] = stored
                else:  # the chunk object as Zarr would write it (bytes [+ blosc] + crc32c), written whole
                    self.loc.write_bytes(self.chunk_key(name, shard), encoded)
            except OSError as exc:  # e.g. ENOSPC from zarr's own atomic write
                raise space_error(exc, self.chunk_key(name, shard)) from None
        rec = ShardRecord(shard, start, stop, list(status), values, run, chunk, self.manifest_digest)
        if before_commit:
            before_commit()
        self.loc.write_json(self.record_key(name, shard), rec.sealed())

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
        records = {int(s): self.checked_record(name, int(s)) for s in np.unique(idx // self.shard_size)}
        self._refuse_unavailable(name, idx, records)
        blocks = {s: decode_chunk(self.checked_chunk(name, s, rec), spec, self.shard_size) for s, rec in records.items()}
        return gather(blocks, idx, self.shard_size, spec)

    def read_block(self, name: str, shard: int, rows: np.ndarray, *,
                   into: Callable[[int], object] | None = None) -> np.ndarray:
        """Shard `shard`'s whole chunk of `name`, decoded: its (shard_size, *shape) block of stored
        values (bfloat16 as its uint16 bits, a lossy codec's as float32), after every check `read`
        makes to serve rows `rows` (entry rows of this shard). `into(n)` gives a writable buffer of
        n bytes to read the chunk into; a raw chunk's block is then a view of that buffer, so a
        reader of many chunks (the training loader) reuses its memory."""
        rec = self.checked_record(name, shard)
        self._refuse_unavailable(name, np.asarray(rows), {shard: rec})
        return decode_chunk(self.checked_chunk(name, shard, rec, into=into), self.array_spec(name), self.shard_size)

    def _refuse_unavailable(self, name: str, idx: np.ndarray, records: dict[int, ShardRecord | None]) -> None:
        """A VermouthError if a sample of `idx` is in a shard never committed or failed."""
        shard_of = idx // self.shard_size
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


def _shape_dtype(spec: dict | None) -> dict | None:
    return None if spec is None else {"shape": spec["shape"], "dtype": spec["stored"], "codec": spec["codec"]}
