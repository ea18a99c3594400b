"""Tiny deterministic datasets for tests, the demo and benchmarks.

Every class has its own shape AND its own dominant colour, so even a random, untrained model can
tell the classes apart from colour statistics alone, and training on tiny models visibly learns.
Each image draws from its own seeded generator (seed, class, split, index), small jitter and
noise make all images different, and PNGs are written by PIL without metadata: the same
arguments give byte-identical files on every run.
"""

from __future__ import annotations

import colorsys
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vermouth_cache.core.errors import VermouthError

_COLOURS = (("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 70, 220)),
            ("yellow", (230, 210, 40)), ("magenta", (200, 50, 200)), ("cyan", (40, 200, 210)),
            ("orange", (240, 130, 30)), ("purple", (110, 40, 160)))
_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "bar", "star")


def colour(c: int) -> tuple[int, int, int]:
    """The class colour: 8 named ones, then hues spread by the golden ratio."""
    if c < len(_COLOURS):
        return _COLOURS[c][1]
    r, g, b = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.85, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def class_name(c: int, shape: bool = True) -> str:
    """"red_circle", "green_square", ... (or "red", "green" without the shape); then class_008."""
    if c < len(_COLOURS):
        return f"{_COLOURS[c][0]}_{_SHAPES[c]}" if shape else _COLOURS[c][0]
    return f"class_{c:03d}"


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _shape_points(kind: str, cx: float, cy: float, r: float, rot: float):
    def poly(n, radii):
        return [(cx + radii[i % len(radii)] * np.cos(rot + 2 * np.pi * i / n),
                 cy + radii[i % len(radii)] * np.sin(rot + 2 * np.pi * i / n)) for i in range(n)]
    if kind == "triangle":
        return poly(3, [r])
    if kind in ("square", "diamond"):
        return poly(4, [r * 1.15]) if kind == "diamond" else \
            [(cx - r * 0.85, cy - r * 0.85), (cx + r * 0.85, cy - r * 0.85),
             (cx + r * 0.85, cy + r * 0.85), (cx - r * 0.85, cy + r * 0.85)]
    if kind == "star":
        return poly(10, [r * 1.1, r * 0.5])
    if kind == "cross":
        a, b = r, r * 0.38
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    if kind == "bar":
        return [(cx - r * 1.1, cy - r * 0.4), (cx + r * 1.1, cy - r * 0.4),
                (cx + r * 1.1, cy + r * 0.4), (cx - r * 1.1, cy + r * 0.4)]
    return None  # circle, ring: ellipses


def _draw_shape(draw: ImageDraw.ImageDraw, c: int, size: int, rng, fill, outline=None,
                width: int = 1) -> None:
    kind = _SHAPES[c % len(_SHAPES)]
    r = size * rng.uniform(0.26, 0.34)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    pts = _shape_points(kind, cx, cy, r, rng.uniform(-0.3, 0.3))
    if pts is None:
        box = (cx - r, cy - r, cx + r, cy + r)
        if kind == "ring" and fill is not None:
            draw.ellipse(box, outline=fill, width=max(2, int(r * 0.45)))
        else:
            draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif fill is not None:
        draw.polygon(pts, fill=fill)
    else:
        draw.line(pts + pts[:1], fill=outline, width=width, joint="curve")


