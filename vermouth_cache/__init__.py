"""vermouth-cache: Stable Diffusion features for perception, computed once and cached in Zarr.

The packages, in the order data flows through them (ARCHITECTURE.md says what each may import):

    core      errors, hashes and recipe keys, atomic writes, logging and progress
    data      datasets (image folders, CoOp splits, manifests, segmentation layouts, SBIR trees)
              and the files bundled with the package
    models    frozen models by hub id or directory, backbones (SD 1.x, 2.x), U-net taps, noise
    methods   what a method (Vermouth) computes: latent, noise rule, conditioning, taps, merge
    extract   a request -> the shards a store lacks -> computed here or on dask -> committed
    store     Zarr entries keyed by recipe, checked reads, claims, verify, gc, listing, export
    train     heads trained from the store: loader, pyramid, heads, loop, metrics, tasks/
    sweep     grids of extract + train points from one cache, and their report
    cli       the `vermouth-cache` command, a thin layer over the packages above
"""

__version__ = "0.2.0"

SCHEMA_VERSION = 2  # bump when the store layout or a stored value's meaning changes (2: digests in records)

from vermouth_cache import moved as _moved  # noqa: E402  (old 0.1 module paths say where they went)

_moved.install()
