#!/usr/bin/env python
"""An 8-point grid (4 timesteps x 2 stage sets) trained from the cache against the naive way; prints figures.

    python benchmarks/bench_sweep.py --out /tmp/bench                      # full-size SD 1.5, CPU, 8 images, 3 epochs
    python benchmarks/bench_sweep.py --device cuda --images 64 --epochs 10 --out /tmp/bench
    python benchmarks/bench_sweep.py --tiny --out /tmp/bsw --epochs 1 --images 6   # smoke mode (seconds)

Not a test: everything below is measured in ONE process, on the same data, and printed.

Data: a synthetic CoOp split file (`vermouth_cache.data.synthetic.make_classification`), --classes
classes (default 2) with --images // --classes train images each (default 8 in all), 2 val and 2
test images per class, drawn at the resolution. shots = every train image of a class.

Models: by default the FULL-SIZE SD 1.5 (U-net, VAE, CLIP ViT-L/14 text) and BLIP-base
architectures with random weights, built once by benchmarks/bench_extract.py's `full_models` into
OUT/models-full (compute cost does not depend on the weights). `full_models` writes no CLIP text
model WITH a projection, which the class-prompt classifier needs: both sides take the class text
from the tiny CLIP of `write_tiny_models` (OUT/models-tiny/clip). It is computed once per side, not
per epoch, and is not what is measured. --tiny uses the tiny random models for everything (smoke
mode: the figures mean nothing, the code paths are the real ones).

The grid: a recipe written to OUT/bench_sweep.yaml, task fewshot, grid t = 50, 100, 200, 400 x
stages "mid,up", "down,mid", expert none, attention maps none, --epochs epochs, batch size 8,
the fewshot defaults of Table 7 otherwise (lr, weight decay, validation every epoch).

1. cached (the package): `run_sweep` once, on a fresh output, a fresh store and a fresh file-hash
   memo (VERMOUTH_CACHE_HOME under OUT), one local dask worker. Its wall time counts everything
   the sweep does: one merged extraction per split (train, val, test: BLIP caption, CLIP text and
   VAE once per image, the U-net once per image and timestep, up to the last up block), weight
   hashing, the dask cluster start, the class-prompt features, then 4 training passes (one per
   t; the two stage sets share a pass) that validate on val every epoch and test at the end, all
   from the store.
2. naive (the authors' way): the same models loaded once (timed), the class text once (timed),
   then for EVERY one of the 8 points and EVERY epoch, every batch first recomputes its features
   online: decode, BLIP caption, CLIP text encoding, VAE encoding, the same seeded DDPM noise at
   that point's t, and the U-net up to the last block that point needs (frozen, inference mode,
   same precision and per-call batch as `extract`), then the head step. The head, optimiser and
   loop are the package's own (`VermouthHead`, `train.loop.fit_many`), so the two sides differ
   only in where the features come from. Validation and test are counted on BOTH sides with the
   same protocol: val top-1 after every epoch (the naive side recomputes val features each time,
   as the authors' loop does), test once at the end with the best weights.
   The noise is the extraction's seeded per-sample DDPM draw (the authors draw fresh noise each
   step: the same cost). In favour of naive: one untimed U-net call on one image tells the tap
   shapes the head is built with; this loop stops the U-net at the last needed block ("down,mid"
   never runs the up blocks) where the authors' code runs all of it; the cached way runs first,
   so it may also pay the first reads of the weight files, and it pays a cold weight-hash memo.
   The last column prints test top-1 of both ways per point as a sanity check (the cache holds
   fp16 features, so the two may differ slightly).

Printed: seconds of each way, per point, `ratio naive/cached`, and a PROJECTION of the ratio to the
paper's few-shot length (100 epochs; fast schedule 10), labelled as such. Naive: one-time cost
(model load, class text, the 8 tests) + epochs x the measured seconds of one epoch of all 8 points
(train + validation). Cached: the measured one-call wall minus its epochs' share, + epochs x the
cached per-epoch cost, taken from two calibration `run_sweep` calls on the same (now full) store,
1 and 1+G epochs (G = max(E, 5)), which differ only in length: (train s at 1+G - train s at 1) / G. The
calibration is not part of the measured ratio. Should noise make that difference non-positive,
the whole training time of the 1-epoch call is used per epoch instead, an upper bound, and the
line says so.
Other load on the machine (2 shared cores) shows as noise; the load average is printed.
Results also go to OUT/bench_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_extract as be  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from vermouth_cache.extract import compute  # noqa: E402
from vermouth_cache.extract.classtext import encode_prompts  # noqa: E402
from vermouth_cache.data.datasets import load_dataset  # noqa: E402
from vermouth_cache.train.heads import HeadSpec, TextClassifier, VermouthHead  # noqa: E402
from vermouth_cache.data.images import decode_image  # noqa: E402
from vermouth_cache.methods.vermouth import METHOD as VERMOUTH  # noqa: E402
from vermouth_cache.models.loading import Captioner, Placement, resolve_precision  # noqa: E402
from vermouth_cache.models.pipeline import StableDiffusion  # noqa: E402
from vermouth_cache.train.pyramid import taps_needed  # noqa: E402
from vermouth_cache.extract.request import ExtractRequest  # noqa: E402
from vermouth_cache.sweep.recipe import load_recipe  # noqa: E402
from vermouth_cache.sweep.run import SweepOptions, run_sweep  # noqa: E402
from vermouth_cache.data.synthetic import make_classification  # noqa: E402
from vermouth_cache.models.tiny import write_tiny_models  # noqa: E402
from vermouth_cache.train.common import ce_loss  # noqa: E402
from vermouth_cache.train.loop import Member, fit_many  # noqa: E402
from vermouth_cache.data.vocab import templates as template_list  # noqa: E402

GRID_T = [50, 100, 200, 400]
GRID_STAGES = ["mid,up", "down,mid"]
BATCH = 8
PAPER_EPOCHS, FAST_EPOCHS = 100, 10
# the extract defaults the naive side copies (caption prompt and length, noise seed)
REQ = {name: f.default for name, f in ExtractRequest.model_fields.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------- recipe
def write_recipe(path: Path, split_file: Path, shots: int, models: dict, args) -> Path:
    recipe = {
        "name": "bench_sweep",
        "task": "fewshot",
        "datasets": {"synth": {"path": str(split_file), "shots": shots}},
        "models": {"sd_model": str(models["sd"]), "captioner": str(models["blip"]), "clip_model": str(models["clip"])},
        "extract": {"batch_size": BATCH},
        "train": {"resolution": args.resolution, "expert": "none", "attn_maps": "none", "epochs": args.epochs,
                  "batch_size": BATCH},
        "grid": {"t": GRID_T, "stages": GRID_STAGES},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def timed_sweep(recipe_path: Path, out: Path, store: Path, device: str, epochs: int | None = None) -> tuple:
    recipe = load_recipe(recipe_path)
    if epochs is not None:  # the calibration run: same recipe, other length
        text = yaml.safe_load(recipe_path.read_text())
        text["train"]["epochs"] = epochs
        other = recipe_path.with_name(recipe_path.stem + f"-e{epochs}.yaml")
        other.write_text(yaml.safe_dump(text, sort_keys=False))
        recipe = load_recipe(other)
    t0 = time.perf_counter()
    res = run_sweep(recipe, SweepOptions(out=str(out), store=str(store), workers=1, device=device, progress=False))
    wall = time.perf_counter() - t0
    bad = [r for r in res.records if r.get("status") != "done"]
    if bad:
        raise SystemExit(f"sweep point {bad[0]['point']}: {bad[0]['status']}")
    return recipe, res, wall


# ------------------------------------------------------------------------------- naive (online)
class Online:
    """The frozen models and one function: a batch of samples -> its U-net taps, computed now."""

    def __init__(self, models: dict, device: torch.device, resolution: int):
        self.device, self.resolution = device, resolution
        placement = Placement(device, resolve_precision("auto", device))  # what `extract` uses by default
        self.sd = StableDiffusion(str(models["sd"]), placement)
        self.captioner = Captioner(str(models["blip"]), placement)
        _ = (self.sd.unet, self.sd.vae, self.sd.text_encoder, self.sd.tokenizer, self.sd.scheduler,
             self.captioner.model, self.captioner.processor)
        self.call = compute.call_size(device, BATCH)
        self.seconds = 0.0  # time spent computing features

    def features(self, samples, t: int, taps: list[str]) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        images = [decode_image(x.path, x.id) for x in samples]
        caps = compute.blip_captions(self.captioner, images, prefix=REQ["caption_prefix"],
                                     min_new=REQ["caption_min_tokens"], max_new=REQ["caption_max_tokens"],
                                     batch=self.call)
        cond = self.sd.text_states(caps, layer=REQ["text_layer"], batch=self.call)
        lat = compute.vae_latents(self.sd, images, resolution=self.resolution, rule=VERMOUTH.latent, batch=self.call)
        out = compute.unet_features(self.sd, lat, cond, [x.id for x in samples], t=t, taps=taps, noise="ddpm",
                                    seed=REQ["seed"], draws=1, inversion_steps=REQ["inversion_steps"],
                                    attention=VERMOUTH.attention, batch=self.call)
        feats = {k: torch.from_numpy(v).to(self.device) for k, v in out.items()}
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return feats

    def tap_shapes(self, sample) -> dict[str, tuple]:
        """(C, H, W) of every tap, from one image (untimed: the head is built with these)."""
        all_taps = taps_needed("down,mid,up")
        return {k: tuple(v.shape[1:]) for k, v in self.features([sample], 0, all_taps).items()}


class OnlineBatches:
    """What `fit_many` needs of a loader (len, set_epoch, batches), every batch's features computed
    online at one timestep, with the same batch size and a seeded shuffle."""

    def __init__(self, online: Online, samples, t: int, taps: list[str], shuffle: bool, seed: int):
        self.online, self.samples, self.t, self.taps = online, list(samples), t, taps
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def __len__(self) -> int:
        return (len(self.samples) + BATCH - 1) // BATCH

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        order = np.arange(len(self.samples))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        for i in range(0, len(order), BATCH):
            chunk = [self.samples[j] for j in order[i:i + BATCH]]
            batch = self.online.features(chunk, self.t, self.taps)
            batch["label"] = torch.tensor([x.label for x in chunk], device=self.online.device)
            yield batch


def naive_point(point, online: Online, data: dict, text: torch.Tensor, shapes: dict) -> dict:
    """Train one grid point the authors' way; seconds of its train epochs, validations and test."""
    s = point.settings
    taps = taps_needed(s.stages)
    torch.manual_seed(s.seed)  # as train.common.build_head
    head = VermouthHead(HeadSpec(s.head, "global", s.stages, {n: shapes[n] for n in taps}, {}),
                        text.shape[1]).to(online.device)
    classifier = TextClassifier(text, s.temperature)
    scorer = torch.nn.Sequential(head, classifier)
    member = Member(head, list(head.parameters()), ce_loss(head, classifier), s)
    val_s = [0.0]

    @torch.no_grad()
    def accuracy(split: str) -> float:
        scorer.eval()
        right = n = 0
        for b in OnlineBatches(online, data[split].samples, s.t, taps, shuffle=False, seed=s.seed):
            right += int((scorer(b).argmax(1) == b["label"]).sum())
            n += len(b["label"])
        return right / n

    def evaluate():
        t0 = time.perf_counter()
        acc = accuracy("val")
        sync(online.device)
        val_s[0] += time.perf_counter() - t0
        return [{"top1": acc}]

    feat0 = online.seconds
    sync(online.device)
    t0 = time.perf_counter()
    result = fit_many([member], OnlineBatches(online, data["train"].samples, s.t, taps, shuffle=True, seed=s.seed),
                      s, evaluate=evaluate, select="top1")[0]
    sync(online.device)
    t1 = time.perf_counter()
    if result.error:
        raise SystemExit(f"naive {point.name}: {result.error}")
    test_top1 = accuracy("test")
    sync(online.device)
    t2 = time.perf_counter()
    return {"point": point.name, "seconds": t2 - t0, "train_s": t1 - t0 - val_s[0], "val_s": val_s[0],
            "test_s": t2 - t1, "features_s": online.seconds - feat0, "top1": test_top1,
            "val_top1": result.best["top1"] if result.best else None}


