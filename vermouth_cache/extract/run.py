"""`extract`: images -> captions -> text conditions -> latents -> one noised U-net pass per t -> store.

    vermouth-cache extract DATASET --store STORE --t 200 --stages mid,up

Shard by shard (shard = `shard_size` consecutive samples, sorted by id), each artifact is computed
only where its completion record is missing, and written whole before its record. Captions, text
conditions and latents do not depend on t or taps: a second t, or an extra tap, runs only the
U-net. An interrupted run, rerun, recomputes exactly the shards without records, giving the same
bytes an uninterrupted run gives.

Every shard is claimed before it is computed (`claims`), so several extractors, processes or
machines, may fill one store, even one entry, at once: each shard is computed by one of them and
the others skip it or wait for it. `--workers N` / `--scheduler ADDRESS` spread the shards over
dask.distributed workers (`cluster`).
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from vermouth_cache.extract import compute
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.samples import Dataset
from vermouth_cache.core.errors import ImageError, VermouthError
from vermouth_cache.core.hashing import recipe_key
from vermouth_cache.data.images import decode_image
from vermouth_cache.store.claims import Claims
from vermouth_cache.core.progress import Progress, get_logger
from vermouth_cache.models.loading import Captioner, Expert, Placement, StableDiffusion, resolve_device, resolve_precision
from vermouth_cache.extract.recipes import captions_recipe, expert_recipe, features_recipe, latents_recipe, text_recipe
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.store.arrays import STORAGE_DTYPES
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK
from vermouth_cache.models.taps import attn_taps_for, blocks_with_cross_attention

log = get_logger(__name__)

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
    shards: list[int] = field(default_factory=list)  # shards this call computed (not found done or done by others)
    waited_seconds: float = 0.0  # spent waiting for shards other writers held
    error_rate: float | None = None  # failed images / all, when --max-error-rate is set
    notes: list[str] = field(default_factory=list)  # decisions the log states (e.g. a shard size kept)


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
    notes: list[str] = field(default_factory=list)  # said in the log (a shard size taken from the store)


def _plan(req: ExtractRequest, ds: Dataset, make_entry, sd: StableDiffusion, captioner, expert,
          ds_key: str, shard_size_of=None) -> _Plan:
    """Every entry `req` needs, through `make_entry(kind, recipe, n_samples=, shard_size=, about=)`:
    `Store.entry` (creates them) for `extract`, a read-only lookup for `survey`.

    The entries of one plan are read shard by shard together (the U-net reads its shard's text
    and latents), so they share one shard size: that of the entries already stored
    (`shard_size_of(kind, key)` -> int or None), else the request's."""
    sd.check_timesteps(req.t)  # the scheduler and the U-net refuse before any entry is made
    sd.check_taps(req.block_taps)
    schedule = sd.schedule_recipe(req.noise)
    ident = ds.identity()
    n = len(ds)
    # the request travels in every manifest so that `repair` can recompute a bad shard
    about = {"dataset": ds.name, "dataset_record": ds_key, "n_samples": n, "request": req.to_json()}
    labels_key = recipe_key({"labels": [s.label for s in ds.samples], "classnames": list(ds.classnames)})
    cap_r = captions_recipe(req, ident, captioner_id=captioner.identity if captioner else None, labels_key=labels_key)
    txt_r = text_recipe(recipe_key(cap_r), tokenizer_id=sd.identity("tokenizer"),
                        text_encoder_id=sd.identity("text_encoder"), layer=req.text_layer)
    lat_r = latents_recipe(ident, vae_id=sd.identity("vae"), resolution=req.resolution)
    feat_rs = {t: features_recipe(req, t, latents_key=recipe_key(lat_r), text_key=recipe_key(txt_r),
                                  unet_id=sd.identity("unet"), schedule=schedule) for t in req.t}
    exp_r = None
    if expert is not None:
        exp_r = expert_recipe(req, ident, expert_id=expert.identity, image_stats=expert.image_stats)
    chain = [("captions", cap_r), ("text", txt_r), ("latents", lat_r), *(("features", r) for r in feat_rs.values())]
    chain += [("expert", exp_r)] if exp_r is not None else []
    size, note = chain_shard_size(req, n, [(kind, recipe_key(r)) for kind, r in chain], shard_size_of)

    cap_about = {**about, "prompt": req.prompt, "captioner": req.captioner if captioner else None,
                 "uses_label": req.prompt == "classname"}
    cap = make_entry("captions", cap_r, n_samples=n, shard_size=size, about=cap_about)
    txt = make_entry("text", txt_r, n_samples=n, shard_size=size,
                      about={**cap_about, "sd_model": req.sd_model, "text_layer": req.text_layer})
    lat = make_entry("latents", lat_r, n_samples=n, shard_size=size,
                      about={**about, "sd_model": req.sd_model, "resolution": req.resolution})
    attn_taps = ()
    if req.attn_maps:
        attn_taps = attn_taps_for(blocks_with_cross_attention(sd.unet_skeleton), req.attn_maps)
    taps = req.block_taps + attn_taps
    feats = {}
    for t, r in feat_rs.items():
        feats[t] = make_entry("features", r, n_samples=n, shard_size=size, about={
            **cap_about, "sd_model": req.sd_model, "t": t, "resolution": req.resolution, "noise": req.noise,
            "text_layer": req.text_layer, "dtype": req.dtype, "captions": cap.key, "text": txt.key,
            "latents": lat.key})
    exp = None
    if exp_r is not None:
        exp = make_entry("expert", exp_r, n_samples=n, shard_size=size, about={
            **about, "expert": req.expert, "model": expert.spec, "resolution": req.resolution, "dtype": req.dtype})
    return _Plan(cap, txt, lat, feats, taps, exp, [note] if note else [])


