"""Views: fixed crops (optionally mirrored) of an image, each cached as a sample of its own.

VPD's depth recipe feeds the U-net 480x480 crops of 480x640 NYU images, zero-padded (in the
model's [-1, 1] space, i.e. grey) to 512 at the top-left, and tests on two windows plus their
mirror images. A cache cannot hold a crop drawn anew every step, so it holds K drawn views per
image: each is a sample whose id names its box and flip (``scene/rgb_1.jpg@0,0,480,480,flip``),
so the dataset identity, which hashes the ids, keys every view.

    view = View((160, 0, 640, 480), flip=True)
    img = view.image(decoded)                           # PIL crop, then mirror
    x = padded_tensor(img, 512)                         # (3, 512, 512), zeros right and below
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.images import to_model_tensor

# what the latents recipe says of a dataset of views (instead of the shorter-side resize and crop)
GEOMETRIES = {
    "pad": "view box crop (in the sample id), optional mirror, zero-pad in [-1,1] right and below",
    "squash": "view box crop (in the sample id), optional mirror, bilinear resize to resolution x resolution "
              "(aspect not kept)",
    "slide": "bilinear resize of the shorter side to the view's `short`, then the view box crop (in the sample "
             "id) of that, zero-padded in [-1,1] right and below",
}
SLIDE_STRIDE = 341  # VPD's (mmseg) slide test: crop 512, stride 341


@dataclass(frozen=True)
class View:
    box: tuple[int, int, int, int]  # left, top, right, bottom in the image's pixels
    flip: bool = False  # mirrored left-right after the crop
    geometry: str = "pad"  # how the crop reaches the model's square input: GEOMETRIES
    short: int | None = None  # "slide": the shorter side the image is resized to before the crop

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    def suffix(self) -> str:
        return "@" + ",".join(map(str, self.box)) + (",flip" if self.flip else "") + (
            f",{self.geometry}{self.short or ''}" if self.geometry != "pad" else "")

    def image(self, img: Image.Image) -> Image.Image:
        if self.geometry == "slide":
            img = img.resize(scaled_size(*img.size, self.short), Image.Resampling.BILINEAR, reducing_gap=None)
        w, h = img.size
        left, top, right, bottom = self.box
        if not (0 <= left < right <= w and 0 <= top < bottom <= h):
            raise VermouthError(f"view box {self.box} lies outside the {w}x{h} image")
        out = img.crop(self.box)
        return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else out

    def array(self, a: np.ndarray) -> np.ndarray:
        """The same view of a per-pixel map (H, W) such as a depth map."""
        left, top, right, bottom = self.box
        out = a[top:bottom, left:right]
        return np.ascontiguousarray(out[:, ::-1] if self.flip else out)


def view_geometry(samples) -> str | None:
    """The one geometry of a dataset's views, None when it has none; a mix is refused."""
    kinds = {s.view.geometry if s.view is not None else None for s in samples}
    if len(kinds) > 1:
        raise VermouthError(f"a dataset mixes views of geometries {sorted(map(str, kinds))}")
    return next(iter(kinds), None)


def check_views_fit(samples, resolution: int) -> None:
    """Refuse, before anything is computed, padded views larger than the model's square input."""
    big = next((s for s in samples if s.view is not None and s.view.geometry == "pad"
                and max(s.view.size) > resolution), None)
    if big is not None:
        w, h = big.view.size
        raise VermouthError(f"a {w}x{h} view ({big.id}) does not fit in --resolution {resolution}")


def scaled_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(w, h) with the shorter side `short`, the aspect kept (rounded as mmcv rescales)."""
    s = short / min(width, height)
    return int(width * s + 0.5), int(height * s + 0.5)


def slide_views(width: int, height: int, short: int, crop: int, stride: int | None = None) -> list[View]:
    """mmseg's `slide` windows over the image resized to a shorter side of `short`: crops of `crop`
    every `stride` pixels (default 341/512 of the crop, VPD's), the last one flush with the far edge."""
    stride = stride or max(1, round(crop * SLIDE_STRIDE / 512))
    w, h = scaled_size(width, height, short)
    out = []
    for yi in range(max(h - crop + stride - 1, 0) // stride + 1):
        for xi in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(yi * stride + crop, h), min(xi * stride + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out.append(View((x1, y1, x2, y2), geometry="slide", short=short))
    return out


def view_tensor(img: Image.Image, resolution: int, geometry: str = "pad") -> torch.Tensor:
    """(3, r, r) in [-1, 1]: the view's pixels at the top-left, zeros (grey) right and below ("pad"),
    or resized to r x r, bilinear ("squash", VPD refer's torchvision Resize((512, 512)))."""
    if geometry == "squash":
        return to_model_tensor(img.resize((resolution, resolution), Image.Resampling.BILINEAR, reducing_gap=None))
    x = to_model_tensor(img)
    h, w = x.shape[-2:]
    if h > resolution or w > resolution:
        raise VermouthError(f"a {w}x{h} view does not fit in --resolution {resolution}")
    return F.pad(x, (0, resolution - w, 0, resolution - h))


def view_map(a: np.ndarray, resolution: int, geometry: str = "pad", value: float = 0.0) -> np.ndarray:
    """A view's per-pixel map placed like its image: padded (`value`: no ground truth), or resized
    to r x r by nearest neighbour ("squash": a label map)."""
    if geometry == "squash":
        return np.asarray(Image.fromarray(a).resize((resolution, resolution), Image.Resampling.NEAREST))
    h, w = a.shape
    out = np.full((resolution, resolution), value, dtype=a.dtype)
    out[:h, :w] = a
    return out


def windows(width: int, height: int, crop: int) -> list[tuple[int, int, int, int]]:
    """VPD's shift-window test: crops of `crop` at both ends of the long side (x=0 and x=W-crop on
    a 640-wide image with 480 crops: the two windows of `--shift_window_test`)."""
    cw, ch = min(crop, width), min(crop, height)
    xs = sorted({0, width - cw})
    ys = sorted({0, height - ch})
    return [(x, y, x + cw, y + ch) for y in ys for x in xs]


def drawn_views(sample_id: str, width: int, height: int, crop: int, k: int, seed: int) -> list[View]:
    """K training views of an image: seeded random crops of `crop` and a seeded mirror each (the
    drawn stand-in for VPD's per-step RandomCrop and HorizontalFlip)."""
    cw, ch = min(crop, width), min(crop, height)
    distinct = (width - cw + 1) * (height - ch + 1) * 2
    if k > distinct:
        raise VermouthError(f"--views {k}: a {width}x{height} image has only {distinct} distinct {cw}x{ch} views "
                            f"({sample_id})")
    out: list[View] = []
    for i in range(k):
        tries = 0
        while True:  # a view drawn twice would be cached and trained twice: draw again (the first try keeps its seed)
            tag = f"view{i}" + (f".{tries}" if tries else "")
            rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}:{tag}".encode()).digest()[:8],
                                               "little"))
            x, y = rng.randint(0, width - cw), rng.randint(0, height - ch)
            view = View((x, y, x + cw, y + ch), flip=rng.random() < 0.5)
            if view not in out:
                break
            tries += 1
        out.append(view)
    return out

