"""The store: Zarr v3 arrays keyed by recipe on a local disk or an object store, per-shard
records checked on every read, claims for concurrent writers, verify, gc, listing and export.
It imports only `core`: it knows entries, arrays and records, never models or recipes' meaning.

From the bytes up:
    location        the `Location` interface every storage backend implements (add a backend here)
    local, remote   a directory (NFS too) and an object store through fsspec; remote_errors
    files           the shape of every JSON file a store holds, checked on each read
    arrays, records how an array sits in Zarr; a shard's record and the checks tying it to its chunk
    entry, entries  one keyed entry (writes, checked reads); the `Store` of them and its layout
    claims          at most one live writer per shard
    check, gc       verify (repair is extraction: vermouth_cache.extract.repair); removal
    listing, export, lazy   `ls`, HDF5 export, any tap as a dask array
"""

from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry

__all__ = ["Entry", "Store"]