def chain_shard_size(req: ExtractRequest, n: int, chain: list[tuple[str, str]], shard_size_of) -> tuple[int, str | None]:
    """(shard size of every entry of the plan, a note for the log or None). Entries already stored
    fix it; stored entries that disagree (made by an older vermouth-cache) are refused, naming them."""
    asked = min(req.shard_size, n)  # a small dataset gets one chunk of its own size, not a padded one
    have = {}
    if shard_size_of is not None:
        for kind, key in chain:
            size = shard_size_of(kind, key)
            if size is not None:
                have[f"{kind}/{key[:12]}"] = size
    sizes = sorted(set(have.values()))
    if not sizes:
        return asked, None
    if len(sizes) > 1:
        first = next(iter(have.values()))  # the most upstream stored entry
        odd = [p for p, s in have.items() if s != first]
        raise VermouthError(
            "the stored entries this request reads and writes have different shard sizes ("
            + ", ".join(f"{p}: {s}" for p, s in have.items()) + "), so their shards cannot be computed together; "
            f"remove {', '.join(odd)} (`vermouth-cache gc --entry {odd[0]}`) and extract again")
    size = sizes[0]
    if size == asked:
        return size, None
    upstream = next(iter(have))
    return size, (f"shard size {size} kept: the entries of this dataset already stored ({upstream} ...) use it, "
                  f"and every entry of one extraction shares one (asked {req.shard_size})")


def _stored_shard_size(store: Store, kind: str, key: str) -> int | None:
    if not store.loc.exists(f"{kind}/{key}/manifest.json"):
        return None
    return Entry(store.loc, kind, key).shard_size


def plan_keys(plan: _Plan) -> dict:
    """The plan as entry keys: what a worker on another process or machine needs to rebuild it."""
    return {"captions": plan.captions.key, "text": plan.text.key, "latents": plan.latents.key,
            "features": {t: e.key for t, e in plan.features.items()}, "taps": list(plan.taps),
            "expert": plan.expert.key if plan.expert else None}


