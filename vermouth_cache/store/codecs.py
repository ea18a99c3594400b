"""How an array's chunks are encoded (`extract --codec`); every chunk ends in its CRC32C.

    raw    the little-endian values, then CRC32C: Zarr's bytes + crc32c (the default)
    zstd   the values through Blosc's zstd with byte shuffle, then CRC32C: lossless, 2-4x smaller on
           fp16 features; Zarr's bytes + blosc + crc32c, so any Zarr v3 reader decodes it
    int8   lossy: per sample and channel, q = round((x - offset) / scale) in [-127, 127] with
           offset = (max + min) / 2, scale = (max - min) / 254; decoded q * scale + offset (float32)
    fp8    lossy: the same affine per sample and channel, the scaled values (within +-448) as
           float8 e4m3 (torch's float8_e4m3fn), decoded likewise

A lossy chunk packs each sample as [values, 1 byte each][scale: C float32][offset: C float32], C
the sample's first axis (its channels; 1 for a 1-D sample), and Zarr sees an (N, packed bytes)
uint8 array whose attributes give the sample shape. A sample that was not computed (NaN rows)
keeps NaN scales, so it decodes to NaN, never to numbers. Encoding is numpy (and torch's
float8 cast, round to nearest even), so the same values give the same bytes on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c
import numpy as np

from vermouth_cache.core.errors import VermouthError

CODEC_NAMES = ("raw", "zstd", "int8", "fp8")
ZSTD_LEVEL = 3  # Blosc zstd level: level 3 compresses fp16 features as well as 9 within 2% in a tenth of the time
FP8_MAX = 448.0  # largest finite float8 e4m3fn


@dataclass(frozen=True)
class Codec:
    name: str
    lossy: bool = False  # values decode to float32 approximations, packed with their scales

    # -- the Zarr view of an array ----------------------------------------------------------
    def zarr_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The per-sample shape Zarr sees: the sample's, or its packed bytes."""
        if not self.lossy:
            return tuple(sample_shape)
        return (int(np.prod(sample_shape, dtype=np.int64)) + 8 * channels(sample_shape),)

    def zarr_dtype(self, stored: str) -> str:
        return "uint8" if self.lossy else stored

    def meta_codecs(self, zarr_dtype: str) -> list[dict]:
        """The codec list of the array's zarr.json, exactly as Zarr writes it."""
        one_byte = np.dtype(zarr_dtype).itemsize == 1  # Zarr writes no endianness for single bytes
        out = [{"name": "bytes"} if one_byte else {"name": "bytes", "configuration": {"endian": "little"}}]
        if self.name == "zstd":
            out.append({"name": "blosc", "configuration": {"typesize": np.dtype(zarr_dtype).itemsize, "cname": "zstd",
                                                            "clevel": ZSTD_LEVEL, "shuffle": "shuffle", "blocksize": 0}})
        return out + [{"name": "crc32c"}]

    def zarr_compressors(self, zarr_dtype: str) -> list:
        from zarr.codecs import BloscCodec, Crc32cCodec

        out = [BloscCodec(cname="zstd", clevel=ZSTD_LEVEL, shuffle="shuffle",
                          typesize=np.dtype(zarr_dtype).itemsize)] if self.name == "zstd" else []
        return out + [Crc32cCodec()]

    @property
    def fixed_size(self) -> bool:
        """Every chunk object has the same size (all but zstd's)."""
        return self.name != "zstd"

    # -- chunks -----------------------------------------------------------------------------
    def encode(self, block: np.ndarray) -> bytes:
        """The chunk object of a whole (shard_size, *shape) block of stored values (float32 for a
        lossy codec): its payload, then the payload's CRC32C in 4 little-endian bytes."""
        if self.lossy:
            payload = quantize(block, self.name).tobytes()
        else:
            le = np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<"))
            payload = le.tobytes() if self.name == "raw" else bytes(_blosc().encode(le))  # typesize: the itemsize
        return payload + google_crc32c.value(payload).to_bytes(4, "little")

    def decode(self, data, spec: dict, shard_size: int) -> np.ndarray:
        """A checked chunk object as its (shard_size, *shape) block of stored values (lossy: float32)."""
        payload = memoryview(data)[:-4]
        if self.lossy:
            packed = np.frombuffer(payload, dtype=np.uint8).reshape(shard_size, -1)
            return dequantize(packed, tuple(spec["shape"]), self.name)
        dtype = np.dtype(zarr_dtype(spec["dtype"])).newbyteorder("<")
        if self.name == "zstd":
            payload = bytearray(_blosc().decode(bytes(payload)))
        elif isinstance(data, bytes):  # an object store's read: numpy needs a writable buffer to hand out
            payload = bytearray(payload)
        block = np.frombuffer(payload, dtype=dtype, count=len(payload) // dtype.itemsize)
        expected = shard_size * int(np.prod(spec["shape"], dtype=np.int64))
        if block.size != expected:
            raise VermouthError(f"chunk decodes to {block.size} values, expected {expected}")
        return block.reshape(shard_size, *spec["shape"])


CODECS = {c.name: c for c in (Codec("raw"), Codec("zstd"), Codec("int8", lossy=True), Codec("fp8", lossy=True))}


def zarr_dtype(dtype: str) -> str:
    """The Zarr data type that holds `dtype` (bfloat16: its bits as uint16)."""
    return "uint16" if dtype == "bfloat16" else dtype


def codec_named(name: str) -> Codec:
    if name not in CODECS:
        raise VermouthError(f"unknown codec {name!r} (choose from {', '.join(CODECS)})")
    if name == "fp8":
        _fp8_dtype()
    return CODECS[name]


def channels(sample_shape) -> int:
    """Channels a lossy codec scales separately: the first axis of a map, one for a vector."""
    return int(sample_shape[0]) if len(sample_shape) >= 2 else 1


def _blosc():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=ZSTD_LEVEL, shuffle=Blosc.SHUFFLE, blocksize=0)


