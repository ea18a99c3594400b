#!/usr/bin/env python
"""CPU gain of decoding the next shard's images ahead and writing chunks behind; prints figures.

    python benchmarks/bench_overlap.py --out /tmp/bench-overlap --images 48 --size 512   # ~2 min, 2-core VM

Tiny models, BLIP captions, VAE, mid+up taps at 128 px, shards of 8, on --images synthetic PNGs of
--size px (large images make decoding a real share of the work). Each repeat extracts into a fresh
store three times, in rotating order: serial (decoding ahead and background writes off), decode-ahead
only, and overlapped (both, the default); medians of --repeats. The stores' bytes are compared (they
must be equal).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vermouth_cache.extract import shards  # noqa: E402
from vermouth_cache.extract.request import ExtractRequest  # noqa: E402
from vermouth_cache.extract.run import extract  # noqa: E402
from vermouth_cache.models.tiny import write_tiny_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    models = out / "models"
    if not (models / "sd" / "model_index.json").is_file():
        write_tiny_models(models)
    data = out / "imgs" / "x"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.images):
        if not (data / f"{i:03d}.png").is_file():
            Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(data / f"{i:03d}.png")
    modes = {"serial": (False, False), "decode-ahead": (True, False), "overlapped": (True, True)}
    times = {m: [] for m in modes}
    stores = {}
    for r in range(args.repeats):
        order = list(modes)[r % 3:] + list(modes)[:r % 3]
        for mode in order:
            store = out / f"store-{mode}"
            shutil.rmtree(store, ignore_errors=True)
            shards.PREFETCH, shards.BACKGROUND_WRITES = modes[mode]
            req = ExtractRequest(dataset=str(data.parent), store=str(store), sd_model=str(models / "sd"),
                                 captioner=str(models / "blip"), resolution=128, stages="mid,up", shard_size=8,
                                 device="cpu", progress=False)
            t0 = time.perf_counter()
            extract(req)
            times[mode].append(time.perf_counter() - t0)
            stores[mode] = store
    same = all((stores[m] / p.relative_to(stores["serial"])).read_bytes() == p.read_bytes() for m in modes
               for p in stores["serial"].rglob("*") if p.is_file() and "/arrays/" in p.as_posix())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"serial {med['serial']:.2f} s, decode-ahead {med['decode-ahead']:.2f} s "
          f"({med['serial'] / med['decode-ahead']:.2f}x), overlapped {med['overlapped']:.2f} s "
          f"({med['serial'] / med['overlapped']:.2f}x); arrays byte-identical: {same}")
    print(json.dumps({"images": args.images, "size": args.size, "seconds": times, "median": med,
                      "speedup": med["serial"] / med["overlapped"], "identical": same}))


if __name__ == "__main__":
    main()
