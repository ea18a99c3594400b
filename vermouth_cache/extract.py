"""`extract`: images -> captions -> text conditions -> latents -> one noised U-net pass per t -> store.

    vermouth-cache extract DATASET --store STORE --t 200 --stages mid,up

Shard by shard (shard = `shard_size` consecutive samples, sorted by id), each artifact is computed
only where its completion record is missing, and written whole before its record. Captions, text
conditions and latents do not depend on t or taps: a second t, or an extra tap, runs only the
U-net. An interrupted run, rerun, recomputes exactly the shards without records, giving the same
bytes an uninterrupted run gives.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from . import compute
from .datasets import Dataset, load_dataset
from .errors import ImageError, VermouthError
from .hashing import recipe_key
from .images import decode_image
from .models import Captioner, Expert, Placement, StableDiffusion, resolve_device, resolve_precision
from .recipes import captions_recipe, expert_recipe, features_recipe, latents_recipe, text_recipe
from .request import ExtractRequest
from .store import OK, STORAGE_DTYPES, Entry, Store
from .unet_taps import attn_taps_for, blocks_with_cross_attention

CAPTIONS, TEXT, LATENTS = "captions", "cond", "latent"
EXPERT_LEVELS = [f"expert.level{i}" for i in range(4)]


@dataclass
class ExtractReport:
    store: str
    dataset: dict
    entries: dict[str, str]
    computed: Counter = field(default_factory=Counter)  # samples through each model
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    failed: dict[str, str] = field(default_factory=dict)  # sample id -> reason
    wall_seconds: float = 0.0


def dataset_record(ds: Dataset) -> dict:
    return {
        "name": ds.name,
        "identity": ds.identity(),
        "ids": [s.id for s in ds.samples],
        "labels": [s.label for s in ds.samples],
        "classnames": list(ds.classnames),
        "source": ds.source,
    }


@dataclass
class _Plan:
    captions: Entry
    text: Entry
    latents: Entry
    features: dict[int, Entry]
    taps: tuple[str, ...]
    expert: Entry | None


def _plan(req: ExtractRequest, ds: Dataset, make_entry, sd: StableDiffusion, captioner, expert,
          ds_key: str) -> _Plan:
    """Every entry `req` needs, through `make_entry(kind, recipe, n_samples=, shard_size=, about=)`:
    `Store.entry` (creates them) for `extract`, a read-only lookup for `survey`."""
    ident = ds.identity()
    n = len(ds)
    size = min(req.shard_size, n)  # a small dataset gets one chunk of its own size, not a padded one
    about = {"dataset": ds.name, "dataset_record": ds_key, "n_samples": n}
    labels_key = recipe_key({"labels": [s.label for s in ds.samples], "classnames": list(ds.classnames)})
    cap_r = captions_recipe(req, ident, captioner_id=captioner.identity if captioner else None, labels_key=labels_key)
    cap_about = {**about, "prompt": req.prompt, "captioner": req.captioner if captioner else None,
                 "uses_label": req.prompt == "classname"}
    cap = make_entry("captions", cap_r, n_samples=n, shard_size=size, about=cap_about)
    txt_r = text_recipe(cap.key, tokenizer_id=sd.identity("tokenizer"), text_encoder_id=sd.identity("text_encoder"),
                        layer=req.text_layer)
    txt = make_entry("text", txt_r, n_samples=n, shard_size=size,
                      about={**cap_about, "sd_model": req.sd_model, "text_layer": req.text_layer})
    lat_r = latents_recipe(ident, vae_id=sd.identity("vae"), resolution=req.resolution)
    lat = make_entry("latents", lat_r, n_samples=n, shard_size=size,
                      about={**about, "sd_model": req.sd_model, "resolution": req.resolution})
    attn_taps = ()
    if req.attn_maps:
        attn_taps = attn_taps_for(blocks_with_cross_attention(sd.unet_skeleton), req.attn_maps)
    taps = req.block_taps + attn_taps
    feats = {}
    for t in req.t:
        r = features_recipe(req, t, latents_key=lat.key, text_key=txt.key, unet_id=sd.identity("unet"),
                            schedule=sd.schedule_recipe())
        feats[t] = make_entry("features", r, n_samples=n, shard_size=size, about={
            **cap_about, "sd_model": req.sd_model, "t": t, "resolution": req.resolution, "noise": req.noise,
            "text_layer": req.text_layer, "dtype": req.dtype, "captions": cap.key, "text": txt.key,
            "latents": lat.key})
    exp = None
    if expert is not None:
        r = expert_recipe(req, ident, expert_id=expert.identity, image_stats=expert.image_stats)
        exp = make_entry("expert", r, n_samples=n, shard_size=size, about={
            **about, "expert": req.expert, "model": expert.spec, "resolution": req.resolution, "dtype": req.dtype})
    return _Plan(cap, txt, lat, feats, taps, exp)


def _missing(plan: _Plan) -> dict[int, dict]:
    """Per shard, what is missing: {"captions": bool, ..., "features": {t: [taps]}}."""
    done = {
        "captions": plan.captions.done_shards(CAPTIONS),
        "text": plan.text.done_shards(TEXT),
        "latents": plan.latents.done_shards(LATENTS),
    }
    feat_done = {(t, tp): e.done_shards(tp) for t, e in plan.features.items() for tp in plan.taps}
    exp_done = {}
    if plan.expert is not None:
        exp_done = {name: plan.expert.done_shards(name) for name in EXPERT_LEVELS}
    out = {}
    for shard in range(plan.captions.n_shards):
        feats = {t: [tp for tp in plan.taps if shard not in feat_done[(t, tp)]] for t in plan.features}
        feats = {t: v for t, v in feats.items() if v}
        need = {
            "captions": shard not in done["captions"],
            "text": shard not in done["text"],
            "latents": shard not in done["latents"],
            "expert": any(shard not in d for d in exp_done.values()),
            "features": feats,
        }
        if any(need.values()):
            out[shard] = need
    return out


def _decode(samples) -> list:
    """Decoded images, or ImageError objects in place of the ones that fail."""
    def one(s):
        try:
            return decode_image(s.path, s.id)
        except ImageError as exc:
            return exc
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, samples))


def _write(entry: Entry, name: str, shard: int, ok_index: list[int], n: int, status: list[str],
           data: np.ndarray | None, run: dict, dtype: str) -> None:
    """Scatter the ok samples' rows into a NaN-filled shard block and write it whole."""
    full = None
    if data is not None and len(ok_index):
        entry.ensure_array(name, tuple(data.shape[1:]), dtype)
        full = np.full((n, *data.shape[1:]), np.nan, dtype=np.float32)
        full[ok_index] = data
    entry.write_shard(name, shard, status, data=full, run=run)


