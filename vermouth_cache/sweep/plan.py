"""From recipe points to work: the extractions the unfinished points need, merged so that one
`extract` call per dataset part covers every timestep and stage of the grid, and the training
groups, whose heads share one pass over the features.

Nothing here computes; `survey` (for --dry-run) and `run.run_sweep` act on the plan.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from vermouth_cache.core.hashing import canonical_json
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.methods import method_named
from vermouth_cache.methods.conditioning import conditioning_of
from vermouth_cache.models.taps import STAGES, parse_stages
from vermouth_cache.store.files import read_json
from vermouth_cache.sweep.recipe import DatasetSpec, Models, Point, Recipe
from vermouth_cache.train.common import pass_key

RUNS = "runs"
POINT_FILE = "point.json"  # written last into a point's run directory: the point is finished


@dataclass(frozen=True)
class ResolvedModels:
    sd_model: str
    captioner: str
    clip_model: str
    experts: dict  # expert name -> hub id or directory (absent: the default hub id)

    @classmethod
    def of(cls, models: Models, tiny_dir: Path | None = None) -> "ResolvedModels":
        if models.tiny:
            d = Path(tiny_dir)
            return cls(str(d / "sd"), str(d / "blip"), str(d / "clip"),
                       {"resnet18": str(d / "resnet18"), "dino": str(d / "dino"), "dinov2": str(d / "dinov2")})
        return cls(models.sd_model, models.captioner, models.clip_model, dict(models.experts))


def extraction_requests(points: list[Point], models: ResolvedModels, extract_options: dict, store: str,
                        device: str | None, progress: bool, **run) -> list[ExtractRequest]:
    """One request per (dataset part, features recipe without t and taps): the union of the
    points' timesteps, stages and attention maps, so shared artifacts are computed once."""
    merged: dict[str, dict] = {}
    for p in points:
        s = p.settings
        method = method_named(s.method)
        for part in p.dataset.data_options.extract_parts():
            fixed = {**part, "method": s.method, "resolution": s.resolution, "prompt": s.prompt,
                     "text_layer": s.text_layer, "noise": s.noise, "expert": s.expert}
            key = canonical_json(fixed)
            m = merged.setdefault(key, {"fixed": fixed, "t": set(), "stages": set(), "attn": set(),
                                        "by_stage": method.merge == "stages"})
            m["t"].add(s.t)
            if m["by_stage"]:
                m["stages"].update(parse_stages(s.stages))
            if s.attn_maps:
                m["attn"].update(parse_stages(s.attn_maps) if m["by_stage"] else (s.attn_maps,))
    out = []
    for m in merged.values():
        f = m["fixed"]
        expert = f["expert"]
        out.append(ExtractRequest(
            **{k: v for k, v in f.items() if v is not None or k in ("expert",)},
            store=store, t=tuple(sorted(m["t"])), stages=_stages(m["stages"]) or None,
            attn_maps=(_stages(m["attn"]) or None) if m["by_stage"] else (_widest(m["attn"]) or "none"),
            expert_model=models.experts.get(expert) if expert else None,
            sd_model=models.sd_model, captioner=models.captioner, device=device, progress=progress,
            **_applicable(extract_options, f["prompt"]), **run))
    return out


def _applicable(extract_options: dict, prompt: str) -> dict:
    """The sweep's extraction options a request of `prompt` reads: a context table only for the
    table conditionings, a token count only for tokenized texts (a method comparison mixes both)."""
    needs_table = conditioning_of(prompt).needs_table
    return {k: v for k, v in extract_options.items()
            if not (k == "context_table" and not needs_table) and not (k == "text_tokens" and needs_table)}


def _widest(selectors: set[str]) -> str | None:
    """One attention selector holding every point's maps (a64 holds a32's)."""
    return "a64" if "a64" in selectors else ("a32" if "a32" in selectors else None)


def _stages(names: set[str]) -> str:
    return ",".join(s for s in STAGES if s in names)


@dataclass
class TrainGroup:
    """Points of one dataset whose heads share a pass over the same features."""
    dataset: DatasetSpec
    points: list[Point] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.points[0].name + (f" (+{len(self.points) - 1} heads)" if len(self.points) > 1 else "")


def train_groups(points: list[Point]) -> list[TrainGroup]:
    groups: dict[str, TrainGroup] = {}
    for p in points:
        key = canonical_json({"dataset": p.dataset.label, **pass_key(p.settings)})
        if any(getattr(p.settings, k) for k in ("tune_norms", "adapter", "tune_unet", "freeze_prompt_after")):
            key += p.name  # its features change while it trains: it never shares a pass
        groups.setdefault(key, TrainGroup(p.dataset)).points.append(p)
    return list(groups.values())


def fingerprint(recipe: Recipe, point: Point, models: ResolvedModels) -> str:
    """Everything that decides a point's result; a finished point whose fingerprint differs is redone."""
    facts = {"dataset": point.dataset.facts(), "settings": point.settings.to_json(), "models": models.__dict__,
             "extract": _by_content(recipe.extract)}
    return hashlib.sha256(canonical_json(facts).encode()).hexdigest()[:16]


def _by_content(extract: dict) -> dict:
    """The extract options with a context table named by its sha256, not its path: a table edited in
    place changes the features, so it must change the fingerprint (a missing one is refused)."""
    if not extract.get("context_table"):
        return extract
    from vermouth_cache.data.tables import read_table

    return {**extract, "context_table": read_table(extract["context_table"]).sha256}


def run_dir(out: Path, point: Point) -> Path:
    return out / RUNS / point.name


def finished(out: Path, recipe: Recipe, point: Point, models: ResolvedModels) -> dict | None:
    """The point's record when it finished with the same fingerprint, else None."""
    path = run_dir(out, point) / POINT_FILE
    if not path.is_file():
        return None
    try:
        rec = read_json(path)
    except Exception:
        return None
    if rec.get("status") != "done" or rec.get("fingerprint") != fingerprint(recipe, point, models):
        return None
    return rec
