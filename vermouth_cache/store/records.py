"""Shard records: the commit of one shard of one array, and the checks that tie it to its chunk.

    <kind>/<key>/shards/<array>/<shard:06d>.json
    {"shard", "start", "stop", "status": ["ok" | "error: <why>", ...], "values": [...] (captions),
     "run": {device, precision, seconds}, "chunk": {"nbytes", "crc32c", "meta"}, "manifest", "seal"}

A shard's chunk is written whole first, then its record: the record is the commit, and a chunk
without one is not data. The record names what it commits: the chunk's size and CRC32C, the
sha256 of the array's zarr.json (`meta`) and of the entry's manifest it was written under, and a
`seal`, the sha256 of every other field, so an edited status or caption is refused. Every read
checks a record (`record_damage`) and the chunk it serves (`chunk_damage`) exactly as
`verify --deep` does; what disagrees is a `ShardDamage` naming entry, array and shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import google_crc32c
import numpy as np

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.files import Record, digest, parse

OK = "ok"


class ShardDamage(VermouthError):
    """A committed shard that cannot be served: its record, chunk or metadata do not agree."""

    def __init__(self, entry: str, array: str, shard: int, reason: str):
        super().__init__(f"store entry {entry} array {array} shard {shard}: {reason}; `vermouth-cache verify --deep` "
                         "names every damaged shard, `vermouth-cache repair` recomputes them")
        self.entry, self.array, self.shard, self.reason = entry, array, shard, reason

    def __reduce__(self):  # rebuilt from its four fields, so a DataLoader worker re-raises it as itself
        return type(self), (self.entry, self.array, self.shard, self.reason)


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

    def sealed(self) -> dict:
        """The record as written: its fields and their seal."""
        body = self.to_json()
        return {**body, "seal": digest(body)}


def parse_record(body: object, where: str) -> ShardRecord:
    """A record file's JSON, shape-checked, whose seal matches its fields; else one-line VermouthError."""
    rec = parse(Record, body, where).model_dump()
    if rec.pop("seal") != digest({k: v for k, v in body.items() if k != "seal"}):
        raise VermouthError(f"shard record {where} was edited after it was written (its seal does not match)")
    return ShardRecord(**rec)


def record_damage(rec: ShardRecord, shard: int, start: int, stop: int, manifest_digest: str,
                  meta_digest: Callable[[], str], array: str | None = None) -> str | None:
    """Why `rec` cannot commit samples start..stop of `shard` in an entry whose manifest has
    `manifest_digest`; None if it can. `meta_digest()`, the sha256 of the array's zarr.json (which
    raises if the array cannot be read), is asked only of a record that commits a chunk."""
    if (rec.shard, rec.start, rec.stop) != (shard, start, stop) or len(rec.status) != stop - start:
        return (f"record covers samples {rec.start}-{rec.stop} with {len(rec.status)} statuses, the shard is "
                f"{start}-{stop}")
    if rec.values is not None and len(rec.values) != stop - start:
        return f"record holds {len(rec.values)} values for {stop - start} samples"
    if rec.manifest != manifest_digest:
        return "the manifest was changed after this shard was written"
    if rec.chunk is None and any(st == OK for st in rec.status) and rec.values is None:
        return "record commits no chunk although samples are ok"
    if rec.chunk is not None and array is not None and rec.chunk.get("array") not in (None, array):
        return f"record and chunk were written for array {rec.chunk['array']} (moved or swapped)"
    if rec.chunk is not None and rec.chunk["meta"] != meta_digest():
        return "the array's metadata (zarr.json) was changed after this shard was written"
    return None


def chunk_damage(rec: ShardRecord, size: int | None, expected: int, data=None) -> str | None:
    """Why a chunk of `size` bytes (None: missing) is not the one `rec` committed, when every chunk
    of its array has `expected` bytes; with its bytes `data`, their CRC32C is checked too."""
    if size is None:
        return "chunk missing although its record says it was committed"
    if size != expected or size != rec.chunk["nbytes"]:
        return f"chunk is corrupt: {size} bytes, expected {expected} (truncated or overwritten)"
    if data is not None:
        crc = google_crc32c.value(np.frombuffer(data, np.uint8)[:-4])  # a numpy view: no copy, any buffer
        if crc != int.from_bytes(data[-4:], "little"):
            return "checksum mismatch: the chunk's bytes are corrupt"
        if crc != rec.chunk["crc32c"]:
            return "the chunk is well formed but not the one its record committed (swapped or overwritten)"
    return None
