"""decode_image, resize_center_crop and to_model_tensor."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vermouth_cache.data import images
from vermouth_cache.core.errors import ImageError, VermouthError
from vermouth_cache.data.images import decode_image, resize_center_crop, to_model_tensor


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VERMOUTH_CACHE_HOME", str(tmp_path / "cache-home"))


def noise(h, w, c=3, seed=0):
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode_error(path, sid="s/1") -> ImageError:
    with pytest.raises(ImageError) as exc:
        decode_image(path, sid)
    assert exc.value.sample_id == sid and sid in str(exc.value)
    assert isinstance(exc.value, VermouthError)
    return exc.value


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_images_raise(tmp_path, fmt, ext):
    data = encoded(Image.fromarray(noise(64, 64)), fmt)
    path = tmp_path / f"t.{ext}"
    path.write_bytes(data[: len(data) // 2])
    err = decode_error(path)
    assert "truncated" in err.reason
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_empty_and_non_image_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty" in decode_error(empty).reason
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"this is a text file, not a JPEG\n" * 10)
    assert "not a decodable image" in decode_error(fake).reason
    assert "not found" in decode_error(tmp_path / "missing.png").reason


def test_wrong_extension_but_valid_image_decodes(tmp_path):
    path = tmp_path / "really_png.jpg"
    arr = noise(5, 7)
    path.write_bytes(encoded(Image.fromarray(arr), "PNG"))
    img = decode_image(path, "x")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)


def test_rgb_png_roundtrip(tmp_path):
    arr = noise(9, 11)
    path = tmp_path / "a.png"
    path.write_bytes(encoded(Image.fromarray(arr), "PNG"))
    img = decode_image(path, "a")
    assert img.mode == "RGB" and img.size == (11, 9)
    assert np.array_equal(np.asarray(img), arr)


def test_cmyk_jpeg_decodes_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    path.write_bytes(encoded(Image.new("CMYK", (16, 12), (0, 255, 255, 0)), "JPEG", quality=95))
    img = decode_image(path, "c")
    assert img.mode == "RGB" and img.size == (16, 12)
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full: red


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    path.write_bytes(encoded(Image.fromarray(arr), "PNG"))
    assert Image.open(path).mode.startswith("I")
    img = decode_image(path, "g")
    out = np.asarray(img)
    assert img.mode == "RGB" and out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 1, 255, 128]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_rgba_composited_over_white(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black -> white
    rgba[0, 1] = (10, 20, 30, 255)  # opaque -> unchanged
    rgba[0, 2] = (0, 0, 0, 128)  # half transparent black -> mid grey
    path = tmp_path / "a.png"
    path.write_bytes(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    out = np.asarray(decode_image(path, "a"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 20, 30]
    assert all(120 <= v <= 135 for v in out[0, 2])


def test_grayscale_palette_and_la(tmp_path):
    gray = tmp_path / "l.png"
    gray.write_bytes(encoded(Image.fromarray(noise(4, 4, c=1)), "PNG"))
    assert decode_image(gray, "l").mode == "RGB"
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p = tmp_path / "p.png"
    p.write_bytes(encoded(pal, "PNG", transparency=0))
    assert np.asarray(decode_image(p, "p"))[0, 0].tolist() == [200, 10, 10]
    p.write_bytes(encoded(pal, "PNG", transparency=1))
    assert np.asarray(decode_image(p, "p"))[0, 0].tolist() == [255, 255, 255]
    la = tmp_path / "la.png"
    la.write_bytes(encoded(Image.new("LA", (3, 3), (0, 0)), "PNG"))
    assert np.asarray(decode_image(la, "la"))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rot.jpg"
    path.write_bytes(encoded(Image.fromarray(noise(10, 20)), "JPEG", exif=exif))
    assert decode_image(path, "r").size == (10, 20)


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = tmp_path / "big.png"
    path.write_bytes(encoded(Image.fromarray(noise(20, 20)), "PNG"))
    assert "too large" in decode_error(path).reason


def test_resize_center_crop_matches_reference():
    img = Image.fromarray(noise(200, 300))
    out = resize_center_crop(img, 128)
    assert out.size == (128, 128)
    ref = img.resize((192, 128), Image.Resampling.BICUBIC, reducing_gap=None)
    ref = ref.crop((32, 0, 160, 128))  # left = (192 - 128) // 2
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    tall = resize_center_crop(Image.fromarray(noise(301, 100)), 64)
    assert tall.size == (64, 64)


def test_exact_size_passes_unchanged():
    img = Image.fromarray(noise(128, 128))
    out = resize_center_crop(img, 128)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_to_model_tensor_range_and_formula():
    arr = noise(6, 5)
    arr[0, 0] = (0, 255, 128)
    t = to_model_tensor(Image.fromarray(arr))
    assert t.shape == (3, 6, 5) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    assert t[:, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(128 / 127.5 - 1.0, abs=1e-6)]
    ref = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    assert torch.equal(t, ref)
    with pytest.raises(ValueError):
        to_model_tensor(Image.new("L", (2, 2)))
