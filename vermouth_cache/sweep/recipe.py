"""A sweep recipe: YAML naming the datasets, the models, the grid and the paper's numbers.

    task: fewshot                       # default task of the datasets below
    datasets:                           # label -> where it is; ${VAR} comes from --set VAR=..., --config, env
      pets: {path: "${COOP}/oxford_pets/split_zhou_OxfordPets.json", shots: 16}
    models: {sd_model: ..., captioner: ..., clip_model: ..., experts: {resnet18: ...}}   # or: models: tiny
    extract: {dtype: fp16, batch_size: 32}          # extraction-only options, fixed for the sweep
    train: {schedule: fast, expert: none, seg: {iters: 4000}}   # settings of every point (+ per task)
    grid: {t: [100, 200], stages: ["mid,up", "down,mid"]}       # cartesian product ...
    variants: [{}, {prompt: "null"}, {noise: none}]             # ... times one-at-a-time rows
    paper: [{dataset: pets, t: 200, value: 66.13}]              # the paper's numbers, in %

Every key is checked: an unknown one is an error naming it and where it is. Grid and variant
keys are `TaskSettings` fields (`vermouth-cache train --help` explains each). A point is one
dataset with one combination; two combinations that resolve to the same settings are one point.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from vermouth_cache.data.bundled import data_dir
from vermouth_cache.core.errors import VermouthError
from vermouth_cache.extract.selection import PINS
from vermouth_cache.models.backbones import DEFAULT_SD_MODEL
from vermouth_cache.models.loading import DEFAULT_CAPTIONER, DEFAULT_CLIP_MODEL, EXPERT_MODELS
from vermouth_cache.train.settings import TASKS, TaskSettings, task_settings

TOP_KEYS = ("name", "task", "datasets", "models", "extract", "train", "grid", "variants", "paper", "paper_scale")
DATASET_KEYS = {
    "fewshot": ("task", "path", "image_root", "shots", "shot_seed"),
    "sbir": ("task", "path", "unseen", "name"),
    "seg": ("task", "path", "layout", "split", "classnames", "eval"),
}
EVAL_KEYS = ("path", "layout", "split", "classnames")
MODEL_KEYS = ("sd_model", "captioner", "clip_model", "experts")
# extraction-only options, fixed for the sweep: the recipe fields that select features
# (selection.PINS; the captioner is `models:`), then how the extraction runs
EXTRACT_KEYS = (*(p.extract for p in PINS if p.name != "captioner"), "batch_size", "shard_size", "precision",
                "on_error")
SETTING_KEYS = tuple(f.name for f in fields(TaskSettings))
MAIN_METRIC = {"fewshot": "top1", "sbir": "mAP@all", "seg": "mIoU"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class DatasetSpec:
    label: str
    task: str
    path: str
    options: dict  # the task's other keys (shots, layout, eval, ...)

    def evals(self) -> list[tuple[str, dict]]:
        """Segmentation evaluation sets: (label, {path, layout, split, classnames})."""
        return list(self.options.get("eval", {}).items())


@dataclass(frozen=True)
class Models:
    tiny: bool = False  # write tiny random models into the sweep's output and use them
    sd_model: str = DEFAULT_SD_MODEL
    captioner: str = DEFAULT_CAPTIONER
    clip_model: str = DEFAULT_CLIP_MODEL
    experts: dict = field(default_factory=dict)  # expert name -> hub id or directory


@dataclass(frozen=True)
class Point:
    name: str  # self-describing and unique: "<dataset>" + "-<key>_<value>" per varied setting
    dataset: DatasetSpec
    settings: TaskSettings
    varied: dict  # the grid and variant values of this point


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    datasets: dict[str, DatasetSpec]
    models: Models
    extract: dict
    points: list[Point]
    paper: list[dict]  # {"dataset", "metric", "value" (a fraction), settings...}

    @property
    def axes(self) -> list[str]:
        return list(dict.fromkeys(k for p in self.points for k in p.varied))


def load_recipe(path: str | os.PathLike, variables: dict[str, str] | None = None,
                config: str | os.PathLike | None = None) -> Recipe:
    """Read, substitute and check a recipe; `variables` beat the `config` file, which beats the environment."""
    path = Path(path)
    if not path.is_file():
        raise VermouthError(f"recipe not found: {path}")
    env = {**os.environ, "BUNDLED": str(data_dir()), "RECIPE_DIR": str(path.resolve().parent)}
    if config is not None:
        env.update({k: str(v) for k, v in _mapping(_read_yaml(Path(config)), f"config {config}").items()})
    env.update(variables or {})
    raw = _mapping(_read_yaml(path), f"recipe {path}")
    raw = _substitute(raw, env, path)
    return _parse(raw, path)


def _read_yaml(path: Path):
    if not path.is_file():
        raise VermouthError(f"file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise VermouthError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def _mapping(x, where: str) -> dict:
    if x is None:
        return {}
    if not isinstance(x, dict):
        raise VermouthError(f"{where}: expected a mapping, got {type(x).__name__}")
    return x


def _substitute(x, env: dict, path: Path):
    if isinstance(x, str):
        def one(m):
            if m.group(1) not in env:
                raise VermouthError(f"recipe {path} needs ${{{m.group(1)}}}: give --set {m.group(1)}=VALUE, put it in "
                                    "a --config file, or set it in the environment")
            return env[m.group(1)]
        return _VAR.sub(one, x)
    if isinstance(x, list):
        return [_substitute(v, env, path) for v in x]
    if isinstance(x, dict):
        return {k: _substitute(v, env, path) for k, v in x.items()}
    return x


def _check_keys(d: dict, allowed, where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise VermouthError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                            f"(allowed: {', '.join(allowed)})")


def _parse(raw: dict, path: Path) -> Recipe:
    where = f"recipe {path}"
    _check_keys(raw, TOP_KEYS, where)
    default_task = raw.get("task")
    if default_task is not None and default_task not in TASKS:
        raise VermouthError(f"{where}: unknown task {default_task!r} (choose from {', '.join(TASKS)})")
    datasets = _datasets(_mapping(raw.get("datasets"), f"{where}: datasets"), default_task, where)
    models = _models(raw.get("models"), where)
    extract = _mapping(raw.get("extract"), f"{where}: extract")
    _check_keys(extract, EXTRACT_KEYS, f"{where}: extract")
    train = _mapping(raw.get("train"), f"{where}: train")
    _check_keys(train, ("schedule", *TASKS, *SETTING_KEYS), f"{where}: train")
    for task in TASKS:
        _check_keys(_mapping(train.get(task), f"{where}: train.{task}"), SETTING_KEYS, f"{where}: train.{task}")
    grid = _mapping(raw.get("grid"), f"{where}: grid")
    _check_keys(grid, SETTING_KEYS, f"{where}: grid")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise VermouthError(f"{where}: grid.{k} must be a non-empty list")
    variants = raw.get("variants") or [{}]
    if not isinstance(variants, list):
        raise VermouthError(f"{where}: variants must be a list of mappings")
    for i, v in enumerate(variants):
        _check_keys(_mapping(v, f"{where}: variants[{i}]"), SETTING_KEYS, f"{where}: variants[{i}]")
        both = sorted(set(v or {}) & set(grid))
        if both:
            raise VermouthError(f"{where}: variants[{i}] sets {', '.join(both)}, which the grid also varies")
    points = _points(datasets, train, grid, [v or {} for v in variants], where)
    scale = raw.get("paper_scale", 100)
    paper = _paper(raw.get("paper") or [], datasets, scale, where)
    return Recipe(str(raw.get("name") or path.stem), str(path), datasets, models, extract, points, paper)


def _datasets(raw: dict, default_task: str | None, where: str) -> dict[str, DatasetSpec]:
    if not raw:
        raise VermouthError(f"{where}: no datasets")
    out = {}
    for label, spec in raw.items():
        w = f"{where}: datasets.{label}"
        spec = {"path": spec} if isinstance(spec, str) else _mapping(spec, w)
        task = spec.get("task", default_task)
        if task not in TASKS:
            raise VermouthError(f"{w}: give its task ({', '.join(TASKS)}), here or as the recipe's `task`")
        _check_keys(spec, DATASET_KEYS[task], w)
        if not spec.get("path"):
            raise VermouthError(f"{w}: no path")
        options = {k: v for k, v in spec.items() if k not in ("task", "path")}
        if task == "seg":
            evals = options.get("eval") or {}
            if isinstance(evals, list):  # a list of PATH[:LAYOUT[:SPLIT]] strings or mappings with a label
                evals = _eval_list(evals, w)
            for name, ev in evals.items():
                _check_keys(_mapping(ev, f"{w}.eval.{name}"), EVAL_KEYS, f"{w}.eval.{name}")
            options["eval"] = {str(k): dict(v) for k, v in evals.items()}
        out[str(label)] = DatasetSpec(str(label), task, str(spec["path"]), options)
    return out


def _eval_list(items: list, where: str) -> dict:
    out = {}
    for item in items:
        if isinstance(item, str):
            parts = item.split(":")
            item = dict(zip(("path", "layout", "split"), parts))
            label = Path(parts[0]).name
        else:
            item = dict(_mapping(item, where))
            label = item.pop("name", None) or Path(item.get("path", "")).name
        out[label] = {k: v for k, v in item.items() if v}
    return out


def _models(raw, where: str) -> Models:
    if raw == "tiny":
        return Models(tiny=True)
    raw = _mapping(raw, f"{where}: models")
    _check_keys(raw, MODEL_KEYS, f"{where}: models")
    experts = _mapping(raw.get("experts"), f"{where}: models.experts")
    _check_keys(experts, tuple(EXPERT_MODELS), f"{where}: models.experts")
    return Models(**{**raw, "experts": dict(experts)})


def _points(datasets: dict[str, DatasetSpec], train: dict, grid: dict, variants: list[dict], where: str) -> list[Point]:
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    base = _nulls({k: v for k, v in train.items() if k not in TASKS and k != "schedule"}, f"{where}: train")
    schedule = train.get("schedule", "paper")
    points, seen = [], {}
    for ds in datasets.values():
        for variant in variants:
            for combo in combos:
                varied = _nulls({**variant, **combo}, where)
                try:
                    per_task = _nulls(train.get(ds.task) or {}, f"{where}: train.{ds.task}")
                    s = task_settings(ds.task, schedule, **{**base, **per_task, **varied})
                except (VermouthError, TypeError) as exc:
                    raise VermouthError(f"{where}: {ds.label} with {varied or 'the base settings'}: {exc}") from None
                if (ds.label, s) in seen:
                    continue  # e.g. a variant that restates a default
                name = point_name(ds.label, varied)
                seen[(ds.label, s)] = name
                points.append(Point(name, ds, s, varied))
    names = [p.name for p in points]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise VermouthError(f"{where}: two points would both be named {dup[0]}")
    return points


def _nulls(varied: dict, where: str) -> dict:
    """YAML reads a bare null (and ~) as None; for expert and attn_maps that means "none", for any
    other key it is almost surely the prompt mode "null" written without quotes."""
    out = {}
    for k, v in varied.items():
        if v is None and k not in ("expert", "attn_maps"):
            raise VermouthError(f'{where}: {k}: null is not a value here (for the prompt mode write "null" in quotes)')
        out[k] = "none" if v is None else v
    return out


def point_name(label: str, varied: dict) -> str:
    parts = [label] + [f"{k}_{_show(v)}" for k, v in varied.items()]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def _show(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v).replace(",", "+")


def _paper(raw: list, datasets: dict[str, DatasetSpec], scale: float, where: str) -> list[dict]:
    labels = set(datasets) | {e for d in datasets.values() for e, _ in d.evals()}
    out = []
    for i, item in enumerate(raw):
        w = f"{where}: paper[{i}]"
        item = dict(_mapping(item, w))
        _check_keys(item, ("dataset", "metric", "value", *SETTING_KEYS), w)
        if item.get("dataset") not in labels:
            raise VermouthError(f"{w}: dataset {item.get('dataset')!r} is not one of the recipe's ({', '.join(sorted(labels))})")
        if not isinstance(item.get("value"), (int, float)):
            raise VermouthError(f"{w}: value must be a number")
        item["value"] = item["value"] / scale
        out.append(item)
    return out


def task_of_score(recipe: Recipe, label: str) -> str:
    """The task whose metric a score label (a dataset or a segmentation eval set) reports."""
    for d in recipe.datasets.values():
        if d.label == label or label in dict(d.evals()):
            return d.task
    raise KeyError(label)
