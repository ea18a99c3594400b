"""How an entry's arrays sit in Zarr: their metadata, their dtypes, and a chunk's bytes and checksum.

An array (N, *sample_shape) has one chunk per shard, encoded as its codec says (`codecs.py`: raw
little-endian bytes, Blosc zstd, or a lossy int8/fp8 packing) and always ending in its CRC32C (4
bytes appended): no object dtype, no storage transformer, no other codec. `create_array` writes
that metadata; `check_meta` refuses any other, so an array whose zarr.json was altered is never
decoded. bfloat16, which numpy lacks, is kept as its
raw uint16 bits (`to_storage`, `from_storage`). Float arrays are filled with NaN, so even a reader
bypassing the records never sees zeros for a missing chunk.

A chunk is read as bytes, checked against its record (`records`), then decoded here with numpy
(`decode_chunk`) from those very bytes, by the metadata just checked.
"""

from __future__ import annotations

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.store.codecs import codec_named, zarr_dtype
from vermouth_cache.store.files import ArrayMeta

STORAGE_DTYPES = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}
# what a store's arrays may hold and how they may be encoded: numbers only, never objects
SAFE_DATA_TYPES = {"float16", "float32", "float64", "uint8", "uint16", "uint32", "int8", "int16", "int32", "int64",
                   "bool"}
SAFE_CODECS = {"bytes", "blosc", "crc32c"}  # blosc: zstd with byte shuffle (`--codec zstd`)


def nan_fill(dtype: str):
    """The fill value of an array of `dtype`: NaN for floats (0x7FC0 is bfloat16's), else 0."""
    return 0x7FC0 if dtype == "bfloat16" else (np.nan if np.dtype(dtype).kind == "f" else 0)


def to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """`x` as the array of `dtype` stores it."""
    if dtype == "bfloat16":  # numpy has no bfloat16: keep the raw bits as uint16
        import torch  # only here: listing or verifying a store needs no torch

        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return np.asarray(x, dtype=dtype)