def plan_from_keys(store: Store, keys: dict) -> _Plan:
    loc = store.loc
    return _Plan(Entry(loc, "captions", keys["captions"]), Entry(loc, "text", keys["text"]),
                 Entry(loc, "latents", keys["latents"]),
                 {int(t): Entry(loc, "features", k) for t, k in keys["features"].items()}, tuple(keys["taps"]),
                 Entry(loc, "expert", keys["expert"]) if keys["expert"] else None)


def _arrays_of(plan: _Plan) -> list[tuple[str, Entry, str]]:
    """(need key, entry, array) of every array the plan writes, upstream first."""
    out = [("captions", plan.captions, CAPTIONS), ("text", plan.text, TEXT), ("latents", plan.latents, LATENTS)]
    if plan.expert is not None:
        out += [("expert", plan.expert, name) for name in EXPERT_LEVELS]
    out += [(("features", t), e, tp) for t, e in plan.features.items() for tp in plan.taps]
    return out


def _need_from(plan: _Plan, shard: int, done, only: dict | None) -> dict | None:
    """What shard `shard` still needs; `done(entry, array, shard)` says what is committed. With
    `only` ({entry prefix: {array: shards}}, a repair), just those, plus the upstream they read."""
    def wanted(entry: Entry, name: str) -> bool:
        if done(entry, name, shard):
            return False
        return only is None or shard in only.get(entry.prefix, {}).get(name, ())

    feats = {t: [tp for tp in plan.taps if wanted(e, tp)] for t, e in plan.features.items()}
    need = {
        "captions": wanted(plan.captions, CAPTIONS),
        "text": wanted(plan.text, TEXT),
        "latents": wanted(plan.latents, LATENTS),
        "expert": plan.expert is not None and any(wanted(plan.expert, n) for n in EXPERT_LEVELS),
        "features": {t: v for t, v in feats.items() if v},
    }
    if only is not None:  # the U-net reads conditions and latents, the text encoder reads captions
        if need["features"]:
            need["text"] = need["text"] or not done(plan.text, TEXT, shard)
            need["latents"] = need["latents"] or not done(plan.latents, LATENTS, shard)
        if need["text"]:
            need["captions"] = need["captions"] or not done(plan.captions, CAPTIONS, shard)
    return need if any(need.values()) else None


def _missing(plan: _Plan, only: dict | None = None) -> dict[int, dict]:
    """Per shard, what is missing: {"captions": bool, ..., "features": {t: [taps]}}; one listing per array."""
    listed = {(e.prefix, name): e.done_shards(name) for _, e, name in _arrays_of(plan)}
    out = {}
    for shard in range(plan.captions.n_shards):
        need = _need_from(plan, shard, lambda e, name, s: s in listed[(e.prefix, name)], only)
        if need:
            out[shard] = need
    return out


def shard_need(plan: _Plan, shard: int, only: dict | None = None) -> dict | None:
    """What one shard needs, looked up afresh (another writer may have committed parts of it)."""
    return _need_from(plan, shard, lambda e, name, s: e.loc.exists(e.record_key(name, s)), only)


def _writes(plan: _Plan, need: dict) -> list[Entry]:
    """The entries a shard's work writes into, so the ones to claim."""
    out = [e for k, e in (("captions", plan.captions), ("text", plan.text), ("latents", plan.latents),
                          ("expert", plan.expert)) if need[k]]
    return out + [plan.features[t] for t in need["features"]]


def _decode(samples) -> list:
    """Decoded images, or ImageError objects in place of the ones that fail."""
    def one(s):
        try:
            return decode_image(s.path, s.id)
        except ImageError as exc:
            return exc
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, samples))


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