class _Stage:
    """Accumulates seconds and sample counts for one named step."""

    def __init__(self, report: ExtractReport, name: str, n: int = 0):
        self.report, self.name, self.n = report, name, n

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.report.seconds[self.name] += self.seconds
        self.report.computed[self.name] += self.n

    def run(self, base: dict) -> dict:
        """The shard record's run facts: device and precision, plus this step's seconds."""
        return {**base, "step": self.name, "seconds": round(self.seconds, 4)}


def extract(req: ExtractRequest) -> ExtractReport:
    """Compute every missing artifact of `req` into its store; the Python API of `extract`."""
    wall0 = time.perf_counter()
    ds = load_dataset(req.dataset, image_root=req.image_root, split=req.split, shots=req.shots,
                      shot_seed=req.shot_seed, layout=req.layout)
    store = Store(req.store, create=True)
    device = resolve_device(req.device)
    placement = Placement(device, resolve_precision(req.precision, device))
    sd = StableDiffusion(req.sd_model, placement)
    captioner = Captioner(req.captioner, placement) if req.prompt == "blip" else None
    expert = Expert(req.expert, req.expert_model, placement) if req.expert else None
    ds_key = store.put_dataset(dataset_record(ds))
    plan = _plan(req, ds, store.entry, sd, captioner, expert, ds_key)
    report = ExtractReport(
        store=str(store.root),
        dataset={"name": ds.name, "n_samples": len(ds), "identity": ds.identity(), "record": ds_key},
        entries={"captions": plan.captions.key, "text": plan.text.key, "latents": plan.latents.key,
                 **{f"features t={t}": e.key for t, e in plan.features.items()},
                 **({"expert": plan.expert.key} if plan.expert else {})},
    )
    todo = _missing(plan)
    batch = compute.call_size(device, req.batch_size)
    run = placement.describe()
    n_todo = sum(min(len(ds), (s + 1) * req.shard_size) - s * req.shard_size for s in todo)
    bar = tqdm(total=n_todo, unit="img", desc=f"extract {ds.name}", disable=not req.progress, leave=False)
    try:
        for shard, need in todo.items():
            _extract_shard(req, ds, plan, sd, captioner, expert, shard, need, batch, run, report)
            bar.update(plan.captions.shard_bounds(shard)[1] - plan.captions.shard_bounds(shard)[0])
    finally:
        bar.close()
    report.wall_seconds = time.perf_counter() - wall0
    return report


