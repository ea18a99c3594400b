"""Find the cached entries a training run asks for, or say exactly why none fits.

Training never recomputes a feature: it looks up the features (and expert, masks) entries of a
dataset whose recipes match the request field by field. A features entry's facts are gathered
from its own recipe and those it points to (latents -> dataset and resolution, text -> captions
-> prompt). When nothing matches, the error names the nearest entry and every field that differs,
so the fix (an `extract` with those options) is obvious.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from vermouth_cache.data.samples import Dataset
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.methods import DEFAULT_METHOD
from vermouth_cache.models.loading import Captioner
from vermouth_cache.store.entries import Store
from vermouth_cache.store.entry import Entry


@dataclass(frozen=True)
class Pin:
    """A recipe field that tells cached entries apart and that `train`, `export` and a sweep's
    `extract:` options select by. PINS below is the one list all three read; an option's type and
    choices are those of its ExtractRequest field."""
    name: str  # the FeatureQuery / fact name and RunOptions.select key
    option: str  # the option of `train` and `export`
    extract: str  # the ExtractRequest field (the `extract` option, a sweep's `extract:` key) it selects
    help: str


PINS = (
    Pin("table", "--context-table", "context_table",
        "Only features conditioned on this context table: its file, or its sha256 (8+ hex digits, as `ls` and "
        "a --freeze-prompt-after run's metrics show it) [any]."),
    Pin("text_tokens", "--text-tokens", "text_tokens",
        "Only features of texts tokenized to this many tokens (`extract --text-tokens`; vpd refer: 40 or 77) [any]."),
    Pin("noise_seed", "--noise-seed", "seed",
        "Only features extracted with this noise seed (`extract --seed`; also a random prompt's seed) [any]."),
    Pin("noise_draws", "--noise-draws", "noise_draws",
        "Only features averaged over this many DDPM draws (`extract --noise-draws`) [any]."),
    Pin("inversion_steps", "--inversion-steps", "inversion_steps",
        "Only DDIM-inversion features of this many steps (`extract --inversion-steps`) [any]."),
    Pin("dtype", "--dtype", "dtype", "Only features (and expert features) stored in this dtype [any]."),
    Pin("codec", "--codec", "codec", "Only features (and expert features) stored with this codec [any]."),
    Pin("captioner", "--captioner", "captioner",
        "Only features whose BLIP captions came from this captioner (hub id or directory) [any]."),
    Pin("caption_prefix", "--caption-prefix", "caption_prefix",
        "Only features whose BLIP captions continued this prefix (`extract --caption-prefix`) [any]."),
    Pin("caption_min_tokens", "--caption-min-tokens", "caption_min_tokens",
        "Only features of BLIP captions with this minimum of new tokens [any]."),
    Pin("caption_max_tokens", "--caption-max-tokens", "caption_max_tokens",
        "Only features of BLIP captions with this maximum of new tokens [any]."),
)
# the option that selects each fact, for "add --noise-seed" hints (t ... text layer are the
# train settings and export options of the same name; the SD model pins the U-net)
OPTION_OF = {"t": "--t", "resolution": "--resolution", "prompt": "--prompt", "noise": "--noise",
             "text_layer": "--text-layer", "unet": "--sd-model", **{p.name: p.option for p in PINS}}


def pop_pins(kw: dict) -> dict:
    """The PINS options given on a command line (removed from kw); the ones left out select nothing."""
    return {p.name: v for p in PINS if (v := kw.pop(p.name, None)) is not None}


def check_pins_apply(pins: dict, *, prompt: str, noise: str) -> None:
    """Refuse a pin that cannot tell the features of `prompt` and `noise` apart: it would select
    nothing and read as if it had (`--context-table` on sentence features, `--noise-seed` on
    clean latents)."""
    tables = prompt in ("table", "table-class")
    rules = {"table": (tables, f"--prompt {prompt} reads no context table"),
             "text_tokens": (not tables, f"--prompt {prompt} reads table rows, not tokenized texts"),
             "noise_seed": (noise == "ddpm" or prompt == "random", f"--noise {noise} draws no noise"),
             "noise_draws": (noise == "ddpm", f"--noise {noise} draws no noise"),
             "inversion_steps": (noise == "ddim-inversion", f"--noise {noise} is not a DDIM inversion"),
             **{k: (prompt == "blip", f"--prompt {prompt} has no BLIP captions")
                for k in ("captioner", "caption_prefix", "caption_min_tokens", "caption_max_tokens")}}
    for name, value in pins.items():
        applies, why = rules.get(name, (True, ""))
        if value is not None and not applies:
            raise VermouthError(f"{OPTION_OF[name]} selects nothing here: {why}")


def pins_of_extract(extract_options: dict, *, captioner: str | None) -> dict:
    """What a sweep's extractions were asked for (its `extract:` options, else the defaults), as pins,
    so that its training reads exactly them."""
    defaults = {name: f.default for name, f in ExtractRequest.model_fields.items()}
    out = {p.name: extract_options.get(p.extract, defaults.get(p.extract)) for p in PINS if p.name != "captioner"}
    if captioner is not None:
        out["captioner"] = captioner
    return {k: v for k, v in out.items() if v is not None}


def resolve_pins(pins: dict) -> dict:
    """Pins as their recipe facts: a captioner (hub id or directory) becomes its identity."""
    out = dict(pins)
    if out.get("captioner") is not None:
        out["captioner"] = Captioner(out["captioner"], None).identity
    if out.get("table") is not None:
        out["table"] = table_pin(str(out["table"]))
    return out


def table_pin(value: str) -> str:
    """A context table as the keys record it: a table file's sha256, or a sha256 (prefix of at least
    8 hex digits) as `ls`, a run's metrics and an ambiguity message show it (an adapted table of
    `--freeze-prompt-after` lives in its run directory)."""
    from vermouth_cache.data.tables import read_table

    if os.path.exists(value):
        return read_table(value).sha256
    if len(value) >= 8 and re.fullmatch(r"[0-9a-fA-F]+", value):
        return value.lower()
    raise VermouthError(f"--context-table {value}: no such table file, nor a sha256 of at least 8 hex digits")


@dataclass(frozen=True)
class FeatureQuery:
    """What a run needs from the cache; None means "any" (the store must then hold only one)."""
    t: int
    resolution: int
    prompt: str | None = "blip"
    noise: str | None = "ddpm"
    text_layer: str | None = "final"
    unet: str | None = None  # unet identity (sha256), when the user named the SD model
    method: str | None = None  # the method that made the features (train settings, export --method); None: any
    pins: dict = field(default_factory=dict)  # PINS facts (resolved): noise_seed, dtype, captioner identity, ...

    def wanted(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if v is not None and k != "pins"}
        return {**out, **{k: v for k, v in self.pins.items() if v is not None}}

    def accepts(self, facts: dict) -> bool:
        """Whether a features entry of these facts (`features_facts`) is one the query asks for."""
        return not any(_differs(facts.get(k), v, k) for k, v in self.wanted().items())


def features_facts(store: Store, entry: Entry) -> dict:
    """The comparable facts of a features entry, from its recipe chain; None where a field does not
    apply (the noise seed of `--noise none`, the captioner of a null prompt)."""
    r = entry.manifest["recipe"]
    lat = store.find("latents", r["latents"]).manifest["recipe"]
    txt = store.find("text", r["text"]).manifest["recipe"]
    cap = store.find("captions", txt["captions"]).manifest["recipe"]
    p = cap["prompt"]
    prompt = p["mode"]
    if prompt == "text":
        prompt = "text:" + p["text"]
    noise = r["noise"]
    return {"dataset": lat["dataset"], "resolution": lat["resolution"], "t": r["t"], "noise": noise["mode"],
            "method": r.get("method", DEFAULT_METHOD),  # Vermouth's recipes predate methods and name none
            "prompt": prompt, "text_layer": txt["layer"], "dtype": r["dtype"], "codec": r.get("codec", "raw"),
            "unet": r["unet"],
            "noise_seed": noise.get("seed", p.get("seed")), "noise_draws": noise.get("draws"),
            "inversion_steps": noise.get("steps"), "captioner": p.get("captioner"),
            "caption_prefix": p.get("prefix"), "caption_min_tokens": p.get("min_new_tokens"),
            "caption_max_tokens": p.get("max_new_tokens"), "sentences": p.get("sentences"),
            "table": p.get("table"),
            # tokenized texts: the request's length, else the tokenizer's 77; table rows have none
            "text_tokens": txt.get("tokens", None if p["mode"] in ("table", "table-class") else 77)}


def _differs(fact, wanted, name: str = "") -> bool:
    if name == "table" and isinstance(fact, str):  # a table pin may be a sha256 prefix
        return not fact.startswith(wanted)
    return fact is not None and fact != wanted  # None: the field does not apply to the entry


def ambiguity(what: str, name: str, cands: list[tuple[Entry, dict]]) -> str:
    """'2 features entries of X match: 3f2a (noise-seed 0), 9c1b (noise-seed 1); add --noise-seed'."""
    order = list(OPTION_OF)  # as declared: the SD model, then PINS
    keys = sorted({k for _, f in cands for k in f}, key=lambda k: (order.index(k) if k in order else len(order), k))
    differ = [k for k in keys if len({repr(f.get(k)) for _, f in cands}) > 1]

    def label(k: str) -> str:
        return OPTION_OF[k][2:] if k in OPTION_OF else k

    parts = ", ".join(e.key[:12] + (f" ({', '.join(f'{label(k)} {_shown(f.get(k))}' for k in differ)})"
                                    if differ else "") for e, f in cands)
    fixes = []
    if any(k in OPTION_OF for k in differ):
        fixes.append(f"add {' or '.join(OPTION_OF[k] for k in differ if k in OPTION_OF)}")
    loose = [k for k in differ if k not in OPTION_OF]
    if loose or not differ:
        why = f"no option selects {', '.join(loose)}" if loose else "they differ in nothing a request selects"
        fixes.append(f"{why}: remove the extra ones (`vermouth-cache gc --entry "
                     f"{cands[-1][0].kind}/{cands[-1][0].key[:12]}`)")
    return f"{len(cands)} {what} entries of {name} match: {parts}; {'; '.join(fixes)}"


def _shown(v) -> str:
    s = str(v)
    if len(s) in (16, 64) and all(c in "0123456789abcdef" for c in s):
        return s[:12]  # a key or an identity
    return s if len(s) <= 40 else s[:37] + "..."


def _describe_dataset(ds: Dataset) -> str:
    return f"{ds.name} ({len(ds)} images, identity {ds.identity()[:12]})"


def find_features(store: Store, ds: Dataset, query: FeatureQuery, arrays: list[str] | None = None) -> Entry:
    """The one features entry of `ds` matching `query` (and holding `arrays`)."""
    ident = ds.identity()
    cands, unreadable = [], []
    for e in store.entries("features"):
        try:
            facts = features_facts(store, e)
        except VermouthError as exc:
            unreadable.append(f"features/{e.key[:12]} ({str(exc)[:120]})")
            continue  # an entry whose upstream was removed or damaged cannot be trusted for lookup
        if facts["dataset"] == ident:
            cands.append((e, facts))
    if not cands:
        damaged = (f"; {len(unreadable)} features entries could not be read, e.g. {unreadable[0]}: run "
                   "`vermouth-cache verify`") if unreadable else ""
        raise VermouthError(f"store {store.root} has no features of dataset {_describe_dataset(ds)}: "
                            "run `vermouth-cache extract` on it first" + damaged)
    wanted = query.wanted()
    if any(s.text is not None for s in ds.samples):  # features of the dataset's sentences as they are now
        from vermouth_cache.extract.plan import labels_key

        wanted["sentences"] = labels_key(ds)
    scored = []
    for e, facts in cands:
        diff = {k: (facts.get(k), v) for k, v in wanted.items() if _differs(facts.get(k), v, k)}
        missing = [a for a in arrays or [] if a not in e.array_names()]
        scored.append((len(diff) + (1 if missing else 0), e, diff, missing))
    scored.sort(key=lambda s: (s[0], s[1].key))
    matches = [s for s in scored if s[0] == 0]
    if len(matches) == 1:
        return matches[0][1]
    if len(matches) > 1:
        facts_of = dict((e.prefix, f) for e, f in cands)
        tables = {facts_of[m[1].prefix].get("table") for m in matches}
        if wanted.get("table") and len(tables) > 1:  # a sha prefix that two tables share
            raise VermouthError(f"--context-table {wanted['table']} matches the tables "
                                f"{', '.join(sorted(t[:16] for t in tables if t))}: give a longer prefix")
        raise VermouthError(ambiguity("features", ds.name, [(m[1], facts_of[m[1].prefix]) for m in matches]))
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
        raise VermouthError(ambiguity(what, ds.name, [(e, {k: v for k, v in e.manifest["recipe"].items()
                                                           if k not in ("kind", "schema", "dataset")}) for e in good]))
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