@dataclass
class Models:
    """The frozen models of one extraction, each loaded on first use."""
    sd: StableDiffusion
    captioner: Captioner | None
    expert: Expert | None
    placement: Placement

    @classmethod
    def of(cls, req: ExtractRequest, device=None) -> "Models":
        device = device if device is not None else resolve_device(req.device)
        placement = Placement(device, resolve_precision(req.precision, device))
        return cls(StableDiffusion(req.sd_model, placement),
                   Captioner(req.captioner, placement) if req.prompt == "blip" else None,
                   Expert(req.expert, req.expert_model, placement) if req.expert else None, placement)


class ShardRunner:
    """Computes shards of one extraction under claims: the single-process loop and every dask
    task both go through `run`, so what a shard's bytes are never depends on who computed it."""

    def __init__(self, req: ExtractRequest, samples_of, plan: _Plan, models: Models, claims: Claims,
                 only: dict | None = None):
        """`samples_of(shard)`: that shard's samples (all of them in this process, or a dask task's)."""
        self.req, self.samples_of, self.plan, self.models, self.claims = req, samples_of, plan, models, claims
        self.only = only
        self.batch = compute.call_size(models.placement.device, req.batch_size)
        self.run_facts = models.placement.describe()
        if models.placement.device.type == "cpu":
            self.run_facts["cpu_threads"] = req.cpu_threads

    def run(self, shard: int, report: ExtractReport) -> str:
        """"done" (computed here), "nothing" (already committed), "busy" (a live writer holds a
        part of it) or "lost" (taken over while computing: the taker commits it)."""
        need = shard_need(self.plan, shard, self.only)
        if not need:
            return "nothing"
        held = []
        try:
            for entry in _writes(self.plan, need):
                claim = self.claims.acquire(entry.prefix, shard)
                if claim is None:
                    return "busy"
                held.append(claim)
            need = shard_need(self.plan, shard, self.only)  # committed by a writer that just released it?
            if not need:
                return "nothing"

            def guard():
                if not all(self.claims.held(c) for c in held):
                    raise LostClaim(shard)

            _extract_shard(self.req, self.samples_of(shard), self.plan, self.models, shard, need, self.batch, self.run_facts,
                           report, guard)
            report.shards.append(shard)
            return "done"
        except LostClaim:
            return "lost"
        finally:
            for c in held:
                self.claims.release(c)


class LostClaim(Exception):
    """Our claim on a shard was taken over (we stalled past its expiry): do not commit."""


def extract(req: ExtractRequest, *, only: dict | None = None) -> ExtractReport:
    """Compute every missing artifact of `req` into its store; the Python API of `extract`.

    `req.workers` / `req.scheduler` spread the shards over dask.distributed workers (see
    `cluster`); otherwise this process computes them. Either way every shard is claimed first, so
    several extractors may work on one store at once. `only` restricts the work to the given
    shards of the given arrays (`repair`).
    """
    wall0 = time.perf_counter()
    ds = load_dataset(req.dataset, image_root=req.image_root, split=req.split, shots=req.shots,
                      shot_seed=req.shot_seed, layout=req.layout)
    models = Models.of(req)  # refuses an unsupported SD model before the store is touched
    store = Store(req.store, create=True)
    ds_key = store.put_dataset(dataset_record(ds))
    plan = _plan(req, ds, store.entry, models.sd, models.captioner, models.expert, ds_key,
                 shard_size_of=lambda kind, key: _stored_shard_size(store, kind, key))
    report = ExtractReport(
        store=str(store.root),
        dataset={"name": ds.name, "n_samples": len(ds), "identity": ds.identity(), "record": ds_key},
        entries={"captions": plan.captions.key, "text": plan.text.key, "latents": plan.latents.key,
                 **{f"features t={t}": e.key for t, e in plan.features.items()},
                 **({"expert": plan.expert.key} if plan.expert else {})},
    )
    report.notes = list(plan.notes)
    for _, entry, _ in _arrays_of(plan):
        entry.touch()
    if only is not None:
        _invalidate(plan, only)
    todo = _missing(plan, only)
    log.debug(f"store {store.root}: {ds.name}, {len(ds)} samples, {plan.captions.n_shards} shard(s) of "
              f"{plan.captions.shard_size}; {len(todo)} to compute; entries "
              + ", ".join(f"{name} {key}" for name, key in report.entries.items()))
    # CPU kernels round differently with another thread count: fix it for every process and worker
    req = req.with_(cpu_threads=req.cpu_threads or os.cpu_count() or 1)
    if todo and (req.workers or req.scheduler):
        from vermouth_cache.extract.cluster import extract_on_cluster

        extract_on_cluster(req, ds, plan, todo, report, only)
    elif todo:
        with compute.torch_threads(req.cpu_threads if models.placement.device.type == "cpu" else None):
            _extract_here(req, ds, store, plan, models, todo, report, only)
    sweeper = Claims(store.loc)  # claims left by writers killed after their last commit
    for prefix in dict.fromkeys(e.prefix for _, e, _ in _arrays_of(plan)):
        sweeper.remove_dead(prefix)
    report.wall_seconds = time.perf_counter() - wall0
    _check_error_rate(req, plan, ds, report)
    return report


