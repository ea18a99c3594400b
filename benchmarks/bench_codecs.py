#!/usr/bin/env python
"""What each `--codec` costs and saves, measured in one run; prints a table and one JSON blob.

    python benchmarks/bench_codecs.py --out /tmp/bench-codecs          # ~5 min on a 2-core VM
    python benchmarks/bench_codecs.py --sd-model runwayml/stable-diffusion-v1-5 --resolution 512 ...

The demo flow (the bundled demo split, the tiny models unless --sd-model/--captioner/--expert-model
name real ones) is extracted once per codec into its own store: raw fp32 (the reference), raw fp16
(the default), zstd fp16, int8 and fp8. For each:
  bytes      the features and expert entries on disk, and the ratio to raw fp16;
  read       every feature and expert array read whole through `Entry.read` (file read, CRC32C,
             decode), median of --repeats: MB/s of decoded float32 and the time against raw fp16;
  error      max |x - x_ref| and relative L2 ||x - x_ref|| / ||x_ref|| against raw fp32, over all arrays;
  top-1      the demo's few-shot U-head (train fewshot, fixed seed) trained from that store, and its
             difference to raw fp16.
WARM CACHE ONLY: the stores were just written and sit in the page cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vermouth_cache.data.bundled import bundled_file  # noqa: E402
from vermouth_cache.extract.request import ExtractRequest  # noqa: E402
from vermouth_cache.extract.run import extract  # noqa: E402
from vermouth_cache.models.tiny import write_tiny_models  # noqa: E402
from vermouth_cache.store.entries import Store  # noqa: E402
from vermouth_cache.train.common import RunOptions  # noqa: E402
from vermouth_cache.train.tasks import task_settings  # noqa: E402
from vermouth_cache.train.tasks.fewshot import FewshotData, train_fewshot  # noqa: E402

VARIANTS = [("raw-fp32", "raw", "fp32"), ("raw-fp16", "raw", "fp16"), ("zstd-fp16", "zstd", "fp16"),
            ("int8", "int8", "fp16"), ("fp8", "fp8", "fp16")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="Working directory (stores, runs, bench.json).")
    ap.add_argument("--sd-model", help="SD pipeline (default: tiny models written into OUT).")
    ap.add_argument("--captioner", help="BLIP captioner (default: the tiny one).")
    ap.add_argument("--expert-model", help="ResNet-18 (default: the tiny one).")
    ap.add_argument("--clip-model", help="CLIP text model for the few-shot classifier (default: the tiny one).")
    ap.add_argument("--resolution", type=int, default=128, help="Extraction resolution [128].")
    ap.add_argument("--t", type=int, default=10, help="Timestep [10, the demo's].")
    ap.add_argument("--epochs", type=int, default=50, help="Few-shot training epochs [50, the demo's].")
    ap.add_argument("--repeats", type=int, default=5, help="Timed reads per codec [5].")
    ap.add_argument("--device", default="cpu", help="Extraction and training device [cpu].")
    args = ap.parse_args()
    out = Path(args.out)
    tiny = out / "models"
    if not (args.sd_model and args.captioner and args.expert_model and args.clip_model):
        if not (tiny / "sd" / "model_index.json").is_file():
            write_tiny_models(tiny)
    sd, cap = args.sd_model or str(tiny / "sd"), args.captioner or str(tiny / "blip")
    expert, clip = args.expert_model or str(tiny / "resnet18"), args.clip_model or str(tiny / "clip")
    split = bundled_file("demo", "split_zhou_Demo.json")

    rows, ref = {}, None
    for name, codec, dtype in VARIANTS:
        store = out / name
        base = ExtractRequest(dataset=str(split), store=str(store), sd_model=sd, captioner=cap, resolution=args.resolution,
                              t=(args.t,), stages="mid,up", attn_maps="up", expert="resnet18", expert_model=expert,
                              device=args.device, shard_size=16, batch_size=8, dtype=dtype, codec=codec, progress=False)
        reps = {sp: extract(base.with_(split=sp)) for sp in ("train", "val", "test")}
        entries = {(sp, kind): Store(str(store)).find(kind, r.entries[label]) for sp, r in reps.items()
                   for kind, label in (("features", f"features t={args.t}"), ("expert", "expert"))}
        nbytes = sum(e.size_bytes() for e in entries.values())
        flat, times = None, []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            flat = {(sp, kind, n): e.read(n).astype(np.float32, copy=False)
                    for (sp, kind), e in entries.items() for n in e.array_names()}
            times.append(time.perf_counter() - t0)
        decoded = sum(v.nbytes for v in flat.values())
        if ref is None:
            ref = flat
        diff = [np.abs(flat[k] - ref[k]).max() for k in ref]
        rel = np.sqrt(sum(float(((flat[k] - ref[k]) ** 2).sum()) for k in ref) / sum(float((ref[k] ** 2).sum()) for k in ref))
        settings = task_settings("fewshot", t=args.t, resolution=args.resolution, stages="mid,up", lr=3e-4,
                                 epochs=args.epochs, batch_size=8)
        opts = RunOptions(store=str(store), out=str(out / f"run-{name}"), clip_model=clip, device=args.device,
                          progress=False, overwrite=True)
        metrics = train_fewshot(FewshotData(str(split), shots=8), settings, opts)
        rows[name] = {"bytes": nbytes, "read_s": statistics.median(times), "read_MBps": decoded / statistics.median(times) / 1e6,
                      "max_abs_err": float(max(diff)), "rel_l2": rel, "top1": metrics["top1"]}
    base = rows["raw-fp16"]
    for r in rows.values():
        r["size_vs_fp16"] = r["bytes"] / base["bytes"]
        r["read_time_vs_fp16"] = r["read_s"] / base["read_s"]
        r["top1_delta_vs_fp16"] = r["top1"] - base["top1"]
    print(f"{'codec':10} {'bytes':>10} {'x fp16':>7} {'read MB/s':>10} {'t/fp16':>7} {'max err':>9} {'rel L2':>9} "
          f"{'top-1':>6} {'d top-1':>8}")
    for name, r in rows.items():
        print(f"{name:10} {r['bytes']:>10} {r['size_vs_fp16']:>7.3f} {r['read_MBps']:>10.1f} {r['read_time_vs_fp16']:>7.2f} "
              f"{r['max_abs_err']:>9.2e} {r['rel_l2']:>9.2e} {r['top1']:>6.3f} {r['top1_delta_vs_fp16']:>+8.3f}")
    blob = {"machine": platform.platform(), "python": platform.python_version(), "args": vars(args), "codecs": rows}
    (out / "bench.json").write_text(json.dumps(blob, indent=1))
    print(json.dumps(blob))


if __name__ == "__main__":
    main()