def _extract_shard(req, ds, plan: _Plan, sd, captioner, expert, shard: int, need: dict, batch: int,
                   run: dict, report: ExtractReport) -> None:
    start, stop = plan.captions.shard_bounds(shard)
    samples = ds.samples[start:stop]
    ids = [s.id for s in samples]
    n = len(samples)
    need_images = need["latents"] or need["expert"] or (need["captions"] and req.prompt == "blip")
    status = [OK] * n
    images = [None] * n
    if need_images:
        with _Stage(report, "decode", n):
            images = _decode(samples)
        for i, img in enumerate(images):
            if isinstance(img, ImageError):
                if req.on_error == "fail":
                    raise VermouthError(f"{img} (shard {shard}; use --on-error skip to record it and go on)")
                status[i] = f"error: {img.reason}"
                report.failed[img.sample_id] = img.reason

    # captions: per-sample strings kept in the shard record
    if need["captions"]:
        ok = [i for i in range(n) if status[i] == OK]
        with _Stage(report, "caption", len(ok) if req.prompt == "blip" else 0) as step:
            if req.prompt == "blip":
                caps = compute.blip_captions(captioner, [images[i] for i in ok], prefix=req.caption_prefix,
                                             min_new=req.caption_min_tokens, max_new=req.caption_max_tokens,
                                             batch=batch)
            else:
                caps = compute.fixed_prompts(req.prompt, [ids[i] for i in ok],
                                             [samples[i].classname for i in ok], req.seed)
        values = [None] * n
        for i, c in zip(ok, caps):
            values[i] = c
        plan.captions.write_shard(CAPTIONS, shard, status, values=values, run=step.run(run))
    rec = plan.captions.record(CAPTIONS, shard)
    captions = rec.values
    status = [s if s != OK else c for s, c in zip(status, rec.status)]  # carry caption failures

    def upstream(entry: Entry, name: str) -> np.ndarray | None:
        r = entry.record(name, shard)
        for i, s in enumerate(r.status):
            if s != OK and status[i] == OK:
                status[i] = s
        ok = [i for i in range(n) if status[i] == OK]
        return entry.read(name, [start + i for i in ok]) if ok else None

    f32 = "float32"
    if need["text"]:
        _compute_shard(report, plan.text, [TEXT], "text", shard, status, run, f32, lambda ok: {
            TEXT: compute.text_conditions(sd, [captions[i] for i in ok], layer=req.text_layer, batch=batch)})
    if need["latents"]:
        _compute_shard(report, plan.latents, [LATENTS], "vae", shard, status, run, f32, lambda ok: {
            LATENTS: compute.vae_latents(sd, [images[i] for i in ok], resolution=req.resolution, batch=batch)})
    dtype = STORAGE_DTYPES[req.dtype]
    if need["expert"]:
        _compute_shard(report, plan.expert, EXPERT_LEVELS, "expert", shard, status, run, dtype, lambda ok:
                       compute.expert_features(expert, [images[i] for i in ok], resolution=req.resolution,
                                               batch=batch))
    if not need["features"]:
        return
    # the U-net always reads conditions and latents back from the store, so a value computed in
    # this run and one computed in an earlier run are the same float32 bytes
    with _Stage(report, "read"):
        text = upstream(plan.text, TEXT)
        lat = upstream(plan.latents, LATENTS)
    for t, taps in need["features"].items():
        _compute_shard(report, plan.features[t], taps, "unet", shard, status, run, dtype, lambda ok, t=t, taps=taps:
                       compute.unet_features(sd, lat, text, [ids[i] for i in ok], t=t, taps=taps, noise=req.noise,
                                             seed=req.seed, draws=req.noise_draws,
                                             inversion_steps=req.inversion_steps, batch=batch),
                       passes=req.noise_draws)


def _compute_shard(report: ExtractReport, entry: Entry, names: list[str], step_name: str, shard: int,
                   status: list[str], run: dict, dtype: str, fn, passes: int = 1) -> None:
    """fn(ok indices) -> {array name: rows of those samples}; then each array's shard is written
    whole, failed samples NaN, with a record (even when every sample failed)."""
    n = len(status)
    ok = [i for i in range(n) if status[i] == OK]
    with _Stage(report, step_name, len(ok) * passes) as step:
        arrays = fn(ok) if ok else {}
    with _Stage(report, "write"):
        for name in names:
            _write(entry, name, shard, ok, n, list(status), arrays.get(name), step.run(run), dtype)
