"""The shape of every JSON file a store holds, checked each time one is read.

A store file may have been cut short, edited by hand, swapped or written by a stranger: nothing
read from one is used before it passes these checks, and a failure is one `VermouthError` naming
the file, never a KeyError three calls later. Beyond shape, the files vouch for each other:

- a manifest's recipe must hash to the entry's key (an edited recipe is not served);
- a dataset record must hash to its own key (rotated ids or labels are not served);
- every shard record carries the sha256 of the manifest and of the array metadata (`zarr.json`)
  it was written under, and the size and CRC32C of its chunk, so an edit of either, or a chunk
  swapped for another well-formed one, is refused by every read (see `entry.Entry.read`, `records`);
- every shard record is sealed with the sha256 of its own fields, so a status edited from an
  error to "ok" (which would serve the NaN fill of a failed sample) is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json, recipe_key

KEY_LENGTH = 16  # hex digits of `hashing.recipe_key`
_KEY = re.compile(r"[0-9a-f]{1,64}")
NonNegInt = Annotated[StrictInt, Field(ge=0)]


def check_key(key: object, what: str) -> str:
    """A key or key prefix read from a file or typed by a user: hex digits only (never a path)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise VermouthError(f"{what}: {str(key)[:80]!r} is not an entry key (hex digits)")
    return key


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of a parsed file: formatting does not matter, content does."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def read_json(path: str | Path):
    """A local JSON file the caller trusts the shape of (a run's config.json, a sweep's point
    record); unparsable, it is one line naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise VermouthError(f"corrupt store file {path}: {exc}") from None


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreMarker(_File):
    schema_version: StrictInt
    created_by: StrictStr = ""


class Manifest(_File):
    kind: StrictStr
    key: StrictStr
    recipe: dict[str, Any]
    about: dict[str, Any]
    n_samples: NonNegInt
    shard_size: Annotated[StrictInt, Field(ge=1)]
    created: StrictStr
    created_unix: float
    versions: dict[str, StrictStr | StrictInt]


class ChunkFacts(_File):
    nbytes: NonNegInt
    crc32c: NonNegInt
    meta: StrictStr  # sha256 (`digest`) of the array's zarr.json when the chunk was written
    array: StrictStr | None = None  # the array it was written for (absent in 0.2 records): a record and chunk
    # moved under another array of the same metadata (down_blocks.3 <-> mid_block) are refused


class Record(_File):
    shard: NonNegInt
    start: NonNegInt
    stop: NonNegInt
    status: list[StrictStr]
    values: list[Any] | None = None
    run: dict[str, Any] | None = None
    chunk: ChunkFacts | None = None
    manifest: StrictStr  # sha256 (`digest`) of the entry's manifest when the record was written
    seal: StrictStr  # sha256 (`digest`) of every other field: an edited status or value is refused


class DatasetRecord(_File):
    name: StrictStr
    identity: StrictStr
    ids: list[StrictStr]
    labels: list[StrictInt | None]
    classnames: list[StrictStr]
    source: dict[str, Any]


class ArrayMeta(BaseModel):
    """The parts of a Zarr v3 array's zarr.json that decide how its bytes decode."""
    model_config = ConfigDict(extra="allow", frozen=True)
    zarr_format: Literal[3]
    node_type: Literal["array"]
    shape: list[NonNegInt]
    data_type: StrictStr
    chunk_grid: dict[str, Any]
    chunk_key_encoding: dict[str, Any]
    codecs: list[Any]
    attributes: dict[str, Any] = {}


def parse(model: type[BaseModel], obj: object, where: str):
    """`obj` (parsed JSON) as `model`, or one line naming the file and the first field that is wrong."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(map(str, err["loc"])) or "(whole file)"
        raise VermouthError(f"malformed store file {where}: {field}: {err['msg']} "
                            f"({exc.error_count()} problem(s); `vermouth-cache verify` lists the store's damage)") from None


def check_manifest(obj: object, where: str, kind: str, key: str) -> Manifest:
    m = parse(Manifest, obj, where)
    if m.kind != kind or m.key != key:
        raise VermouthError(f"store file {where} belongs to {m.kind}/{m.key}, not {kind}/{key} (moved or swapped)")
    if recipe_key(m.recipe, len(key)) != key:
        raise VermouthError(f"store entry {kind}/{key}: its manifest's recipe does not hash to the key (edited "
                            "after it was written); the entry is not served. Remove it with `vermouth-cache gc "
                            f"--entry {kind}/{key}` and extract again")
    return m


def check_dataset_record(obj: object, where: str, key: str) -> DatasetRecord:
    rec = parse(DatasetRecord, obj, where)
    if recipe_key(obj, len(key)) != key:
        raise VermouthError(f"dataset record {where} does not hash to its key {key} (its ids, labels or class names "
                            "were edited after it was written); it is not served")
    if len(rec.labels) != len(rec.ids):
        raise VermouthError(f"dataset record {where}: {len(rec.labels)} labels for {len(rec.ids)} ids")
    for sid in rec.ids:
        if sid.startswith("/") or ".." in sid.split("/"):
            raise VermouthError(f"dataset record {where}: sample id {sid[:80]!r} is not a relative path inside the dataset")
    return rec
