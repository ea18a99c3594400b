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

Every key is checked: an unknown one is an error naming it and where it is. A dataset's keys are
`task` and its task's data options (`path`, then the fields of e.g. `FewshotOptions` in
train/tasks/fewshot.py: `vermouth-cache train TASK --help` lists them); grid and variant keys are
`TaskSettings` fields. A point is one dataset with one combination; two combinations that resolve
to the same settings are one point.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.bundled import data_dir, pipeline_file
from vermouth_cache.extract.selection import PINS
from vermouth_cache.models.backbones import DEFAULT_SD_MODEL
from vermouth_cache.models.loading import DEFAULT_CAPTIONER, DEFAULT_CLIP_MODEL, EXPERT_MODELS
from vermouth_cache.train.config import Declared, check_keys
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks import TASKS, get_task, task_settings
from vermouth_cache.train.tasks.base import DataOptions

# extraction-only options, fixed for the sweep: the recipe fields that select features
# (selection.PINS; the captioner is `models:`), then how the extraction runs
EXTRACT_KEYS = (*(p.extract for p in PINS if p.name != "captioner"), "text_tokens", "batch_size",
                "shard_size", "precision", "on_error")
SETTING_KEYS = tuple(TaskSettings.model_fields)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class Models(Declared):
    """`models: tiny` (tiny random models written into the sweep's output), or hub ids and directories."""
    tiny: bool = False
    sd_model: str = DEFAULT_SD_MODEL
    captioner: str = DEFAULT_CAPTIONER
    clip_model: str = DEFAULT_CLIP_MODEL
    experts: dict[Literal[tuple(EXPERT_MODELS)], str] = Field(default_factory=dict)  # expert -> hub id or directory

    @model_validator(mode="before")
    @classmethod
    def _tiny(cls, raw):
        if isinstance(raw, str) and raw != "tiny":
            raise ValueError(f"expected `tiny` or a mapping (sd_model, captioner, clip_model, experts), got {raw!r}")
        return {"tiny": True} if raw == "tiny" else raw


class RecipeFile(Declared):
    """The recipe's top level as written; the sections whose keys depend on the tasks and the
    settings are checked by `_parse`."""
    name: str | None = None
    task: str | None = None  # default task of the datasets
    datasets: dict[str, Any] = Field(default_factory=dict)  # label -> path, or the task's data options
    models: Models = Field(default_factory=Models)
    extract: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)  # schedule, settings, and per task: settings
    grid: dict[str, list] = Field(default_factory=dict)
    variants: list[dict[str, Any] | None] = Field(default_factory=lambda: [{}])
    paper: list[dict[str, Any]] = Field(default_factory=list)
    paper_scale: float = 100

    @field_validator("datasets", "models", "extract", "train", "grid", "variants", "paper", mode="before")
    @classmethod
    def _empty(cls, value, info):
        # a YAML key with nothing under it reads as None: the section's default
        return cls.model_fields[info.field_name].get_default(call_default_factory=True) if value is None else value

    @field_validator("variants")
    @classmethod
    def _at_least_one(cls, value):
        return value or [{}]  # no variants: the grid alone


@dataclass(frozen=True)
class DatasetSpec:
    label: str
    task: str
    path: str
    options: dict  # the task's other keys (shots, layout, eval, ...), checked by its DataOptions

    @property
    def data_options(self) -> DataOptions:
        return get_task(self.task).options(path=self.path, **self.options)

    def evals(self) -> list[tuple[str, dict]]:
        """The datasets a run is evaluated on besides its own (segmentation's `eval`): (label, where)."""
        return list(self.data_options.eval_sets().items())

    def facts(self) -> dict:
        """What identifies the dataset in a point's fingerprint."""
        return {"label": self.label, "task": self.task, "path": self.path, "options": self.options}


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
    """Read, substitute and check a recipe (a file, or the name of a bundled pipeline such as
    demo.yaml); `variables` beat the `config` file, which beats the environment."""
    path = Path(path)
    if not path.is_file():
        if path.parent != Path(".") or path.suffix not in (".yaml", ".yml"):
            raise VermouthError(f"recipe not found: {path}")
        try:
            path = pipeline_file(path.name)  # the pipelines installed with the package
        except VermouthError as exc:
            raise VermouthError(f"recipe not found: {path} ({exc})") from None
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