def _extract_here(req, ds, store: Store, plan: _Plan, models: Models, todo: dict, report: ExtractReport,
                  only: dict | None) -> None:
    claims = Claims(store.loc)
    runner = ShardRunner(req, lambda s: ds.samples[slice(*plan.captions.shard_bounds(s))], plan, models, claims,
                         only)
    pending = sorted(todo)
    size = {s: min(len(ds), (s + 1) * plan.captions.shard_size) - s * plan.captions.shard_size for s in pending}
    bar = Progress(f"extract {ds.name}", sum(size.values()), "img", enabled=req.progress)
    try:
        with claims.heartbeat():
            while pending:
                busy = []
                for shard in pending:
                    outcome = runner.run(shard, report)
                    if outcome in ("busy", "lost"):
                        busy.append(shard)
                    else:
                        bar.update(size[shard])
                if busy:  # other writers hold them: come back when they are done (or dead)
                    bar.set_description(f"extract {ds.name} (waiting for {len(busy)} shard(s) other writers hold)")
                    report.waited_seconds += wait_poll(claims.ttl)
                pending = busy
    finally:
        bar.close()


def _invalidate(plan: _Plan, only: dict) -> None:
    """Forget the shards `only` names, after checking that this request still makes their entries."""
    entries = {e.prefix: e for _, e, _ in _arrays_of(plan)}
    for prefix, arrays in only.items():
        if prefix not in entries:
            raise VermouthError(f"cannot recompute {prefix}: its request now makes other entries "
                                f"({', '.join(sorted(entries))}); the images or models it was made from have changed")
        for name, shards in arrays.items():
            for shard in shards:
                entries[prefix].invalidate(name, shard)


def wait_poll(ttl: float) -> float:
    pause = min(2.0, ttl / 4)
    time.sleep(pause)
    return pause


def _check_error_rate(req: ExtractRequest, plan: _Plan, ds, report: ExtractReport) -> None:
    """--max-error-rate: the share of images that could not be used, over the whole dataset."""
    if req.max_error_rate is None:
        return
    status = plan.captions.statuses(CAPTIONS)
    for other in (plan.latents.statuses(LATENTS),):
        status = [a if a != OK else b for a, b in zip(status, other)]
    bad = [(ds.samples[i].id, s) for i, s in enumerate(status) if s not in (OK, None)]
    rate = len(bad) / max(1, len(ds))
    report.error_rate = rate
    if rate > req.max_error_rate:
        shown = "; ".join(f"{sid}: {why.removeprefix('error: ')}" for sid, why in bad[:5])
        raise VermouthError(f"{len(bad)} of {len(ds)} images of {ds.name} failed ({rate:.1%} > --max-error-rate "
                            f"{req.max_error_rate:.1%}); each is recorded in the store with its reason, the rest "
                            f"is extracted. First: {shown}")


