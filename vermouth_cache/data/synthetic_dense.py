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
