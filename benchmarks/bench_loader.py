#!/usr/bin/env python
"""Samples/s of `CacheLoader` against a plain np.memmap reader over the same fp16 rows; prints figures.

    python benchmarks/bench_loader.py --samples 512 --shape 1280x8x8 --shape 640x32x32 --batch 64 \
        --out /tmp/bench-loader --repeats 3          # 40-55 s on a 2-core VM

For each --shape: a store with ONE fp16 array of --samples rows (shards of --shard-size, one Zarr
chunk each) and a .npy file holding the SAME rows. Then one epoch per repeat, shuffled, batches of
--batch, each batch ending as float32 torch tensors on the CPU:
  memmap         np.load(mmap_mode="r"), a fresh permutation per epoch, mm[idx] per batch (random
                 fancy indexing), torch.from_numpy(...).float(): what a hand-written reader does.
  memmap-tuned   the same, but cast into a numpy-allocated float32 array as the loader does (numpy
                 asks for huge pages, torch does not: on small VMs page faults cost more than the cast).
  stream         CacheLoader(mode="stream", shuffle=True): per shard, a reader-thread task reads the
                 whole chunk into a reused buffer, checks it and copies its rows, cast, into the
                 batches that hold them (shuffled within windows of shards; --read-ahead shards).
  memory         CacheLoader(mode="memory", shuffle=True): the epoch alone, and (memory+load) the
                 epoch plus building the loader (reading every chunk once).
  chunk-reads    entry.read of every shard in order, nothing else: one file read into a fresh buffer
                 and its CRC32C per chunk, on one thread (stream mode's reads, less the buffer reuse).
The main thread does nothing with a batch, so this is the reader's ceiling, not a training step.

On a small VM most of the time goes to first-touch page faults of fresh buffers (chunk bytes,
float32 batches), not to copying: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/...`
(glibc >= 2.35: malloc asks for transparent huge pages) made memmap ~3x and stream ~4x faster on
the 2-core development VM. Compare runs with the same setting.

WARM CACHE ONLY: dropping the OS page cache is not possible in this sandbox; every run reads
files that were just written (or read) and sit in RAM. Cold-disk figures would favour whole-chunk
reads (stream) over random row reads (memmap) further. Figures are medians over --repeats epochs,
after one unmeasured warm-up epoch per reader. Target: stream >= 0.8x memmap on both shapes.
Printed as a table, then one JSON blob, also written to OUT/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vermouth_cache.train.loader import CacheLoader, Field  # noqa: E402
from vermouth_cache.store.entries import Store  # noqa: E402


def build(root: Path, n: int, shape: tuple[int, ...], shard_size: int):
    """The same random fp16 rows into a store entry (array "x") and into root/x.npy."""
    store = Store(root / "store", create=True)
    entry = store.entry("features", {"bench": list(shape), "n": n}, n_samples=n, shard_size=shard_size, about={})
    entry.ensure_array("x", shape, "float16")
    mm = np.lib.format.open_memmap(root / "x.npy", mode="w+", dtype=np.float16, shape=(n, *shape))
    rng = np.random.default_rng(0)
    for shard in range(entry.n_shards):
        a, b = entry.shard_bounds(shard)
        rows = rng.standard_normal((b - a, *shape), dtype=np.float32).astype(np.float16)
        entry.write_shard("x", shard, ["ok"] * (b - a), data=rows)
        mm[a:b] = rows
    mm.flush()
    del mm
    return entry, root / "x.npy"


def memmap_epoch(path: Path, batch: int, seed: int, epoch: int, tuned: bool = False):
    mm = np.load(path, mmap_mode="r")
    order = np.random.default_rng([seed, epoch]).permutation(len(mm))
    for b0 in range(0, len(order), batch):
        idx = order[b0:b0 + batch]
        rows = torch.from_numpy(mm[idx])  # (B, ...) float16
        if tuned:  # the loader's cast: into a numpy-allocated (huge-page) float32 array
            x = torch.from_numpy(np.empty(rows.shape, np.float32)).copy_(rows)
        else:
            x = rows.float()
        yield {"x": x, "index": torch.from_numpy(idx)}


def timed_epoch(batches) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for b in batches:
        n += len(b["index"])
    return time.perf_counter() - t0, n


def bench_shape(root: Path, args, shape: tuple[int, ...]) -> dict:
    t0 = time.perf_counter()
    entry, npy = build(root, args.samples, shape, args.shard_size)
    build_s = time.perf_counter() - t0
    fields, idx = {"x": Field(entry, "x")}, range(args.samples)
    kw = dict(shuffle=True, seed=0, shuffle_window=args.shuffle_window, prefetch=args.prefetch,
              read_ahead=args.read_ahead)
    stream = CacheLoader(fields, idx, args.batch, mode="stream", **kw)
    keys = ("memmap", "memmap-tuned", "stream", "memory", "memory+load", "chunk-reads")
    times: dict[str, list[float]] = {k: [] for k in keys}
    for r in range(args.repeats + 1):  # r == 0: warm-up, not recorded
        s_mm, n_mm = timed_epoch(memmap_epoch(npy, args.batch, 0, r))
        s_mt, _ = timed_epoch(memmap_epoch(npy, args.batch, 0, r, tuned=True))
        stream.set_epoch(r)
        s_st, n_st = timed_epoch(stream)
        t0 = time.perf_counter()
        memory = CacheLoader(fields, idx, args.batch, mode="memory", **kw)
        load = time.perf_counter() - t0
        memory.set_epoch(r)
        s_me, n_me = timed_epoch(memory)
        t0 = time.perf_counter()
        for shard in range(entry.n_shards):  # the reads alone: entry.read of every chunk, nothing else
            entry.read("x", slice(*entry.shard_bounds(shard)))
        s_rd = time.perf_counter() - t0
        assert n_mm == n_st == n_me == args.samples
        del memory
        if r:
            for k, s in (("memmap", s_mm), ("memmap-tuned", s_mt), ("stream", s_st), ("memory", s_me),
                         ("memory+load", s_me + load), ("chunk-reads", s_rd)):
                times[k].append(s)
    rate = {k: args.samples / statistics.median(v) for k, v in times.items()}
    return {
        "shape": list(shape), "samples": args.samples, "MB": round(args.samples * int(np.prod(shape)) * 2 / 1e6, 1),
        "build_s": round(build_s, 2), "samples_per_s": {k: round(v, 1) for k, v in rate.items()},
        "vs_memmap": {k: round(v / rate["memmap"], 2) for k, v in rate.items()},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--shape", action="append", help="sample shape, e.g. 1280x8x8 (repeatable)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--shuffle-window", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--read-ahead", type=int, default=None, help="shards read ahead (default: --shuffle-window)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--out", default=None, help="folder for the store, the .npy and bench.json (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the store and .npy files")
    args = p.parse_args(argv)
    shapes = [tuple(int(d) for d in s.split("x")) for s in (args.shape or ["1280x8x8", "640x32x32"])]
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-loader-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    results = []
    for shape in shapes:
        root = out / "x".join(map(str, shape))
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        results.append(bench_shape(root, args, shape))
        if not args.keep:
            shutil.rmtree(root)

    print(f"\nwarm page cache; {args.samples} samples, batch {args.batch}, shards of {args.shard_size}, "
          f"window {args.shuffle_window}, prefetch {args.prefetch}, read-ahead {args.read_ahead or args.shuffle_window}; median of {args.repeats} epochs; "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads")
    head = f"{'shape':>12} {'MB':>7} | " + " | ".join(f"{k:>16}" for k in results[0]["samples_per_s"])
    print(head + "\n" + "-" * len(head))
    for r in results:
        cells = " | ".join(f"{r['samples_per_s'][k]:>7.0f} ({r['vs_memmap'][k]:.2f}x)" for k in r["samples_per_s"])
        print(f"{'x'.join(map(str, r['shape'])):>12} {r['MB']:>7.0f} | {cells}")
    print("samples/s (ratio to memmap); target: stream >= 0.80x memmap")
    blob = {"args": vars(args), "machine": platform.platform(), "cores": os.cpu_count(), "results": results}
    (out / "bench.json").write_text(json.dumps(blob, indent=1))
    print(json.dumps(blob))


if __name__ == "__main__":
    main()