def _parse(raw: dict, path: Path) -> Recipe:
    where = f"recipe {path}"
    top = RecipeFile.parse(raw, where=where)
    if top.task is not None and top.task not in TASKS:
        raise VermouthError(f"{where}: unknown task {top.task!r} (choose from {', '.join(TASKS)})")
    datasets = _datasets(top.datasets, top.task, where)
    check_keys(top.extract, EXTRACT_KEYS, f"{where}: extract")
    _check_extract_values(top.extract, f"{where}: extract")
    check_keys(top.train, ("schedule", *TASKS, *SETTING_KEYS), f"{where}: train")
    for task in TASKS:
        check_keys(_mapping(top.train.get(task), f"{where}: train.{task}"), SETTING_KEYS, f"{where}: train.{task}")
    check_keys(top.grid, SETTING_KEYS, f"{where}: grid")
    for k, v in top.grid.items():
        if not v:
            raise VermouthError(f"{where}: grid.{k} must be a non-empty list")
    variants = [v or {} for v in top.variants]
    for i, v in enumerate(variants):
        check_keys(v, SETTING_KEYS, f"{where}: variants[{i}]")
        both = sorted(set(v) & set(top.grid))
        if both:
            raise VermouthError(f"{where}: variants[{i}] sets {', '.join(both)}, which the grid also varies")
    points = _points(datasets, top.train, top.grid, variants, where)
    paper = _paper(top.paper, datasets, top.paper_scale, where)
    return Recipe(str(top.name or path.stem), str(path), datasets, top.models, top.extract, points, paper)


def _check_extract_values(options: dict, where: str) -> None:
    """The values of `extract:` checked as `extract` would check them (types, choices, bounds)."""
    from vermouth_cache.extract.request import ExtractRequest

    try:
        for name, value in options.items():
            ExtractRequest.check_value(name, value)
    except VermouthError as exc:
        raise VermouthError(f"{where}: {exc}") from None


def _datasets(raw: dict, default_task: str | None, where: str) -> dict[str, DatasetSpec]:
    """Each entry checked by its task's DataOptions: the keys a task takes are its data options."""
    if not raw:
        raise VermouthError(f"{where}: no datasets")
    out = {}
    for label, spec in raw.items():
        w = f"{where}: datasets.{label}"
        spec = {"path": spec} if isinstance(spec, str) else dict(_mapping(spec, w))
        task = spec.pop("task", default_task)
        if task is None:
            raise VermouthError(f"{w}: give its task ({', '.join(TASKS)}), here or as the recipe's `task`")
        if task not in TASKS:
            raise VermouthError(f"{w}: unknown task {task!r} (choose from {', '.join(TASKS)})")
        options = get_task(task).options
        check_keys(spec, ("task", *options.model_fields), w)
        if not spec.get("path"):
            raise VermouthError(f"{w}: no path")
        checked = options.parse(spec, where=w).model_dump(exclude_unset=True)
        out[str(label)] = DatasetSpec(str(label), task, str(checked.pop("path")), checked)
    return out


def _points(datasets: dict[str, DatasetSpec], train: dict, grid: dict, variants: list[dict], where: str) -> list[Point]:
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    base = _nulls({k: v for k, v in train.items() if k not in TASKS and k != "schedule"}, f"{where}: train")
    schedule = train.get("schedule", "paper")
    points, seen = [], {}
    for ds in datasets.values():
        for variant in variants:
            for combo in combos:
                unread = get_task(ds.task).unread  # a grid over temperature leaves a depth point alone
                varied = {k: v for k, v in _nulls({**variant, **combo}, where).items() if k not in unread}
                try:
                    per_task = _nulls(train.get(ds.task) or {}, f"{where}: train.{ds.task}")
                    if unread_given := sorted(set(per_task) & set(unread)):
                        raise VermouthError(f"task {ds.task} reads no {', '.join(unread_given)}")
                    s = task_settings(ds.task, schedule, **{**{k: v for k, v in base.items() if k not in unread},
                                                            **per_task, **varied})
                except VermouthError as exc:
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
        item = dict(item)
        check_keys(item, ("dataset", "metric", "value", *SETTING_KEYS), w)
        if item.get("dataset") not in labels:
            raise VermouthError(f"{w}: dataset {item.get('dataset')!r} is not one of the recipe's ({', '.join(sorted(labels))})")
        if not isinstance(item.get("value"), (int, float)):
            raise VermouthError(f"{w}: value must be a number")
        item["value"] = item["value"] / scale
        out.append(item)
    return out