def _write(entry: Entry, name: str, shard: int, ok_index: list[int], n: int, status: list[str],
           data: np.ndarray | None, run: dict, dtype: str, guard) -> None:
    """Scatter the ok samples' rows into a NaN-filled shard block and write it whole."""
    full = None
    if data is not None and len(ok_index):
        entry.ensure_array(name, tuple(data.shape[1:]), dtype)
        full = np.full((n, *data.shape[1:]), np.nan, dtype=np.float32)
        full[ok_index] = data
    entry.write_shard(name, shard, status, data=full, run=run, before_commit=guard)


def _extract_shard(req, samples, plan: _Plan, models: Models, shard: int, need: dict, batch: int,
                   run: dict, report: ExtractReport, guard) -> None:
    start, stop = plan.captions.shard_bounds(shard)
    ids = [s.id for s in samples]
    n = len(samples)
    sd, captioner, expert = models.sd, models.captioner, models.expert
    need_images = need["latents"] or need["expert"] or (need["captions"] and req.prompt == "blip")
    status = [OK] * n
    images = [None] * n
    if need_images:
        with _Stage(report, "decode", n):
            images = _decode(samples)
        for i, img in enumerate(images):
            if isinstance(img, ImageError):
                if req.on_error == "fail" and req.max_error_rate is None:
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
        plan.captions.write_shard(CAPTIONS, shard, status, values=values, run=step.run(run), before_commit=guard)

    def upstream(entry: Entry, name: str) -> np.ndarray | None:
        r = entry.record(name, shard)
        for i, s in enumerate(r.status):
            if s != OK and status[i] == OK:
                status[i] = s
        ok = [i for i in range(n) if status[i] == OK]
        return entry.read(name, [start + i for i in ok]) if ok else None

    f32 = "float32"
    if need["text"]:
        rec = plan.captions.record(CAPTIONS, shard)
        status = [s if s != OK else c for s, c in zip(status, rec.status)]  # carry caption failures
        _compute_shard(report, plan.text, [TEXT], "text", shard, status, run, f32, guard, lambda ok: {
            TEXT: compute.text_conditions(sd, [rec.values[i] for i in ok], layer=req.text_layer, batch=batch)})
    if need["latents"]:
        _compute_shard(report, plan.latents, [LATENTS], "vae", shard, status, run, f32, guard, lambda ok: {
            LATENTS: compute.vae_latents(sd, [images[i] for i in ok], resolution=req.resolution, batch=batch)})
    dtype = STORAGE_DTYPES[req.dtype]
    if need["expert"]:
        _compute_shard(report, plan.expert, EXPERT_LEVELS, "expert", shard, status, run, dtype, guard, lambda ok:
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
        _compute_shard(report, plan.features[t], taps, "unet", shard, status, run, dtype, guard,
                       lambda ok, t=t, taps=taps:
                       compute.unet_features(sd, lat, text, [ids[i] for i in ok], t=t, taps=taps, noise=req.noise,
                                             seed=req.seed, draws=req.noise_draws,
                                             inversion_steps=req.inversion_steps, batch=batch),
                       passes=req.noise_draws)


def _compute_shard(report: ExtractReport, entry: Entry, names: list[str], step_name: str, shard: int,
                   status: list[str], run: dict, dtype: str, guard, fn, passes: int = 1) -> None:
    """fn(ok indices) -> {array name: rows of those samples}; then each array's shard is written
    whole, failed samples NaN, with a record (even when every sample failed)."""
    n = len(status)
    ok = [i for i in range(n) if status[i] == OK]
    with _Stage(report, step_name, len(ok) * passes) as step:
        arrays = fn(ok) if ok else {}
    with _Stage(report, "write"):
        for name in names:
            _write(entry, name, shard, ok, n, list(status), arrays.get(name), step.run(run), dtype, guard)
