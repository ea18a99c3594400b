"""Generate the tiny bundled demo classification set in data/demo/.

Three classes (circle, square, triangle) x 12 synthetic 128x128 RGB PNGs: one filled shape of
random size, position and colour on a plain or lightly noisy background, plus a CoOp-style split
file (split_zhou_Demo.json, 8 train / 2 val / 2 test per class) so the demo goes through the same
split-loading code as the real CoOp datasets.

Only numpy + PIL and one fixed seed: re-running rewrites identical bytes, so the committed files
double as a determinism check and their content hashes stay stable across machines.

    python data/make_demo.py            # rewrites data/demo/
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")
PER_CLASS = 12
N_TRAIN, N_VAL, N_TEST = 8, 2, 2
SIZE = 128
SEED = 20240607


def _colour(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def _background(rng: np.random.Generator) -> np.ndarray:
    base = np.array(_colour(rng, 150, 256), dtype=np.int16)
    img = np.broadcast_to(base, (SIZE, SIZE, 3)).copy()
    if rng.random() < 0.5:
        # Noise is drawn on a coarse 16x16 grid and upsampled: it still varies the background
        # but compresses far better than per-pixel noise, keeping the bundled set small.
        coarse = rng.integers(-12, 13, size=(SIZE // 8, SIZE // 8, 1), dtype=np.int16)
        img += np.kron(coarse, np.ones((8, 8, 1), dtype=np.int16))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(cls: str, rng: np.random.Generator) -> Image.Image:
    img = Image.fromarray(_background(rng), mode="RGB")
    draw = ImageDraw.Draw(img)
    # The shape stays dark-ish against the light background so every class is visibly separable.
    fill = _colour(rng, 0, 140)
    half = int(rng.integers(16, 44))
    cx = int(rng.integers(half + 2, SIZE - half - 2))
    cy = int(rng.integers(half + 2, SIZE - half - 2))
    if cls == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif cls == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    elif cls == "triangle":
        angle = float(rng.uniform(0, 2 * np.pi))
        pts = [
            (cx + half * np.cos(angle + k * 2 * np.pi / 3), cy + half * np.sin(angle + k * 2 * np.pi / 3))
            for k in range(3)
        ]
        draw.polygon([(round(x), round(y)) for x, y in pts], fill=fill)
    else:
        raise ValueError(cls)
    return img


def make_demo(out_dir: Path, seed: int = SEED) -> dict:
    rng = np.random.default_rng(seed)
    images = out_dir / "images"
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(CLASSES):
        (images / cls).mkdir(parents=True, exist_ok=True)
        for i in range(PER_CLASS):
            rel = f"{cls}/{cls}_{i:02d}.png"
            # Fixed PNG settings and no metadata: identical pixels give identical bytes.
            _draw(cls, rng).save(images / rel, format="PNG", optimize=True)
            part = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
            split[part].append([rel, label, cls])
    # One entry per line keeps the committed split file readable and its diffs small.
    lines = [
        f"  {json.dumps(part)}: [\n" + ",\n".join(f"    {json.dumps(e)}" for e in entries) + "\n  ]"
        for part, entries in split.items()
    ]
    (out_dir / "split_zhou_Demo.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return split


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "demo"
    s = make_demo(out)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {sum(len(v) for v in s.values())} images to {out} ({total} bytes)")
