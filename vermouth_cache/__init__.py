"""vermouth-cache: Stable Diffusion features for perception, computed once and cached in Zarr.

Data flow, one module each: datasets -> models -> extract -> store -> train.
"""

__version__ = "0.1.0"

SCHEMA_VERSION = 2  # bump when the store layout or a stored value's meaning changes (2: digests in records)
