"""The feature store: Zarr v3 arrays keyed by recipe, with completeness tracked per shard.

    store = Store("/cache/vermouth", create=True)    # or "s3://bucket/cache"; read_only=True to only read
    entry = store.entry("features", recipe, n_samples=n, shard_size=64, about={...})   # made if new
    store.find("features", "3f2a")                   # by key prefix; store.entries("features"): all

Layout (on a local or shared directory, or under an object-store URL, see `location`):

    vermouth-store.json                     schema version (a newer one is refused)
    datasets/<dataset-key>.json             sample ids, labels, class names, image sha256s
    <kind>/<key>/manifest.json              recipe (what the key hashes), readable facts, versions
    <kind>/<key>/arrays/<name>/...          Zarr v3 array (N, ...) chunked one shard per chunk (`arrays`)
    <kind>/<key>/shards/<name>/<i>.json     shard i of array <name> is complete: per-sample status,
                                            the chunk's size and CRC32C, device, seconds (`records`)
    <kind>/<key>/claims/<i>.<gen>.json      a writer is computing shard i (see `claims`)
    <kind>/<key>/used.json                  when the entry was last extracted into or read (gc)

kinds: captions, text, latents, features, expert, masks, classtext. What one entry holds and how
each read is checked is `entry.Entry`. Every JSON file read is validated (`files`). Every file is
created or replaced atomically, and manifests, array metadata and dataset records are created only
if absent, so several writers may share a store (see `claims`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import zarr

from vermouth_cache import SCHEMA_VERSION, __version__
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import canonical_json, recipe_key
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.files import StoreMarker, check_dataset_record, check_key, parse
from vermouth_cache.store.local import LocalLocation
from vermouth_cache.store.location import Location
from vermouth_cache.store.remote import FsspecLocation

KINDS = ("captions", "text", "latents", "features", "expert", "masks", "depths", "refmasks", "classtext")
STORE_MARKER = "vermouth-store.json"


def refuse_inside_store(path: str | os.PathLike, what: str) -> None:
    """Refuse to write `what` at `path` when a local store holds it: the store's own files would be
    replaced (an export over a manifest) or read as damage (a run directory among its entries)."""
    if is_url(str(path)):
        return
    p = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    for d in (p, *p.parents):
        if (d / STORE_MARKER).is_file():
            raise VermouthError(f"{what} {path} lies inside the store {d}: write it elsewhere")


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def open_location(path: str | os.PathLike, *, read_only: bool = False,
                  storage_options: dict | None = None) -> Location:
    """A local path (or file:// URL) or an fsspec URL such as s3://bucket/prefix; a new storage
    backend adds its scheme here (see `location`)."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_url(text):
        return FsspecLocation(text, read_only=read_only, storage_options=storage_options)
    return LocalLocation(Path(text), read_only=read_only)


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
    # their versions only, when an entry is made: importing them takes seconds `ls` or `verify` need not spend
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
