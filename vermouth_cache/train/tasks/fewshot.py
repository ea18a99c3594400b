"""Few-shot classification from the cache, CoOp protocol (PAPER.md section 5).

    vermouth-cache train fewshot --store STORE --dataset split_zhou_OxfordPets.json --shots 16 --out RUN

K shots per class from the train split with a seed (the same sampler `extract --shots` uses), the
val split for model selection (the epoch with the best val top-1 is kept), top-1 on the test split.
Features come from an extraction of that K-shot subset, or of the whole train split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import (HeadJob, RunOptions, base_config, build_head, ce_loss, class_text,
                                         feature_pins, head_facts, infer_many, loader_for, shared_settings)
from vermouth_cache.train.heads import TextClassifier
from vermouth_cache.train.inputs import CachedSplit, open_split, union_split
from vermouth_cache.train.loop import Member, fit_many
from vermouth_cache.train.metrics import per_class_accuracy, top1
from vermouth_cache.train.runs import finish_run, prepare_run_dir
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks.base import DataOptions, Task, metric_keys

SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class FewshotData:
    dataset: str  # a CoOp split file (or any dataset with train/val/test splits)
    image_root: str | None = None
    shots: int = 16
    shot_seed: int = 0


class FewshotOptions(DataOptions):
    path: str = Field(description="CoOp split file split_zhou_<Name>.json (train/val/test splits).")
    image_root: str | None = Field(None, description="Image root of the split file (default: images/ beside it).")
    shots: Literal[SHOTS] = Field(16, description="Shots per class from the train split.")
    shot_seed: int = Field(0, description="Seed of the K-shot sample.")

    def data(self) -> FewshotData:
        return FewshotData(self.path, self.image_root, self.shots, self.shot_seed)

    def extract_parts(self) -> list[dict]:
        """The K-shot train subset (its val and test splits whole)."""
        base = {"dataset": self.path, "image_root": self.image_root}
        return [{**base, "split": "train", "shots": self.shots, "shot_seed": self.shot_seed},
                {**base, "split": "val"}, {**base, "split": "test"}]


def train_fewshot(data: FewshotData, s: TaskSettings, opts: RunOptions) -> dict:
    """Train a head on K-shot cached features; returns the metrics written to RUN/metrics.json."""
    return TASK.train(data, s, opts)


def _splits(data: FewshotData) -> dict:
    kw = {"image_root": data.image_root}
    return {"train": load_dataset(data.dataset, split="train", shots=data.shots, shot_seed=data.shot_seed, **kw),
            "full_train": load_dataset(data.dataset, split="train", **kw),
            "val": load_dataset(data.dataset, split="val", **kw),
            "test": load_dataset(data.dataset, split="test", **kw)}


def prepare_fewshot(data: FewshotData, s: TaskSettings, opts: RunOptions) -> None:
    """Write what a run adds to the store (the class-prompt features), so that runs in parallel only read it."""
    train_ds = _splits(data)["train"]
    class_text(Store(opts.store), train_ds.classnames, train_ds.name.split("/")[0], s, opts)


def train_fewshot_heads(data: FewshotData, jobs: list[HeadJob], opts: RunOptions) -> list[dict]:
    """Train several heads in one pass over the same cached K-shot features (`sweep`); one metrics
    dict per head, each equal to what the head gets trained alone."""
    s0 = shared_settings(jobs)
    outs = [prepare_run_dir(j.out, opts.overwrite) for j in jobs]
    store = Store(opts.store)
    ds = _splits(data)
    pins = feature_pins(opts)
    per_job = []
    for j in jobs:
        sp = {"train": open_split(store, ds["train"], j.settings, pins=pins, superset=ds["full_train"]),
              "val": open_split(store, ds["val"], j.settings, pins=pins),
              "test": open_split(store, ds["test"], j.settings, pins=pins)}
        _same_features(sp["train"], sp["val"], sp["test"])
        per_job.append(sp)
    train, val, test = (union_split([sp[k] for sp in per_job]) for k in ("train", "val", "test"))

    name = ds["train"].name.split("/")[0]
    classnames = ds["train"].classnames
    n_classes = len(classnames)
    members, scorers, classifiers, texts = [], [], [], []
    for j, sp in zip(jobs, per_job):
        text, templates = class_text(store, classnames, name, j.settings, opts)
        classifier = TextClassifier(text, j.settings.temperature)
        model = build_head(sp["train"], j.settings, "global", text.shape[1], opts.torch_device)
        members.append(Member(model, list(model.parameters()), ce_loss(model, classifier), j.settings))
        scorers.append(torch.nn.Sequential(model, classifier))
        classifiers.append(classifier)
        texts.append(templates)

    def accuracy(split: CachedSplit, loader) -> list[tuple[float, list]]:
        logits, _ = infer_many(scorers, loader)
        preds = [lg.argmax(1).cpu().numpy() for lg in logits]
        return [(top1(p, split.labels), per_class_accuracy(p, split.labels, n_classes)) for p in preds]

    val_loader = loader_for(val, s0, opts, shuffle=False)
    results = fit_many(members, loader_for(train, s0, opts, shuffle=True, desc=f"train fewshot {name}"), s0,
                       evaluate=lambda: [{"top1": a} for a, _ in accuracy(val, val_loader)], select="top1")
    tests = accuracy(test, loader_for(test, s0, opts, shuffle=False))
    out_metrics = []
    for j, sp, m, result, (test_top1, per_class), classifier, templates, out in zip(
            jobs, per_job, members, results, tests, classifiers, texts, outs):
        s = j.settings
        config = {**base_config("fewshot", s, opts, classifier, templates),
                  "data": data.__dict__, "classnames": list(classnames),
                  "datasets": {k: {"name": ds[k].name, "identity": ds[k].identity()} for k in ("train", "val", "test")},
                  "head": head_facts(m.model, s, "global"), "heads_in_pass": len(jobs),
                  "title": f"fewshot {name} {data.shots}-shot, t={s.t}, {s.stages}, {s.head}"}
        metrics = {
            "task": "fewshot",
            "top1": test_top1,
            "val_top1": result.best["top1"] if result.best else None,
            "best_step": result.best_step,
            "steps": result.steps,
            "chance": 1 / n_classes,
            "per_class_top1": dict(zip(classnames, per_class)),
            "n": {"train": len(train.indices), "val": len(val.indices), "test": len(test.indices)},
            "skipped": {**sp["train"].skipped, **sp["val"].skipped, **sp["test"].skipped},
            "entries": {"train": sp["train"].keys(), "val": sp["val"].keys(), "test": sp["test"].keys()},
        }
        out_metrics.append(finish_run(out, config, metrics, m.model, result, select="top1"))
    return out_metrics


def _same_features(*splits: CachedSplit) -> None:
    """train/val/test must share the U-net, schedule and options; only the dataset may differ."""
    facts = [{k: v for k, v in sp.features.manifest["recipe"].items() if k not in ("latents", "text")} for sp in splits]
    for sp, f in zip(splits[1:], facts[1:]):
        diff = sorted(k for k in set(f) | set(facts[0]) if f.get(k) != facts[0].get(k))
        if diff:
            raise VermouthError(f"features of {sp.dataset.name} and {splits[0].dataset.name} were made "
                                f"differently ({', '.join(diff)}): extract every split with the same options")


TASK = Task(
    name="fewshot",
    description="Few-shot classification (CoOp protocol): K-shot train, val picks the epoch, top-1 on test.",
    options=FewshotOptions,
    table7=TaskSettings(resolution=256, t=200, stages="down,mid", noise="ddpm", attn_maps="up", text_proj=False,
                        temperature=0.2, lr=1e-5, lr_schedule="none", batch_size=64, epochs=100),
    fast={"epochs": 10},
    prepare=prepare_fewshot,
    train_heads=train_fewshot_heads,
    main_metric="top1",
    summary=metric_keys("top1", "val_top1", "chance", "best_step", "steps", "n"),
)