def _fp8_dtype():
    import torch

    if not hasattr(torch, "float8_e4m3fn"):
        raise VermouthError(f"--codec fp8 needs torch's float8_e4m3fn, which torch {torch.__version__} lacks")
    return torch.float8_e4m3fn


def quantize(block: np.ndarray, kind: str) -> np.ndarray:
    """(S, packed) uint8: each sample's values at one byte, then its scales and offsets."""
    s = block.shape[0]
    c = channels(block.shape[1:])
    x = np.ascontiguousarray(block, dtype=np.float32).reshape(s, c, -1)
    finite = np.isfinite(x).all(axis=2)  # a NaN row (a sample not computed) keeps NaN scales
    with np.errstate(invalid="ignore"):
        lo, hi = x.min(axis=2), x.max(axis=2)
    offset = ((hi + lo) / np.float32(2)).astype(np.float32)
    levels = np.float32(254.0 if kind == "int8" else 2 * FP8_MAX)
    scale = ((hi - lo) / levels).astype(np.float32)
    offset[~finite], scale[~finite] = np.nan, np.nan
    safe = np.where(finite & (scale > 0), scale, np.float32(1))[..., None]
    centred = np.where(finite[..., None], (x - np.where(finite, offset, 0)[..., None]) / safe, 0).astype(np.float32)
    if kind == "int8":
        q = np.clip(np.rint(centred), -127, 127).astype(np.int8).view(np.uint8)
    else:
        import torch

        t = torch.from_numpy(np.clip(centred, -FP8_MAX, FP8_MAX))
        q = t.to(_fp8_dtype()).view(torch.uint8).numpy()
    tail = np.concatenate([scale, offset], axis=1).astype("<f4").view(np.uint8)
    return np.concatenate([q.reshape(s, -1), tail], axis=1)


def dequantize(packed: np.ndarray, sample_shape: tuple[int, ...], kind: str) -> np.ndarray:
    """(S, *sample_shape) float32 from quantize's packing."""
    s = packed.shape[0]
    c = channels(sample_shape)
    n = int(np.prod(sample_shape, dtype=np.int64))
    if packed.shape[1] != n + 8 * c:
        raise VermouthError(f"packed sample of {packed.shape[1]} bytes, expected {n + 8 * c}")
    values = packed[:, :n]
    tail = np.ascontiguousarray(packed[:, n:]).view("<f4").reshape(s, 2, c)
    scale, offset = tail[:, 0, :, None], tail[:, 1, :, None]
    if kind == "int8":
        q = values.view(np.int8).astype(np.float32)
    else:
        import torch

        q = torch.from_numpy(np.ascontiguousarray(values)).view(_fp8_dtype()).float().numpy()
    out = q.reshape(s, c, -1) * scale + offset
    return out.reshape(s, *sample_shape).astype(np.float32, copy=False)
