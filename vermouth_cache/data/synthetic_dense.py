"""Tiny deterministic dense-prediction datasets for tests: depth scenes a head can learn.

`make_depth` writes the BTS / VPD NYU-v2 layout (data/depth.py) with scene-named folders, so the
scene-class substring rule is exercised (`study_room_0001` is a "study"). Each scene is a floor
plane receding towards the horizon and a few boxes standing on it; every pixel's brightness falls
with its depth (near: bright, far: dark) under a per-scene tint and a little noise, so depth
follows the image and a head can learn it. Depth is written as uint16 millimetres, with a few
unmeasured (0) pixels as in real Kinect maps. Same arguments, byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vermouth_cache.data.synthetic import _counts, _prepare, _rng, _save

SCENES = ("kitchen", "office", "study_room", "living_room")  # folder names: the scene classes
NEAR, FAR = 1.0, 9.0  # metres


def _scene(height: int, width: int, rng) -> np.ndarray:
    """(H, W) depth in metres: a floor from NEAR (bottom row) to FAR (horizon), boxes in front of it."""
    horizon = int(height * rng.uniform(0.25, 0.45))
    rows = np.arange(height, dtype=np.float64)[:, None]
    t = np.clip((height - 1 - rows) / max(1, height - 1 - horizon), 0, 1)
    depth = np.broadcast_to(NEAR + (FAR - NEAR) * t ** 0.7, (height, width)).copy()
    depth[:horizon] = FAR  # the back wall
    for _ in range(int(rng.integers(1, 4))):
        w, h = int(rng.integers(width // 8, width // 3)), int(rng.integers(height // 6, height // 2))
        x, bottom = int(rng.integers(0, width - w)), int(rng.integers(horizon + h // 2, height))
        top = max(0, bottom - h)
        d = depth[min(bottom, height - 1), x]  # it stands on the floor where its base is
        depth[top:bottom, x:x + w] = np.minimum(depth[top:bottom, x:x + w], d)
    return depth


def _image(depth: np.ndarray, tint, rng) -> Image.Image:
    shade = 1.0 - (depth - NEAR) / (FAR - NEAR) * 0.85  # near bright, far dark
    rgb = shade[..., None] * np.asarray(tint, dtype=np.float64)[None, None] + rng.normal(0, 4, depth.shape + (3,))
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def make_depth(out_dir, n_train: int = 8, n_test: int = 4, size: tuple[int, int] = (96, 128), seed: int = 0,
               overwrite: bool = False) -> Path:
    """A depth root (sync/ for training, official_splits/{train,test}/) of H x W = `size` scenes."""
    _counts(n_train, "n_train")
    _counts(n_test, "n_test")
    h, w = size
    out = _prepare(out_dir, ("sync", "official_splits"), overwrite)
    for split, base, n in (("train", out / "sync", n_train), ("test", out / "official_splits" / "test", n_test)):
        for i in range(n):
            rng = _rng(seed, 0 if split == "train" else 1, i)
            scene = SCENES[i % len(SCENES)]
            folder = base / f"{scene}_{i // len(SCENES) + 1:04d}"
            depth = _scene(h, w, rng)
            tint = (255, 235, 200) if scene == "kitchen" else (210, 225, 255) if scene == "office" else (235, 240, 235)
            _save(_image(depth, tint, rng), folder / f"rgb_{i:05d}.png")
            mm = np.rint(depth * 1000).astype(np.uint16)
            mm[rng.random(mm.shape) < 0.01] = 0  # unmeasured pixels
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mm).save(folder / f"sync_depth_{i:05d}.png", format="PNG")
    for scene in SCENES:  # VPD names the scene classes after these folders
        (out / "official_splits" / "train" / scene).mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------- referring expressions

_REFER_COLOURS = (("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 70, 220)), ("yellow", (230, 210, 40)))
# each position is said with phrases of its own (and of their own lengths): the sentence, not only its
# colour word, tells a tiny random text encoder's states apart
_POSITIONS = (("the {} one at left", "{} on the left side"),
              ("the {} object in the middle of the picture", "in the centre there is the {} one we mean"),
              ("and then the {} thing that you can see over there on the right hand side", "far right {}"))


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[float]:
    if kind == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    else:  # a 16-gon circle
        pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
    return [round(float(v), 2) for p in pts for v in p]


def make_refer(out_dir, n_train: int = 12, n_val: int = 6, size: tuple[int, int] = (96, 128), seed: int = 0,
               overwrite: bool = False) -> Path:
    """A REFER root (instances.json, refs(unc).p, images/): each image holds three objects of distinct
    colours at the left, middle and right, each referred to by two sentences naming its colour and
    position ("the red one at left", "red on the left side")."""
    import json
    import pickle

    from PIL import ImageDraw

    _counts(n_train, "n_train")
    _counts(n_val, "n_val")
    h, w = size
    out = _prepare(out_dir, ("instances.json", "refs(unc).p", "images"), overwrite)
    images, anns, refs = [], [], []
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        rng = _rng(seed, 2, i)
        colours = rng.permutation(len(_REFER_COLOURS))[:3]
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(90, 140, 3)))
        draw = ImageDraw.Draw(img)
        name = f"COCO_train2014_{i:012d}.png"
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for slot, c in enumerate(colours):
            kind = ("square", "circle")[int(rng.integers(0, 2))]
            r = float(rng.uniform(0.12, 0.18) * h)
            cx = (slot + 0.5) * w / 3 + float(rng.uniform(-4, 4))
            cy = h / 2 + float(rng.uniform(-0.15, 0.15) * h)
            poly = _polygon(kind, cx, cy, r)
            colour_name, rgb = _REFER_COLOURS[int(c)]
            draw.polygon(list(zip(poly[::2], poly[1::2])), fill=rgb)
            ann_id = i * 10 + slot
            anns.append({"id": ann_id, "image_id": i, "category_id": 1, "segmentation": [poly], "iscrowd": 0,
                         "bbox": [cx - r, cy - r, 2 * r, 2 * r], "area": 4 * r * r})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i, "split": split, "file_name": name,
                         "sentences": [{"sent": p.format(colour_name)} for p in _POSITIONS[slot]]})
        _save(img, out / "images" / name)
    (out / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                    "categories": [{"id": 1, "name": "object"}]}))
    (out / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return out