def from_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values of an array of `dtype` as numbers (bfloat16 as float32)."""
    if dtype == "bfloat16":
        import torch

        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).float().numpy()
    return x


def chunk_checksum(block: np.ndarray) -> dict:
    """Size and CRC32C of a chunk object as Zarr stores it: the C-order little-endian bytes of
    the whole chunk (an edge chunk padded with the fill value), then their CRC32C in 4 bytes."""
    raw = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).tobytes()
    return {"nbytes": len(raw) + 4, "crc32c": google_crc32c.value(raw)}


def chunk_nbytes(spec: dict, shard_size: int) -> int | None:
    """The size every chunk object of an array of `spec` has (an edge chunk is padded to the full
    shape); None for a compressed array, whose chunks each have the size their record gives."""
    codec = codec_named(spec.get("codec", "raw"))
    if not codec.fixed_size:
        return None
    shape = codec.zarr_shape(tuple(spec["shape"]))
    item = np.dtype(codec.zarr_dtype(zarr_dtype(spec["stored"]))).itemsize
    return shard_size * int(np.prod(shape, dtype=np.int64)) * item + 4


def create_array(zstore, name: str, n_samples: int, shard_size: int, sample_shape: tuple[int, ...], dtype: str,
                 codec: str = "raw") -> None:
    """Write the metadata of array `name` (n_samples, *sample_shape), one chunk per shard; an array
    another writer created first is left as it is (zarr.errors.ContainsArrayError)."""
    c = codec_named(codec)
    zdtype = c.zarr_dtype(zarr_dtype(dtype))
    shape = c.zarr_shape(tuple(sample_shape))
    attributes = {"vermouth_dtype": dtype}
    if codec != "raw":  # raw arrays' metadata is what 0.2 wrote
        attributes.update(vermouth_codec=codec, sample_shape=list(sample_shape))
    zarr.create_array(
        store=zstore, name=name, shape=(n_samples, *shape), chunks=(shard_size, *shape),
        dtype=zdtype, fill_value=0 if c.lossy else nan_fill(dtype), serializer=BytesCodec(),
        compressors=c.zarr_compressors(zdtype), attributes=attributes,
        overwrite=False,  # never: it would delete chunks another writer has committed
    )


def refuse_unsafe(meta: dict, where: str) -> None:
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


def check_meta(meta: ArrayMeta, n_samples: int, shard_size: int, recipe_dtype) -> dict:
    """The array's per-sample spec {"shape", "dtype"}, if its metadata is exactly what `create_array`
    writes for an entry of `n_samples` in shards of `shard_size` whose recipe asks `recipe_dtype`."""
    dtype = meta.attributes.get("vermouth_dtype", meta.data_type)
    name = meta.attributes.get("vermouth_codec", "raw")
    try:
        codec = codec_named(name if isinstance(name, str) else repr(name))
    except VermouthError as exc:
        raise VermouthError(f"its metadata was altered ({exc})") from None
    zarr_sample = list(meta.shape[1:])
    sample = list(meta.attributes.get("sample_shape", zarr_sample)) if name != "raw" else zarr_sample
    if not all(isinstance(n, int) and n > 0 for n in sample):
        raise VermouthError(f"its metadata was altered (sample_shape is {str(sample)[:80]})")
    zdtype = codec.zarr_dtype(zarr_dtype(dtype)) if isinstance(dtype, str) else None
    expected = {
        "shape[0]": (meta.shape[:1], [n_samples]),
        "shape[1:]": (zarr_sample, list(codec.zarr_shape(tuple(sample)))),
        "data_type": (meta.data_type, zdtype),
        "chunk_grid": (meta.chunk_grid, {"name": "regular", "configuration": {"chunk_shape": [shard_size, *zarr_sample]}}),
        "chunk_key_encoding": (meta.chunk_key_encoding, {"name": "default", "configuration": {"separator": "/"}}),
        "codecs": (meta.codecs, codec.meta_codecs(zdtype) if zdtype else None),
        "storage_transformers": (getattr(meta, "storage_transformers", None) or [], []),
    }
    if isinstance(recipe_dtype, str):
        expected["attributes.vermouth_dtype"] = (dtype, STORAGE_DTYPES.get(recipe_dtype, recipe_dtype))
    for what, (have, want) in expected.items():
        if have != want:
            raise VermouthError(f"its metadata was altered ({what} is {str(have)[:80]}, vermouth-cache wrote {want})")
    # dtype: what a read returns (a lossy codec's decoded float32); stored: what the chunks hold
    return {"shape": sample, "dtype": "float32" if codec.lossy else dtype, "stored": dtype, "codec": name}


def decode_chunk(data, spec: dict, shard_size: int) -> np.ndarray:
    """A checked chunk's bytes as its (shard_size, *shape) block (raw: a view of those bytes)."""
    try:
        return codec_named(spec.get("codec", "raw")).decode(data, spec, shard_size)
    except (ValueError, RuntimeError) as exc:  # a committed chunk that its codec cannot decode
        raise VermouthError(f"chunk cannot be decoded ({exc})") from None


def gather(blocks: dict[int, np.ndarray], idx: np.ndarray, shard_size: int, spec: dict) -> np.ndarray:
    """Rows `idx` (entry rows, in the order asked) from the decoded blocks of their shards, as numbers."""
    shard_of = idx // shard_size
    if len(blocks) == 1:  # the loader's case: rows of one shard, served from the chunk's own buffer
        (s, block), = blocks.items()
        return from_storage(take_rows(block, idx - s * shard_size), spec["dtype"])
    out = np.empty((len(idx), *spec["shape"]), dtype=np.dtype(zarr_dtype(spec["dtype"])))
    for s, block in blocks.items():
        at = np.flatnonzero(shard_of == s)
        if len(at) == at[-1] - at[0] + 1:
            out[at[0]:at[-1] + 1] = take_rows(block, idx[at] - s * shard_size)
        else:
            out[at] = block[idx[at] - s * shard_size]
    return from_storage(out, spec["dtype"])


def take_rows(block: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """block[rows]: a view when the rows are consecutive and ascending, else a gathered copy."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (len(rows) < 2 or np.all(np.diff(rows) == 1)):
        return block[rows[0]:rows[-1] + 1]
    return block[rows]
