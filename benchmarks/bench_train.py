#!/usr/bin/env python
"""One training epoch from the cache against the same epoch computing features online; prints figures.

    python benchmarks/bench_train.py --images 8 --out /tmp/bench            # full-size SD 1.5, CPU
    python benchmarks/bench_train.py --images 64 --device cuda --out /tmp/bench

The models are the FULL-SIZE SD 1.5 (U-net, VAE, CLIP ViT-L/14 text) and BLIP-base architectures
with random weights (built once by benchmarks/bench_extract.py's `full_models` into
OUT/models-full); compute cost does not depend on the weights. In one process:

1. `extract` the images once (t=200, mid+up): the one-time cost a cache pays (reported, not in
   the ratio).
2. cached epoch: the few-shot U-head (mid+up, no expert, no attention maps) trains one epoch
   from the store through `CacheLoader` (the `train fewshot` path).
3. online epoch: the same head and batches, but every batch first runs what the paper's code
   runs per step: BLIP caption, CLIP text encoding, VAE encoding, DDPM noise and the U-net up to
   its last tapped block (all frozen, inference mode), then the same head step.
Each epoch is run twice and the second (warm) run is reported. The ratio is online / cached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bench_extract as be  # noqa: E402
from vermouth_cache.extract import compute  # noqa: E402
from vermouth_cache.data.datasets import load_dataset  # noqa: E402
from vermouth_cache.extract.run import extract  # noqa: E402
from vermouth_cache.train.heads import TextClassifier  # noqa: E402
from vermouth_cache.data.images import decode_image  # noqa: E402
from vermouth_cache.methods.vermouth import METHOD as VERMOUTH  # noqa: E402
from vermouth_cache.models.loading import Captioner, Placement, resolve_precision  # noqa: E402
from vermouth_cache.models.pipeline import StableDiffusion  # noqa: E402
from vermouth_cache.extract.request import ExtractRequest  # noqa: E402
from vermouth_cache.store.entries import Store  # noqa: E402
from vermouth_cache.models.tiny import write_tiny_models  # noqa: E402
from vermouth_cache.train.common import RunOptions, build_head, class_text, loader_for  # noqa: E402
from vermouth_cache.train.inputs import open_split  # noqa: E402
from vermouth_cache.train.tasks import task_settings  # noqa: E402

T = 200


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="/tmp/bench")
    args = ap.parse_args()
    out = Path(args.out)
    os.environ["VERMOUTH_CACHE_HOME"] = str(out / "cache-home")
    device = torch.device(args.device)
    tiny_dir = out / "models-tiny"
    if not (tiny_dir / "clip" / "config.json").is_file():
        write_tiny_models(tiny_dir)
    models, _ = be.full_models(out, {"sd": tiny_dir / "sd", "blip": tiny_dir / "blip"})
    folder = be.image_folder(out / "train-images", args.images, args.resolution)
    store = be.fresh_dir(out / "train-store")

    t0 = time.perf_counter()
    extract(ExtractRequest(dataset=str(folder), store=str(store), sd_model=str(models["sd"]),
                           captioner=str(models["blip"]), resolution=args.resolution, t=(T,), stages="mid,up",
                           device=args.device, batch_size=args.batch, progress=False))
    extract_s = time.perf_counter() - t0

    s = task_settings("fewshot", t=T, resolution=args.resolution, stages="mid,up", attn_maps="none", expert="none",
                      batch_size=args.batch, epochs=1, lr=1e-4)
    opts = RunOptions(store=str(store), out=str(out / "train-run"), clip_model=str(tiny_dir / "clip"),
                      device=args.device, progress=False)
    ds = load_dataset(folder)
    split = open_split(Store(store), ds, s)
    text, _ = class_text(Store(store), ds.classnames, "default", s, opts)
    classifier = TextClassifier(text, s.temperature)
    head = build_head(split, s, "global", text.shape[1], device)
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr)
    loader = loader_for(split, s, opts, shuffle=True)

    def step(batch):
        loss = F.cross_entropy(classifier(head(batch)), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    def cached_epoch():
        sync(device)
        t0 = time.perf_counter()
        loader.set_epoch(0)
        for batch in loader:
            step(batch)
        sync(device)
        return time.perf_counter() - t0

    placement = Placement(device, resolve_precision("auto", device))
    sd = StableDiffusion(str(models["sd"]), placement)
    captioner = Captioner(str(models["blip"]), placement)
    _ = sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sd.scheduler, captioner.model, captioner.processor
    call = compute.call_size(device, args.batch)

    def online_epoch():
        sync(device)
        t0 = time.perf_counter()
        loader.set_epoch(0)
        for batch in loader:
            samples = [ds.samples[int(i)] for i in batch["index"]]
            images = [decode_image(x.path, x.id) for x in samples]
            caps = compute.blip_captions(captioner, images, prefix="", min_new=5, max_new=20, batch=call)
            cond = sd.text_states(caps, layer="final", batch=call)
            lat = compute.vae_latents(sd, images, resolution=args.resolution, rule=VERMOUTH.latent, batch=call)
            taps = compute.unet_features(sd, lat, cond, [x.id for x in samples], t=T, taps=split.tap_names,
                                         noise="ddpm", seed=0, draws=1, inversion_steps=10,
                                         attention=VERMOUTH.attention, batch=call)
            step({**{k: torch.from_numpy(v).to(device) for k, v in taps.items()}, "label": batch["label"]})
        sync(device)
        return time.perf_counter() - t0

    cached = [cached_epoch() for _ in range(2)][-1]
    online = [online_epoch() for _ in range(2)][-1]
    n = len(split.indices)
    res = {"device": str(device), "images": n, "resolution": args.resolution, "batch": args.batch,
           "extract_once_s": round(extract_s, 3), "cached_epoch_s": round(cached, 4),
           "online_epoch_s": round(online, 3), "ratio_online_over_cached": round(online / cached, 1),
           "cached_img_per_s": round(n / cached, 1), "online_img_per_s": round(n / online, 2),
           "loader_mode": loader.mode, "torch_threads": torch.get_num_threads()}
    print(f"{'':<28}{'seconds':>10}{'img/s':>10}")
    print(f"{'extract once (t=200)':<28}{extract_s:>10.2f}{n / extract_s:>10.2f}")
    print(f"{'epoch from the cache':<28}{cached:>10.3f}{n / cached:>10.1f}")
    print(f"{'epoch computing online':<28}{online:>10.2f}{n / online:>10.2f}")
    print(f"online / cached = {online / cached:.0f}x   ({n} images, {args.resolution} px, batch {args.batch}, {device})")
    print(json.dumps(res))
    (out / "bench_train.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
