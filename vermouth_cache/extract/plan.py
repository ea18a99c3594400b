"""The plan of an extraction: every entry a request reads and writes, and what each shard still needs.

    plan = make_plan(req, ds, store.entry, sd, captioner, expert, ds_key)
    todo = missing(plan)            # {shard: {"captions": bool, ..., "features": {t: [taps]}}}

`extract` makes the entries (`Store.entry`), `survey` only looks them up; both read the same
recipes, so a dry run names the keys a real run writes. A plan travels to dask workers as its
entry keys (`plan_keys`, `plan_from_keys`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import recipe_key
from vermouth_cache.data.samples import Dataset
from vermouth_cache.data.views import check_views_fit, view_geometry
from vermouth_cache.extract.recipes import captions_recipe, expert_recipe, features_recipe, latents_recipe, text_recipe
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.methods import method_named
from vermouth_cache.methods.conditioning import conditioning_of
from vermouth_cache.models.pipeline import StableDiffusion
from vermouth_cache.models.taps import blocks_with_cross_attention
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry

CAPTIONS, TEXT, LATENTS = "captions", "cond", "latent"
EXPERT_LEVELS = [f"expert.level{i}" for i in range(4)]


def labels_key(ds: Dataset) -> str:
    """What texts made from the labels depend on: labels and class names, and each sample's own
    sentence when the dataset has them (what --prompt sentence reads)."""
    labels = {"labels": [s.label for s in ds.samples], "classnames": list(ds.classnames)}
    if any(s.text is not None for s in ds.samples):
        labels["texts"] = [s.text for s in ds.samples]
    return recipe_key(labels)


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
class Plan:
    """The entries one request reads and writes, and the taps its features hold."""
    captions: Entry
    text: Entry
    latents: Entry
    features: dict[int, Entry]
    taps: tuple[str, ...]
    expert: Entry | None
    notes: list[str] = field(default_factory=list)  # said in the log (a shard size taken from the store)


def make_plan(req: ExtractRequest, ds: Dataset, make_entry, sd: StableDiffusion, captioner, expert,
              ds_key: str, shard_size_of=None) -> Plan:
    """Every entry `req` needs, through `make_entry(kind, recipe, n_samples=, shard_size=, about=)`:
    `Store.entry` (creates them) for `extract`, a read-only lookup for `survey`.

    The entries of one plan are read shard by shard together (the U-net reads its shard's text
    and latents), so they share one shard size: that of the entries already stored
    (`shard_size_of(kind, key)` -> int or None), else the request's."""
    method = method_named(req.method)
    sd.check_timesteps(req.t)  # the scheduler and the U-net refuse before any entry is made
    sd.check_taps(req.block_taps)
    conditioning_of(req.prompt).check(req, sd, ds.samples)  # e.g. a context table the U-net cannot attend to
    schedule = sd.schedule_recipe(req.noise)
    ident = ds.identity()
    n = len(ds)
    views = view_geometry(ds.samples)  # a dataset of views: crops named in the ids (data/views.py)
    check_views_fit(ds.samples, req.resolution)
    # the request travels in every manifest so that `repair` can recompute a bad shard
    about = {"dataset": ds.name, "dataset_record": ds_key, "n_samples": n, "request": req.to_json()}
    labels = labels_key(ds)
    cap_r = captions_recipe(req, ident, captioner_id=captioner.identity if captioner else None, labels_key=labels)
    txt_r = text_recipe(recipe_key(cap_r), tokenizer_id=sd.identity("tokenizer"),
                        text_encoder_id=sd.identity("text_encoder"), layer=req.text_layer, tokens=req.text_tokens)
    lat_r = latents_recipe(ident, vae_id=sd.identity("vae"), resolution=req.resolution, rule=method.latent,
                           views=views)
    feat_rs = {t: features_recipe(req, method, t, latents_key=recipe_key(lat_r), text_key=recipe_key(txt_r),
                                  unet_id=sd.identity("unet"), schedule=schedule) for t in req.t}
    exp_r = None
    if expert is not None:
        exp_r = expert_recipe(req, ident, expert_id=expert.identity, image_stats=expert.image_stats, views=views)
    chain = [("captions", cap_r), ("text", txt_r), ("latents", lat_r), *(("features", r) for r in feat_rs.values())]
    chain += [("expert", exp_r)] if exp_r is not None else []
    size, note = chain_shard_size(req, n, [(kind, recipe_key(r)) for kind, r in chain], shard_size_of)

    cap_about = {**about, "prompt": req.prompt, "captioner": req.captioner if captioner else None,
                 "uses_label": conditioning_of(req.prompt).uses_label,
                 **({"table": cap_r["prompt"]["table"]} if "table" in cap_r["prompt"] else {})}  # `ls` shows it
    cap = make_entry("captions", cap_r, n_samples=n, shard_size=size, about=cap_about)
    txt = make_entry("text", txt_r, n_samples=n, shard_size=size,
                      about={**cap_about, "sd_model": req.sd_model, "text_layer": req.text_layer})
    lat = make_entry("latents", lat_r, n_samples=n, shard_size=size,
                      about={**about, "sd_model": req.sd_model, "resolution": req.resolution})
    attn_taps = ()
    if req.attn_maps:
        attn_taps = method.attention.taps(req.attn_maps, blocks_with_cross_attention(sd.unet_skeleton))
    taps = req.block_taps + attn_taps
    feats = {}
    for t, r in feat_rs.items():
        feats[t] = make_entry("features", r, n_samples=n, shard_size=size, about={
            **cap_about, "sd_model": req.sd_model, "method": method.name, "merge": method.merge, "t": t,
            "resolution": req.resolution, "noise": req.noise,
            "text_layer": req.text_layer, "dtype": req.dtype, "captions": cap.key, "text": txt.key,
            "latents": lat.key})
    exp = None
    if exp_r is not None:
        exp = make_entry("expert", exp_r, n_samples=n, shard_size=size, about={
            **about, "expert": req.expert, "model": expert.spec, "resolution": req.resolution, "dtype": req.dtype})
    return Plan(cap, txt, lat, feats, taps, exp, [note] if note else [])


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


