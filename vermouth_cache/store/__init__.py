"""The store: Zarr v3 arrays keyed by recipe on a local disk or an object store, per-shard
records checked on every read, claims for concurrent writers, verify, gc, listing and export."""
