"""Find the cached entries a training run asks for, or say exactly why none fits.

Training never recomputes a feature: it looks up the features (and expert, masks) entries of a
dataset whose recipes match the request field by field. A features entry's facts are gathered
from its own recipe and those it points to (latents -> dataset and resolution, text -> captions
-> prompt). When nothing matches, the error names the nearest entry and every field that differs,
so the fix (an `extract` with those options) is obvious.
"""

from __future__ import annotations

from dataclasses import dataclass

from .datasets import Dataset
from .errors import VermouthError
from .store import Entry, Store


@dataclass(frozen=True)
class FeatureQuery:
    """What a run needs from the cache; None means "any" (the store must then hold only one)."""
    t: int
    resolution: int
    prompt: str | None = "blip"
    noise: str | None = "ddpm"
    text_layer: str | None = "final"
    dtype: str | None = None
    unet: str | None = None  # unet identity (sha256), when the user named the SD model

    def wanted(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def features_facts(store: Store, entry: Entry) -> dict:
    """The comparable facts of a features entry, from its recipe chain."""
    r = entry.manifest["recipe"]
    lat = store.find("latents", r["latents"]).manifest["recipe"]
    txt = store.find("text", r["text"]).manifest["recipe"]
    cap = store.find("captions", txt["captions"]).manifest["recipe"]
    prompt = cap["prompt"]["mode"]
    if prompt == "text":
        prompt = "text:" + cap["prompt"]["text"]
    return {"dataset": lat["dataset"], "resolution": lat["resolution"], "t": r["t"], "noise": r["noise"]["mode"],
            "prompt": prompt, "text_layer": txt["layer"], "dtype": r["dtype"], "unet": r["unet"],
            "seed": r["noise"].get("seed"), "draws": r["noise"].get("draws")}


def _describe_dataset(ds: Dataset) -> str:
    return f"{ds.name} ({len(ds)} images, identity {ds.identity()[:12]})"


def find_features(store: Store, ds: Dataset, query: FeatureQuery, arrays: list[str] | None = None) -> Entry:
    """The one features entry of `ds` matching `query` (and holding `arrays`)."""
    ident = ds.identity()
    cands = []
    for e in store.entries("features"):
        try:
            facts = features_facts(store, e)
        except VermouthError:
            continue  # an entry whose upstream was removed cannot be trusted for lookup
        if facts["dataset"] == ident:
            cands.append((e, facts))
    if not cands:
        raise VermouthError(f"store {store.root} has no features of dataset {_describe_dataset(ds)}: "
                            "run `vermouth-cache extract` on it first")
    wanted = query.wanted()
    scored = []
    for e, facts in cands:
        diff = {k: (facts.get(k), v) for k, v in wanted.items() if facts.get(k) != v}
        missing = [a for a in arrays or [] if a not in e.array_names()]
        scored.append((len(diff) + (1 if missing else 0), e, diff, missing))
    scored.sort(key=lambda s: (s[0], s[1].key))
    matches = [s for s in scored if s[0] == 0]
    if len(matches) == 1:
        return matches[0][1]
    if len(matches) > 1:
        keys = ", ".join(m[1].key[:12] for m in matches)
        raise VermouthError(f"{len(matches)} cached feature entries of {ds.name} match the request ({keys}); "
                            "name the SD model (--sd-model) or --dtype to choose one")
    _, e, diff, missing = scored[0]
    parts = [f"{k} (cached {_short(c)}, requested {_short(w)})" for k, (c, w) in sorted(diff.items())]
    if missing:
        parts.append(f"arrays {', '.join(missing)} (not cached; extract with the stages/--attn-maps that make them)")
    raise VermouthError(f"no cached features of {ds.name} match the request; the nearest, features/{e.key[:12]}, "
                        f"differs in: {'; '.join(parts)}")


def _short(v) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else s


def find_by_dataset(store: Store, kind: str, ds: Dataset, match: dict, what: str) -> Entry:
    """The entry of `kind` over `ds` whose recipe has the `match` fields (expert, masks)."""
    ident = ds.identity()
    cands = [e for e in store.entries(kind) if e.manifest["recipe"].get("dataset") == ident]
    good = [e for e in cands if all(e.manifest["recipe"].get(k) == v for k, v in match.items())]
    if len(good) == 1:
        return good[0]
    if len(good) > 1:
        raise VermouthError(f"{len(good)} cached {what} entries of {ds.name} match; remove the extra ones")
    if not cands:
        raise VermouthError(f"store {store.root} has no {what} of dataset {_describe_dataset(ds)}: "
                            f"run `vermouth-cache extract` with the option that makes them")
    r = cands[0].manifest["recipe"]
    diff = "; ".join(f"{k} (cached {r.get(k)}, requested {v})" for k, v in match.items() if r.get(k) != v)
    raise VermouthError(f"no cached {what} of {ds.name} match the request; {kind}/{cands[0].key[:12]} differs in: {diff}")


def subset_indices(entry_ids: list[str], ds: Dataset) -> list[int]:
    """Indices of ds's samples inside an entry over a superset (a K-shot subset of a full split)."""
    pos = {i: n for n, i in enumerate(entry_ids)}
    missing = [s.id for s in ds.samples if s.id not in pos]
    if missing:
        raise VermouthError(f"{len(missing)} samples of {ds.name} are not in the cached set (e.g. {missing[0]})")
    return [pos[s.id] for s in ds.samples]