def stored_shard_size(store: Store, kind: str, key: str) -> int | None:
    if not store.loc.exists(f"{kind}/{key}/manifest.json"):
        return None
    return Entry(store.loc, kind, key).shard_size


def plan_keys(plan: Plan) -> dict:
    """The plan as entry keys: what a worker on another process or machine needs to rebuild it."""
    return {"captions": plan.captions.key, "text": plan.text.key, "latents": plan.latents.key,
            "features": {t: e.key for t, e in plan.features.items()}, "taps": list(plan.taps),
            "expert": plan.expert.key if plan.expert else None}


def plan_from_keys(store: Store, keys: dict) -> Plan:
    loc = store.loc
    return Plan(Entry(loc, "captions", keys["captions"]), Entry(loc, "text", keys["text"]),
                 Entry(loc, "latents", keys["latents"]),
                 {int(t): Entry(loc, "features", k) for t, k in keys["features"].items()}, tuple(keys["taps"]),
                 Entry(loc, "expert", keys["expert"]) if keys["expert"] else None)


def arrays_of(plan: Plan) -> list[tuple[str, Entry, str]]:
    """(need key, entry, array) of every array the plan writes, upstream first."""
    out = [("captions", plan.captions, CAPTIONS), ("text", plan.text, TEXT), ("latents", plan.latents, LATENTS)]
    if plan.expert is not None:
        out += [("expert", plan.expert, name) for name in EXPERT_LEVELS]
    out += [(("features", t), e, tp) for t, e in plan.features.items() for tp in plan.taps]
    return out


def need_from(plan: Plan, shard: int, done, only: dict | None) -> dict | None:
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


def missing(plan: Plan, only: dict | None = None) -> dict[int, dict]:
    """Per shard, what is missing: {"captions": bool, ..., "features": {t: [taps]}}; one listing per array."""
    listed = {(e.prefix, name): e.done_shards(name) for _, e, name in arrays_of(plan)}
    out = {}
    for shard in range(plan.captions.n_shards):
        need = need_from(plan, shard, lambda e, name, s: s in listed[(e.prefix, name)], only)
        if need:
            out[shard] = need
    return out


def shard_need(plan: Plan, shard: int, only: dict | None = None) -> dict | None:
    """What one shard needs, looked up afresh (another writer may have committed parts of it)."""
    return need_from(plan, shard, lambda e, name, s: e.loc.exists(e.record_key(name, s)), only)


def writes(plan: Plan, need: dict) -> list[Entry]:
    """The entries a shard's work writes into, so the ones to claim."""
    out = [e for k, e in (("captions", plan.captions), ("text", plan.text), ("latents", plan.latents),
                          ("expert", plan.expert)) if need[k]]
    return out + [plan.features[t] for t in need["features"]]
