"""Image decoding and preprocessing: file bytes -> RGB PIL image -> model tensor in [-1, 1].

Every decoding problem becomes an `ImageError` carrying the sample id, so extraction can record
the bad sample and go on. Truncated files must fail rather than be padded with grey, which is
why `ImageFile.LOAD_TRUNCATED_IMAGES` is never set: a half-decoded image would be cached as if
it were the real one.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from vermouth_cache.core.errors import ImageError

MAX_PIXELS = 100_000_000  # decompression-bomb guard: larger images are refused, not decoded
# Longer side / shorter side above this is refused before decoding: resizing the shorter side to
# the resolution scales the longer one by the same factor, so a 1x400000 strip (a few hundred
# bytes as PNG, well under MAX_PIXELS) would otherwise become a ~20 GB resize buffer. 50:1 is far
# beyond any photograph or panorama a centre crop could use (the crop keeps 1/50 of it).
MAX_ASPECT = 50

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}


def decode_sample(sample) -> Image.Image:
    """decode_image of a sample: its file, or its member of a tar shard or saved HF dataset."""
    if sample.member is None:
        return decode_image(sample.path, sample.id)
    from vermouth_cache.data.members import member_bytes

    try:
        data = member_bytes(sample.path, sample.member)
    except (OSError, FileNotFoundError) as e:
        raise ImageError(sample.id, f"unreadable archive member: {e}") from None
    return decode_bytes(data, sample.id)


def decode_image(path: Path, sample_id: str) -> Image.Image:
    """Decode `path` to a fully loaded RGB image, EXIF orientation applied.

    Raises ImageError(sample_id, reason) for empty, truncated, unidentifiable, unreadable or
    oversized files, and for images more elongated than MAX_ASPECT:1.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ImageError(sample_id, f"file not found: {path}") from None
    except OSError as e:
        raise ImageError(sample_id, f"unreadable file: {e.strerror or e}") from None
    return decode_bytes(data, sample_id)


def decode_bytes(data: bytes, sample_id: str) -> Image.Image:
    """An image's bytes decoded as decode_image does (the same refusals)."""
    if not data:
        raise ImageError(sample_id, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # our own MAX_PIXELS check below refuses, with a status
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > MAX_PIXELS:  # checked before load(), i.e. before any pixel memory exists
            raise ImageError(sample_id, f"image too large: {w}x{h} exceeds {MAX_PIXELS} pixels")
        if max(w, h) > MAX_ASPECT * min(w, h):  # also before load(); covers a 0-pixel side
            raise ImageError(sample_id, f"image too elongated: {w}x{h} exceeds the aspect ratio "
                                        f"{MAX_ASPECT}:1")
        img.load()  # decodes everything now, so truncation raises here and not later
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(sample_id, "not a decodable image") from None
    except Image.DecompressionBombError:
        raise ImageError(sample_id, f"image too large (over {MAX_PIXELS} pixels)") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, ValueError, ... on bad data
        if isinstance(e, EOFError) or "truncated" in str(e).lower():
            raise ImageError(sample_id, "truncated image file") from None
        raise ImageError(sample_id, f"corrupt image data ({type(e).__name__}: {e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001
        pass  # unparsable EXIF metadata: the pixels are fine, keep the stored orientation
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as e:  # e.g. a mode PIL cannot convert to RGB
        raise ImageError(sample_id, f"unsupported image mode {img.mode}: {e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _SIXTEEN_BIT:
        # PIL's own convert("L") clips 16-bit values at 255, turning most of the range white.
        # Rescale instead: 65535 / 257 = 255 exactly, so the full 16-bit range maps onto 8 bits.
        arr = np.asarray(img).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in _ALPHA or "transparency" in img.info:
        # SD was trained on RGB images. Dropping alpha would expose whatever colour happens to
        # be stored under fully transparent pixels (often black or garbage), so composite over
        # white, the background such images are normally shown on.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P, F, ...


def resize_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` (bicubic), then centre-crop a square.

    The long side becomes round(long * resolution / short); the crop box starts at
    ((w - r) // 2, (h - r) // 2). An image already resolution x resolution is returned as is.
    """
    r = int(resolution)
    if r < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    w, h = img.size
    if (w, h) == (r, r):
        return img
    if w <= h:
        size = (r, round(h * r / w))
    else:
        size = (round(w * r / h), r)
    # reducing_gap=None: one exact bicubic pass, so results do not depend on a PIL speed-up.
    img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
    w, h = img.size
    left, top = (w - r) // 2, (h - r) // 2
    return img.crop((left, top, left + r, top + r))


def to_model_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1], computed as x / 127.5 - 1.0.

    This is the VAE input scaling SD uses (x / 255 * 2 - 1); tests use the same formula.
    """
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode}")
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    t = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).contiguous()
    return t / 127.5 - 1.0