def naive_grid(recipe, models: dict, device: torch.device, resolution: int) -> dict:
    ds = next(iter(recipe.datasets.values()))
    shots = int(ds.options["shots"])
    data = {"train": load_dataset(ds.path, split="train", shots=shots, shot_seed=0),
            "val": load_dataset(ds.path, split="val"), "test": load_dataset(ds.path, split="test")}
    sync(device)
    t0 = time.perf_counter()
    online = Online(models, device, resolution)
    sync(device)
    load_s = time.perf_counter() - t0
    s0 = recipe.points[0].settings  # text_proj, templates, temperature: the same at every point
    t0 = time.perf_counter()
    names = template_list(s0.templates or data["train"].name.split("/")[0])
    text = torch.from_numpy(encode_prompts(models["clip"], data["train"].classnames, names,
                                           proj=s0.text_proj)).to(device)
    sync(device)
    text_s = time.perf_counter() - t0
    shapes = online.tap_shapes(data["train"].samples[0])  # untimed, see the docstring
    online.seconds = 0.0
    points = [naive_point(p, online, data, text, shapes) for p in recipe.points]
    return {"load_s": load_s, "classtext_s": text_s, "points": points,
            "wall_s": load_s + text_s + sum(p["seconds"] for p in points),
            "n": {k: len(v) for k, v in data.items()}}


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random models (smoke mode)")
    ap.add_argument("--images", type=int, default=8, help="train images in all (default 8)")
    ap.add_argument("--classes", type=int, default=2, help="classes (default 2); --images // --classes per class")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=None, help="default 256 (128 with --tiny)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="/tmp/bench")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of this process (default: torch's own); the sweep's dask worker takes "
                         "cores // workers")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resolution is None:
        args.resolution = 128 if args.tiny else 256
    per_class = args.images // args.classes
    if per_class < 1 or args.epochs < 1:
        raise SystemExit("need at least one train image per class and one epoch")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False here")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["VERMOUTH_CACHE_HOME"] = str(be.fresh_dir(out / "sweep-cache-home"))  # cold file-hash memo
    device = torch.device(args.device)

    # library imports the package does lazily inside its timers: here, so that neither side pays them.
    # Warm-up only: the names are never used (noqa for flake8/ruff; pyflakes ignores noqa, the `del`
    # tells it)
    import diffusers  # noqa: F401
    import distributed  # noqa: F401
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import (  # noqa: F401
        BlipForConditionalGeneration,
        BlipProcessor,
        CLIPTextModel,
        CLIPTokenizer,
    )
    del diffusers, distributed, AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    del BlipForConditionalGeneration, BlipProcessor, CLIPTextModel, CLIPTokenizer

    tiny_dir = out / "models-tiny"
    if not (tiny_dir / "clip" / "config.json").is_file():
        write_tiny_models(tiny_dir)
    if args.tiny:
        models = {"sd": tiny_dir / "sd", "blip": tiny_dir / "blip", "clip": tiny_dir / "clip"}
    else:
        full, _ = be.full_models(out, {"sd": tiny_dir / "sd", "blip": tiny_dir / "blip"})
        models = {**full, "clip": tiny_dir / "clip"}
    split_file = make_classification(out / f"data-c{args.classes}-n{per_class}-s{args.resolution}",
                                     n_classes=args.classes, per_class=(per_class, 2, 2), size=args.resolution,
                                     overwrite=True)
    recipe_path = write_recipe(out / "bench_sweep.yaml", split_file, per_class, models, args)
    if device.type == "cuda":  # CUDA context and cuBLAS/cuDNN init belong to neither side
        x = torch.randn(64, 64, device=device)
        (x @ x).sum().item()
        torch.nn.functional.conv2d(torch.randn(1, 4, 32, 32, device=device),
                                   torch.randn(4, 4, 3, 3, device=device)).sum().item()

    env = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "load_average_at_start": os.getloadavg()}
    print(f"bench_sweep: {' '.join(sys.argv)}")
    print(f"models: {'TINY random (smoke mode: figures mean nothing)' if args.tiny else 'FULL-SIZE SD 1.5 + BLIP-base, random weights'}"
          f"; class text from the tiny CLIP ({models['clip']})")
    print(f"device {device}{' (' + env['gpu'] + ')' if env['gpu'] else ''}, torch threads {env['torch_threads']}, "
          f"{os.cpu_count()} cores, load average {env['load_average_at_start']}")

    # 1. the cached way
    print("\n[1/3] cached: run_sweep on a fresh store ...", flush=True)
    recipe, res, wall = timed_sweep(recipe_path, be.fresh_dir(out / "sweep-cached"), out / "sweep-cached" / "store",
                                    args.device)
    cached = {"wall_s": wall, "extract_s": res.seconds["extract"], "train_s": res.seconds["train"],
              "points": {r["point"]: r for r in res.records}}
    E = args.epochs
    # 2. the naive way
    print(f"[2/3] naive: {len(recipe.points)} points x {args.epochs} epochs, features online ...", flush=True)
    naive = naive_grid(recipe, models, device, args.resolution)
    # 3. calibration of the cached per-epoch cost (for the projection only): two more sweeps on the
    #    now full store, alike in everything but their length, so their difference is epochs alone
    calib = {}
    gap = max(E, 5)  # a wider gap than 1 epoch, so that start-up jitter of a few seconds matters less
    for c in (1, 1 + gap):
        print(f"[3/3] calibration: run_sweep again on the same store with {c} epoch(s) ...", flush=True)
        _, cres, cwall = timed_sweep(recipe_path, be.fresh_dir(out / f"sweep-calib-e{c}"),
                                     out / "sweep-cached" / "store", args.device, epochs=c)
        calib[c] = {"wall_s": cwall, "extract_s": cres.seconds.get("extract", 0.0),
                    "train_s": cres.seconds.get("train", 0.0)}

    # ---- report
    n = naive["n"]
    print(f"\n== {len(recipe.points)}-point grid (t {GRID_T} x stages {GRID_STAGES}), {n['train']} train / "
          f"{n['val']} val / {n['test']} test images, {args.classes} classes, {args.resolution} px, "
          f"batch {BATCH}, {E} epoch(s), {device} ==")
    print(f"{'point':<32}{'cached s':>10}{'naive s':>10}{' (train':>9}{'val':>8}{'test)':>8}"
          f"{'feat %':>8}{'top1 c/n':>12}")
    for p in naive["points"]:
        c = cached["points"][p["point"]]
        c_top1 = c["scores"][0]["value"] if c.get("scores") else float("nan")
        print(f"{p['point']:<32}{c['seconds']:>10.2f}{p['seconds']:>10.2f}{p['train_s']:>9.2f}{p['val_s']:>8.2f}"
              f"{p['test_s']:>8.2f}{100 * p['features_s'] / p['seconds']:>7.1f}%{c_top1:>6.2f}/{p['top1']:.2f}")
    print("  (cached s per point = its training pass / the heads sharing it, extraction not included; "
          f"amortised over the grid the cached way costs {cached['wall_s'] / len(recipe.points):.2f} s a point)")
    print(f"\ncached (run_sweep, one call)     {cached['wall_s']:10.2f} s = extract {cached['extract_s']:.2f} s "
          f"+ train {cached['train_s']:.2f} s (+ report {cached['wall_s'] - cached['extract_s'] - cached['train_s']:.2f} s)")
    print(f"naive (features every epoch)     {naive['wall_s']:10.2f} s = models load {naive['load_s']:.2f} s "
          f"+ class text {naive['classtext_s']:.2f} s + 8 points {sum(p['seconds'] for p in naive['points']):.2f} s")
    ratio = naive["wall_s"] / cached["wall_s"]
    print(f"ratio naive/cached = {ratio:.1f}x   (measured: {E} epoch(s), val every epoch and test at the end on "
          "both sides)")

    # ---- projection to the paper's lengths
    naive_epoch = sum(p["train_s"] + p["val_s"] for p in naive["points"]) / E
    naive_fixed = naive["load_s"] + naive["classtext_s"] + sum(p["test_s"] for p in naive["points"])
    slope, bound = (calib[1 + gap]["train_s"] - calib[1]["train_s"]) / gap, ""
    if slope <= 0:  # noise beat the difference: an upper bound (all of a warm sweep's training per epoch)
        slope, bound = calib[1]["train_s"], " (UPPER BOUND: the calibration difference was lost in noise)"
    cached_fixed = cached["wall_s"] - E * slope
    proj = {}
    for label, epochs in (("paper", PAPER_EPOCHS), ("fast", FAST_EPOCHS)):
        nv, cv = naive_fixed + epochs * naive_epoch, cached_fixed + epochs * slope
        proj[label] = {"epochs": epochs, "naive_s": nv, "cached_s": cv, "ratio": nv / cv}
    print(f"\nPROJECTION (not measured): per epoch naive {naive_epoch:.2f} s for all 8 points, cached {slope:.3f} s"
          f"{bound}; one-time naive {naive_fixed:.2f} s (load, class text, tests), cached {cached_fixed:.2f} s "
          f"(extract, start, tests); calibration sweeps on the full store: train {calib[1]['train_s']:.2f} s "
          f"at 1 epoch, {calib[1 + gap]['train_s']:.2f} s at {1 + gap} (extract {calib[1]['extract_s']:.2f} s, "
          f"{calib[1 + gap]['extract_s']:.2f} s: nothing left to compute)")
    print(f"projected ratio naive/cached at {PAPER_EPOCHS} epochs (paper) = {proj['paper']['ratio']:.1f}x  "
          f"({proj['paper']['naive_s']:.0f} s vs {proj['paper']['cached_s']:.0f} s); at {FAST_EPOCHS} epochs "
          f"(fast schedule) = {proj['fast']['ratio']:.1f}x  ({proj['fast']['naive_s']:.0f} s vs "
          f"{proj['fast']['cached_s']:.0f} s)")
    if args.tiny:
        print("(tiny models: the ratios above say nothing about the real cost; run without --tiny for that)")

    env["load_average_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at start {tuple(round(x, 2) for x in env['load_average_at_start'])}, at end "
          f"{tuple(round(x, 2) for x in env['load_average_at_end'])} on {os.cpu_count()} cores: above ~1 per core "
          "other work shared the machine and the figures are noisy")
    blob = {"command": " ".join(sys.argv), "environment": env, "tiny": args.tiny, "epochs": E,
            "resolution": args.resolution, "batch": BATCH, "images": n, "grid": {"t": GRID_T, "stages": GRID_STAGES},
            "cached": {**{k: v for k, v in cached.items() if k != "points"}, "extracted": res.extracted,
                       "point_seconds": {k: r["seconds"] for k, r in cached["points"].items()}},
            "naive": naive, "ratio_naive_over_cached": ratio, "calibration": {str(k): v for k, v in calib.items()},
            "projection": {"naive_epoch_s": naive_epoch, "naive_fixed_s": naive_fixed, "cached_epoch_s": slope,
                           "cached_fixed_s": cached_fixed, "cached_epoch_is_upper_bound": bool(bound), **proj}}
    (out / "bench_sweep.json").write_text(json.dumps(blob, indent=1, default=str) + "\n")
    print(json.dumps({"ratio_naive_over_cached": round(ratio, 2),
                      "projected_ratio_paper": round(proj["paper"]["ratio"], 2),
                      "projected_ratio_fast": round(proj["fast"]["ratio"], 2)}))


if __name__ == "__main__":
    main()
