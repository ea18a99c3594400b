"""Rows the store already holds for a new dataset's images under OTHER datasets, when exactly equal.

    found = find_reusable(store, req, ds, t=200, arrays=["mid_block", "up_blocks.0"])
    found.parts    # [Reused(features, expert, {entry row: [index of a sample of ds, ...]})]
    found.rest     # indices of ds's samples no stored row serves: those still to extract

Entries are keyed by dataset identity + recipe, so an image the store already holds under another
dataset (a run's test split, the same file inside a bigger folder) is not in the new dataset's
entries, and extracting the new dataset would compute it again. `find_reusable` finds those rows,
and serves one for sample x of `ds` (from sample y of a stored dataset D) only when it is provably
the row extracting x with `req` would compute, that is, when every input of every model call is
the same:

- the recipes: the features recipe `req` makes for `ds` at t, and the latents, text, captions (and
  expert) recipes behind it, equal those of y's entries field by field, leaving out only the
  dataset identity, the upstream keys that hash it and the dataset-wide digest of labels or
  sentences a label or sentence prompt records (the sample's own text is compared below). So the
  U-net, VAE, text encoder, tokenizer, captioner and expert identities, the scheduler, t, the noise
  mode, seed, draws and inversion steps, the tap rule, the method, the prompt and its facts
  (template, fixed text, context-table sha256, caption options), text layer and length, resolution,
  resize geometry, latent rule, dtype and codec are all the same. A dataset of views (crops named in
  the ids) records another geometry, so it never serves a plain image;
- the image: x's bytes have y's sha256. D's record keeps ids, not hashes; D's per-sample hashes are
  taken as proven only when they hash, with the ids, to D's identity (which the entries' keys
  hash): the new images' own hashes when D's ids are all among them, else D loaded again from the
  request its entry records (a D whose images moved or changed serves nothing, and says so);
- the text: the caption y's captions entry committed equals the text the conditioning makes for x
  (null, text:, classname and table-class from --classname, sentence from --text, table; random
  words are seeded by the sample id, so they differ with it). A BLIP caption is a function of the
  image bytes and the captioner facts above;
- the noise: DDPM noise is drawn from sha256(seed:SAMPLE ID:t:draw) (`models.noise`), and a sample id
  is the image's path relative to the root its dataset was listed from. Under --noise ddpm a row is
  served only to a sample of the SAME id (predict on the folder the stored dataset was listed
  from, or one with the same layout; a single file's id is its name, so it is computed again).
  DDIM inversion and --noise none draw nothing: there the id does not matter;
- the row is committed "ok" in every array served (`arrays`, the expert maps) and in the captions.

Exact as every cache hit is: the device, precision and CPU thread count of a shard are recorded
per shard, not keyed (on CUDA, batch neighbours may change the last bits), for these rows as for
any other. Damage is never skipped: a record of a row that would be served is checked here
(`ShardDamage`, naming entry, array and shard), and the rows are then read through `Entry.read`,
which checks the chunks. A stored entry whose manifests cannot be read is skipped, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.core.hashing import recipe_key
from vermouth_cache.data.samples import Dataset, identity_of
from vermouth_cache.extract.plan import CAPTIONS, EXPERT_LEVELS, make_plan
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.methods.conditioning import conditioning_of
from vermouth_cache.models.loading import Captioner, Expert, Placement
from vermouth_cache.models.pipeline import StableDiffusion
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.records import OK

# noise modes that draw nothing from the sample id (models/noise.py): rows serve any id
ID_FREE_NOISE = ("none", "ddim-inversion")


@dataclass
class Reused:
    """Rows of one stored features entry (and its expert entry) served to samples of the new dataset."""
    features: Entry
    expert: Entry | None
    rows: dict[int, list[int]]  # entry row -> indices of the new dataset's samples it serves


@dataclass
class Reusable:
    parts: list[Reused]
    rest: list[int]  # indices of the new dataset's samples to extract
    notes: list[str] = field(default_factory=list)  # stored datasets that could not be checked, and why

    @property
    def n_reused(self) -> int:
        return sum(len(v) for p in self.parts for v in p.rows.values())


@dataclass
class _Candidate:
    features: Entry
    expert: Entry | None
    captions: Entry
    record: dict  # the stored dataset's record (ids, identity)
    own: bool  # the entry of the new dataset itself (an ordinary cache hit)


class _Planned:
    """An entry `make_plan` names, not looked up: only its recipe is kept."""

    def __init__(self, kind: str, recipe: dict, n_samples: int, shard_size: int):
        self.kind, self.recipe, self.key = kind, recipe, recipe_key(recipe)
        self.prefix, self.n_samples, self.shard_size = f"{kind}/{self.key}", n_samples, shard_size


def planned_recipes(req: ExtractRequest, ds: Dataset) -> dict:
    """{"captions", "text", "latents", "expert": recipe or None, "features": {t: recipe}} of `req` on `ds`:
    what `extract` would key, from the same `make_plan` (model identities are file hashes; no weight
    is loaded)."""
    cpu = Placement(torch.device("cpu"), torch.float32)
    sd = StableDiffusion(req.sd_model, cpu)
    captioner = Captioner(req.captioner, cpu) if conditioning_of(req.prompt).needs_captioner else None
    expert = Expert(req.expert, req.expert_model, cpu) if req.expert else None

    def name(kind, recipe, *, n_samples, shard_size, about):
        return _Planned(kind, recipe, n_samples, shard_size)

    plan = make_plan(req, ds, name, sd, captioner, expert, "")
    return {"captions": plan.captions.recipe, "text": plan.text.recipe, "latents": plan.latents.recipe,
            "expert": plan.expert.recipe if plan.expert is not None else None,
            "features": {t: e.recipe for t, e in plan.features.items()}, "taps": plan.taps}


def _but(recipe: dict, *keys: str) -> dict:
    return {k: v for k, v in recipe.items() if k not in keys}


def _captions_facts(recipe: dict) -> dict:
    """A captions recipe without its dataset and the dataset-wide digest of labels or sentences."""
    prompt = _but(recipe.get("prompt") or {}, "labels", "sentences")
    return {**_but(recipe, "dataset", "prompt"), "prompt": prompt}


def find_reusable(store: Store, req: ExtractRequest, ds: Dataset, *, t: int, arrays: list[str],
                  accept=None) -> Reusable:
    """The stored rows of features at `t` (arrays `arrays`, plus the expert maps when `req` has an
    expert) that are exactly what extracting `ds` with `req` would compute: see the module docstring.
    `accept(features entry)` may refuse more entries (the pins a run selects its features by)."""
    want = planned_recipes(req, ds)
    if t not in want["features"]:
        return Reusable([], list(range(len(ds))), [f"t={t} is not a timestep of the request"])
    feat_facts = _but(want["features"][t], "latents", "text")
    lat_facts, txt_facts = _but(want["latents"], "dataset"), _but(want["text"], "captions")
    cap_facts = _captions_facts(want["captions"])
    exp_facts = _but(want["expert"], "dataset") if want["expert"] is not None else None
    id_bound = want["features"][t]["noise"].get("mode") not in ID_FREE_NOISE
    cond = conditioning_of(req.prompt)
    hashes = ds.image_hashes()
    new_hash = {s.id: h for s, h in zip(ds.samples, hashes)}
    notes: list[str] = []

    experts: dict[str, Entry] = {}  # dataset identity -> its expert entry of the same recipe
    if exp_facts is not None:
        for e in store.entries("expert"):
            try:
                r = e.manifest["recipe"]
            except VermouthError as exc:
                notes.append(f"{e.prefix} skipped: {str(exc)[:160]}")
                continue
            if _but(r, "dataset") == exp_facts:
                experts[r["dataset"]] = e

    cands: list[_Candidate] = []
    for f in store.entries("features"):
        try:
            r = f.manifest["recipe"]
            if _but(r, "latents", "text") != feat_facts:
                continue
            lat = store.find("latents", r["latents"]).manifest["recipe"]
            txt = store.find("text", r["text"]).manifest["recipe"]
            cap_entry = store.find("captions", txt["captions"])
            cap = cap_entry.manifest["recipe"]
            if (_but(lat, "dataset") != lat_facts or _but(txt, "captions") != txt_facts
                    or _captions_facts(cap) != cap_facts or cap.get("dataset") != lat["dataset"]):
                continue
            expert = None
            if exp_facts is not None:
                expert = experts.get(lat["dataset"])
                if expert is None:
                    continue  # no expert maps of that dataset with this recipe
            if accept is not None and not accept(f):
                continue
            record = store.dataset(f.manifest["about"]["dataset_record"])
        except (VermouthError, KeyError, TypeError) as exc:
            notes.append(f"{f.prefix} skipped: {str(exc)[:160]}")
            continue
        ids = record["ids"]
        if (record["identity"] != lat["dataset"] or len(ids) != f.n_samples or ids != sorted(set(ids))
                or any(e.n_samples != f.n_samples for e in (cap_entry, expert) if e is not None)):
            notes.append(f"{f.prefix} skipped: its dataset record {f.manifest['about']['dataset_record'][:12]} is not "
                         "the dataset its recipe keys")
            continue
        cands.append(_Candidate(f, expert, cap_entry, record, own=lat["dataset"] == ds.identity()))

    # which stored rows hold each new sample's image (and, under DDPM noise, its id)
    proven: dict[str, dict[str, str] | None] = {}  # dataset identity -> {id: sha256}, None: not provable
    offers: dict[int, list[tuple[int, int]]] = {}  # new sample -> [(candidate, row)]
    for c, cand in enumerate(cands):
        ids = cand.record["ids"]
        if id_bound and not any(i in new_hash for i in ids):
            continue  # no id in common: under DDPM noise nothing can be served
        ident = cand.record["identity"]
        if ident not in proven:
            proven[ident] = _hashes_of(store, cand, new_hash, notes)
        stored = proven[ident]
        if stored is None:
            continue
        by_key: dict[tuple, list[int]] = {}
        for row, sid in enumerate(ids):
            by_key.setdefault((stored[sid], sid if id_bound else None), []).append(row)
        for i, (s, h) in enumerate(zip(ds.samples, hashes)):
            for row in by_key.get((h, s.id if id_bound else None), ()):
                offers.setdefault(i, []).append((c, row))
    if not offers:
        return Reusable([], list(range(len(ds))), notes)

    # each sample from one entry: the new dataset's own first, then those offering the most; of their
    # rows, those committed ok in every array served, with the sample's own text. Only the records
    # of rows that would be served are read (and checked: damage raises)
    count = {c: sum(any(cc == c for cc, _ in offered) for offered in offers.values()) for c in range(len(cands))}
    order = sorted((c for c in range(len(cands)) if count[c]),
                   key=lambda c: (not cands[c].own, -count[c], cands[c].features.key))
    texts = None if cond.needs_captioner else cond.texts(req, list(ds.samples))
    picked: dict[int, dict[int, list[int]]] = {}
    unserved = set(offers)
    for c in order:
        rows = {i: [row for cc, row in offers[i] if cc == c] for i in sorted(unserved)}
        rows = {i: r for i, r in rows.items() if r}
        if not rows:
            continue
        usable = _usable_rows(cands[c], {row for r in rows.values() for row in r}, arrays)
        for i, offered in rows.items():
            row = next((row for row in offered if row in usable and (texts is None or usable[row] == texts[i])), None)
            if row is not None:
                picked.setdefault(c, {}).setdefault(row, []).append(i)
                unserved.discard(i)
    parts = [Reused(cands[c].features, cands[c].expert, picked[c]) for c in order if c in picked]
    served = {i for p in parts for v in p.rows.values() for i in v}
    return Reusable(parts, [i for i in range(len(ds)) if i not in served], notes)


def _hashes_of(store: Store, cand: _Candidate, new_hash: dict[str, str], notes: list[str]) -> dict[str, str] | None:
    """{id: sha256 of the image bytes} of a stored dataset, proven by its identity; None if it cannot be."""
    record = cand.record
    ids = record["ids"]
    if all(i in new_hash for i in ids):  # the new images themselves, if they are what it hashed
        guess = [new_hash[i] for i in ids]
        if identity_of(ids, guess) == record["identity"]:
            return dict(zip(ids, guess))
    where = f"dataset {record['name']} ({cand.features.prefix})"
    try:  # the dataset its entry was extracted from, loaded again from the request it records
        request = cand.features.manifest["about"]["request"]
        again = ExtractRequest.from_json(request, store=str(store.root), progress=False).load_dataset()
        if [s.id for s in again.samples] != ids or again.identity() != record["identity"]:
            notes.append(f"{where} not checked: its images at {request.get('dataset')} changed since extraction")
            return None
        return dict(zip(ids, again.image_hashes()))
    except (VermouthError, OSError, KeyError, TypeError) as exc:
        notes.append(f"{where} not checked: {str(exc)[:160]}")
        return None


def _usable_rows(cand: _Candidate, rows: set[int], arrays: list[str]) -> dict[int, str | None]:
    """{row: its caption} of the `rows` committed ok in every array served and in the captions. The
    records are checked as every read checks them: damage raises ShardDamage, naming it."""
    served = [(cand.features, a) for a in arrays] + [(cand.expert, a) for a in EXPERT_LEVELS if cand.expert]
    out: dict[int, str | None] = {}
    size = cand.features.shard_size
    for shard in sorted({r // size for r in rows}):
        in_shard = [r for r in rows if r // size == shard]
        ok = set(in_shard)
        for entry, name in served:
            if entry.shard_size != size:
                return {}
            rec = entry.checked_record(name, shard)
            ok &= set() if rec is None else {r for r in in_shard if rec.status[r - rec.start] == OK}
        if not ok:
            continue
        if cand.captions.shard_size != size:
            return {}
        rec = cand.captions.checked_record(CAPTIONS, shard)
        for r in sorted(ok):
            if rec is not None and rec.status[r - rec.start] == OK:
                out[r] = rec.values[r - rec.start] if rec.values is not None else None
    return out