def _jitter(rgb, rng, amount: int = 18) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def _noise(img: Image.Image, rng, amount: int) -> Image.Image:
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.integers(-amount, amount + 1, arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _texture(size: int, rng, base: int = 200, spread: int = 40) -> Image.Image:
    """A grey blocky texture: coarse random values upsampled (nearest) to the image size."""
    cells = rng.integers(base - spread, base + spread + 1, (8, 8, 1)).repeat(3, axis=2)
    img = Image.fromarray(cells.astype(np.uint8))
    return img.resize((size, size), Image.Resampling.NEAREST)


def _tint(img: Image.Image, rgb, amount: float) -> Image.Image:
    """Blend `amount` of a flat colour into an image (the class colour then dominates)."""
    return Image.blend(img, Image.new("RGB", img.size, rgb), amount)


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")  # PIL writes no time or text chunks unless asked


def _prepare(out_dir, owned: tuple[str, ...], overwrite: bool) -> Path:
    out = Path(out_dir)
    existing = [n for n in owned if (out / n).exists()]
    if existing and not overwrite:
        raise VermouthError(f"{out}: already holds {', '.join(existing)} (pass overwrite=True)")
    for n in existing:
        shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _counts(n, what: str, minimum: int = 1):
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise VermouthError(f"{what} must be an integer >= {minimum}, got {n!r}")
    return n


def make_classification(out_dir, n_classes: int = 3, per_class=(8, 4, 4), size: int = 64,
                        seed: int = 0, overwrite: bool = False) -> Path:
    """images/<class>/<split>_<i>.png and a CoOp split file; returns the split file's path.

    A filled class shape in the class colour on a grey texture tinted with the same colour.

    per_class: images per class for (train, val, test), or one int for all three.
    """
    per = (per_class,) * 3 if isinstance(per_class, int) else tuple(per_class)
    if len(per) != 3:
        raise VermouthError(f"per_class must be an int or (train, val, test), got {per_class!r}")
    for n in per + (n_classes, size):
        _counts(n, "n_classes, per_class and size")
    out = _prepare(out_dir, ("images", "split_zhou_Synth.json"), overwrite)
    split = {}
    for s, (part, count) in enumerate(zip(("train", "val", "test"), per)):
        split[part] = []
        for c in range(n_classes):
            name = class_name(c)
            for i in range(count):
                rng = _rng(seed, c, s, i)
                img = _tint(_texture(size, rng, base=int(rng.integers(180, 230)), spread=15),
                            colour(c), 0.25)
                _draw_shape(ImageDraw.Draw(img), c, size, rng, fill=_jitter(colour(c), rng))
                rel = f"{name}/{part}_{i:03d}.png"
                _save(_noise(img, rng, 8), out / "images" / rel)
                split[part].append([rel, c, name.replace("_", " ")])
    path = out / "split_zhou_Synth.json"
    path.write_text(json.dumps(split, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def make_sbir(out_dir, n_classes: int = 6, photos_per_class: int = 6,
              sketches_per_class: int = 6, size: int = 64, seed: int = 0,
              overwrite: bool = False) -> Path:
    """root/photo/<class>/*.png, root/sketch/<class>/*.png and root/unseen.txt; returns root.

    Photos: filled shapes on a textured background; sketches: the class shape as a coloured
    outline on white. unseen.txt names half the classes (rounded down, chosen by the seed).
    """
    for n in (n_classes, photos_per_class, sketches_per_class, size):
        _counts(n, "n_classes, photos_per_class, sketches_per_class and size")
    _counts(n_classes, "n_classes", 2)
    out = _prepare(out_dir, ("photo", "sketch", "unseen.txt"), overwrite)
    for c in range(n_classes):
        name = class_name(c)
        for i in range(photos_per_class):
            rng = _rng(seed, c, 0, i)
            # a light background, as sketches have: the domain gap stays in texture and fill, and
            # colour carries the class in both domains, so tiny random models can retrieve across
            img = _texture(size, rng, base=int(rng.integers(215, 240)), spread=15)
            _draw_shape(ImageDraw.Draw(img), c, size, rng, fill=_jitter(colour(c), rng))
            _save(_noise(img, rng, 6), out / "photo" / name / f"{i:03d}.png")
        for i in range(sketches_per_class):
            rng = _rng(seed, c, 1, i)
            img = Image.new("RGB", (size, size), (255, 255, 255))
            width = max(1, size // 16 + int(rng.integers(0, 2)))
            pen = _jitter(colour(c), rng, 10)
            # a pale wash of the class colour inside the stroke (a coloured-pencil sketch), then the
            # stroke on top along the same geometry
            state = rng.bit_generator.state
            _draw_shape(ImageDraw.Draw(img), c, size, rng, fill=tuple((255 + v) // 2 for v in pen))
            rng.bit_generator.state = state
            _draw_shape(ImageDraw.Draw(img), c, size, rng, fill=None, outline=pen, width=width)
            _save(img, out / "sketch" / name / f"{i:03d}.png")
    unseen = sorted(class_name(int(c)) for c in
                    _rng(seed, 99).permutation(n_classes)[: n_classes // 2])
    (out / "unseen.txt").write_text("".join(n + "\n" for n in unseen), encoding="utf-8")
    return out


def _blob(size: int, rng) -> Image.Image:
    """An L image, 255 inside one random ellipse or polygon."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    rx, ry = rng.uniform(0.1, 0.22, 2) * size
    if rng.random() < 0.5:
        d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    else:
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, n))
        rad = rng.uniform(0.6, 1.0, n)
        d.polygon([(cx + rx * q * np.cos(a), cy + ry * q * np.sin(a)) for a, q in zip(ang, rad)],
                  fill=255)
    return m


def make_segmentation(out_dir, n_classes: int = 3, n_images: int = 8, size: int = 64,
                      seed: int = 0, splits=("train", "val"), overwrite: bool = False) -> Path:
    """Generic seg layout: images/<split>/<i>.png, masks/<split>/<i>.png, classnames.txt.

    n_images per split (splits=None or (): one flat images/ and masks/). Each image is a
    background class plus 1-2 blobs of other classes, every class in its own colour; masks are
    uint8 class indices with 255 (ignore) on the pixels where two classes meet. Returns root.
    """
    for n in (n_images, size):
        _counts(n, "n_images and size")
    _counts(n_classes, "n_classes", 2)
    if n_classes > 255:
        raise VermouthError(f"n_classes must be <= 255 (uint8 masks), got {n_classes}")
    out = _prepare(out_dir, ("images", "masks", "classnames.txt"), overwrite)
    names = [class_name(c, shape=False) for c in range(n_classes)]
    (out / "classnames.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    for s, part in enumerate(splits or (None,)):
        sub = Path(part) if part else Path()
        for i in range(n_images):
            rng = _rng(seed, s, i)
            bg = int(rng.integers(n_classes))
            label = np.full((size, size), bg, dtype=np.uint8)
            for _ in range(int(rng.integers(1, 3))):
                c = int(rng.choice([k for k in range(n_classes) if k != bg]))
                label[np.asarray(_blob(size, rng)) > 0] = c
            palette = np.array([_jitter(colour(c), rng, 12) for c in range(n_classes)], np.int16)
            img = Image.fromarray(palette[label].astype(np.uint8))
            edge = np.zeros_like(label, dtype=bool)  # pixels with a 4-neighbour of another class
            edge[1:, :] |= label[1:, :] != label[:-1, :]
            edge[:-1, :] |= label[1:, :] != label[:-1, :]
            edge[:, 1:] |= label[:, 1:] != label[:, :-1]
            edge[:, :-1] |= label[:, 1:] != label[:, :-1]
            mask = np.where(edge, 255, label).astype(np.uint8)
            _save(_noise(img, rng, 10), out / "images" / sub / f"{i:03d}.png")
            _save(Image.fromarray(mask), out / "masks" / sub / f"{i:03d}.png")
    return out
