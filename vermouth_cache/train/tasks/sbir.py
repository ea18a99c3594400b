"""Zero-shot sketch-based image retrieval from the cache (PAPER.md section 5).

    vermouth-cache extract SKETCHY/photo/tx_000000000000 --store STORE --noise ddim-inversion --expert resnet18
    vermouth-cache extract SKETCHY/sketch/tx_000000000000 --store STORE --noise ddim-inversion --expert resnet18
    vermouth-cache train sbir --store STORE --dataset SKETCHY --out RUN

The head trains on the SEEN classes only, photos and sketches alike, with the text classifier
over the seen class prompts. Then every unseen sketch queries the gallery of unseen photos by
cosine similarity of the head's outputs: mAP@all, mAP@200, P@100 and P@200 (`metrics.py` says
exactly how). Photo and sketch classes are joined by class NAME.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.sbir import SBIR_TREES, find_sbir_trees, sbir_split
from vermouth_cache.data.vocab import read_name_list, unseen_classes
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import (HeadJob, RunOptions, base_config, build_head, ce_loss, class_text,
                                         feature_pins, head_facts, infer_many, loader_for, shared_settings)
from vermouth_cache.train.heads import TextClassifier
from vermouth_cache.train.inputs import CachedSplit, open_split, union_split
from vermouth_cache.train.loop import Member, fit_many
from vermouth_cache.train.metrics import retrieval_metrics
from vermouth_cache.train.runs import finish_run, prepare_run_dir
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks.base import DataOptions, Task, metric_keys

SBIR_NAMES = tuple(name for _, _, name in SBIR_TREES if name)  # the datasets with a literature unseen split


@dataclass(frozen=True)
class SbirData:
    root: str  # the dataset root holding a photo tree and a sketch tree
    unseen: str | None = None  # a file of unseen class names; default: the literature's split for `name`
    name: str | None = None  # sketchy | tuberlin | quickdraw; guessed from the layout when absent


class SbirOptions(DataOptions):
    path: str = Field(description="SBIR root with a photo and a sketch tree (Sketchy, TU-Berlin, QuickDraw or "
                                  "photo/ + sketch/).")
    unseen: str | None = Field(None, description="File of unseen class names (default: the literature's split "
                                                 "for the dataset).")
    name: Literal[SBIR_NAMES] | None = Field(None, description="Which dataset's default unseen split to use "
                                                               "(default: guessed from the layout).")

    def data(self) -> SbirData:
        return SbirData(self.path, self.unseen, self.name)

    def extract_parts(self) -> list[dict]:
        """The photo tree and the sketch tree, every class (the split into seen and unseen is by name)."""
        photo, sketch, _ = find_sbir_trees(self.path)
        return [{"dataset": str(photo)}, {"dataset": str(sketch)}]


def restrict(split: CachedSplit, keep: np.ndarray, labels: np.ndarray) -> CachedSplit:
    """The samples of `split` where `keep`, relabelled."""
    idx = np.flatnonzero(keep)
    return replace(split, indices=[split.indices[i] for i in idx], labels=labels[idx],
                   sample_ids=[split.sample_ids[i] for i in idx])


class PairedLoader:
    """Photo and sketch batches side by side (half a batch each), the shorter one cycled, so every
    step sees both domains."""

    def __init__(self, a, b):
        self.a, self.b = a, b
        self._epoch = 0

    def __len__(self):
        return max(len(self.a), len(self.b))

    @property
    def bar(self):
        return getattr(self.a, "bar", None)

    def set_epoch(self, epoch: int) -> None:
        self.a.set_epoch(epoch)
        self.b.set_epoch(epoch)
        self._epoch = epoch

    def __iter__(self):
        long, short = (self.a, self.b) if len(self.a) >= len(self.b) else (self.b, self.a)
        it, rounds = iter(short), 0
        for x in long:
            try:
                y = next(it)
            except StopIteration:  # cycle the shorter domain with a fresh order
                rounds += 1
                short.set_epoch(self._epoch * 1000 + rounds)
                it = iter(short)
                y = next(it)
            yield {k: torch.cat([x[k], y[k]]) for k in x}


def train_sbir(data: SbirData, s: TaskSettings, opts: RunOptions) -> dict:
    """Train a head on the seen classes; returns the metrics written to RUN/metrics.json."""
    return TASK.train(data, s, opts)


@dataclass(frozen=True)
class _Trees:
    photos: object  # Dataset
    sketches: object
    name: str | None
    seen: tuple[str, ...]
    unseen: tuple[str, ...]


def _trees(data: SbirData) -> _Trees:
    photo_dir, sketch_dir, guess = find_sbir_trees(data.root)
    name = data.name or guess
    if data.unseen:
        unseen = read_name_list(data.unseen)
    elif name:
        unseen = unseen_classes(name)
    else:
        raise VermouthError(f"{data.root}: cannot tell which dataset this is; give --unseen FILE (or --name)")
    photos, sketches = load_dataset(photo_dir), load_dataset(sketch_dir)
    split = sbir_split(photos.classnames, sketches.classnames, list(unseen))
    return _Trees(photos, sketches, name, tuple(split.seen), tuple(split.unseen))


def prepare_sbir(data: SbirData, s: TaskSettings, opts: RunOptions) -> None:
    """Write what a run adds to the store (the seen classes' prompt features)."""
    tr = _trees(data)
    class_text(Store(opts.store), tr.seen, tr.name or "sbir", s, opts)


def by_name(sp: CachedSplit, names: tuple[str, ...]) -> CachedSplit:
    """The samples of `sp` whose class is in `names`, labelled by position in `names`."""
    index = {n: i for i, n in enumerate(names)}
    cls = [sp.dataset.classnames[y] for y in sp.labels]
    keep = np.array([c in index for c in cls])
    return restrict(sp, keep, np.array([index.get(c, -1) for c in cls]))


def train_sbir_heads(data: SbirData, jobs: list[HeadJob], opts: RunOptions) -> list[dict]:
    """Several heads in one pass over the same cached photos and sketches; one metrics dict per head."""
    s0 = shared_settings(jobs)
    outs = [prepare_run_dir(j.out, opts.overwrite) for j in jobs]
    store = Store(opts.store)
    tr = _trees(data)
    pins = feature_pins(opts)
    per_job = [(open_split(store, tr.photos, j.settings, pins=pins),
                open_split(store, tr.sketches, j.settings, pins=pins)) for j in jobs]
    photos = union_split([p for p, _ in per_job])
    sketches = union_split([k for _, k in per_job])
    seen_p, seen_s = by_name(photos, tr.seen), by_name(sketches, tr.seen)
    gallery, queries = by_name(photos, tr.unseen), by_name(sketches, tr.unseen)

    members, classifiers, templates_of = [], [], []
    for j, (p_split, _) in zip(jobs, per_job):
        text, templates = class_text(store, tr.seen, tr.name or "sbir", j.settings, opts)
        classifier = TextClassifier(text, j.settings.temperature)
        model = build_head(p_split, j.settings, "global", text.shape[1], opts.torch_device)
        members.append(Member(model, list(model.parameters()), ce_loss(model, classifier), j.settings))
        classifiers.append(classifier)
        templates_of.append(templates)
    half = s0.with_(batch_size=max(1, s0.batch_size // 2))
    train_loader = PairedLoader(loader_for(seen_p, half, opts, shuffle=True, desc=f"train sbir {tr.name or ''}"),
                                loader_for(seen_s, half.with_(seed=s0.seed + 1), opts, shuffle=True))
    results = fit_many(members, train_loader, s0)
    models = [m.model for m in members]
    qs, _ = infer_many(models, loader_for(queries, s0, opts, shuffle=False))
    gs, _ = infer_many(models, loader_for(gallery, s0, opts, shuffle=False))
    random_map = _random_map(queries.labels, gallery.labels)
    out_metrics = []
    for j, (p_split, k_split), m, result, q, g, classifier, templates, out in zip(
            jobs, per_job, members, results, qs, gs, classifiers, templates_of, outs):
        s = j.settings
        sim = (F.normalize(q, dim=1) @ F.normalize(g, dim=1).T).cpu().numpy()
        metrics = {
            "task": "sbir",
            **retrieval_metrics(sim, queries.labels, gallery.labels, ks=(100, 200)),
            "random_ranking_mAP": random_map,
            "steps": result.steps,
            "n": {"seen_photos": len(seen_p.indices), "seen_sketches": len(seen_s.indices),
                  "unseen_photos": len(gallery.indices), "unseen_sketches": len(queries.indices)},
            "skipped": {**p_split.skipped, **k_split.skipped},
            "entries": {"photos": p_split.keys(), "sketches": k_split.keys()},
        }
        config = {**base_config("sbir", s, opts, classifier, templates), "data": data.__dict__, "name": tr.name,
                  "seen": list(tr.seen), "unseen": list(tr.unseen),
                  "datasets": {"photos": {"name": tr.photos.name, "identity": tr.photos.identity()},
                               "sketches": {"name": tr.sketches.name, "identity": tr.sketches.identity()}},
                  "head": head_facts(m.model, s, "global"), "heads_in_pass": len(jobs),
                  "title": f"sbir {tr.name or data.root}, t={s.t}, {s.stages}, {s.head}"}
        out_metrics.append(finish_run(out, config, metrics, m.model, result, select=None))
    return out_metrics


def _random_map(q_labels: np.ndarray, g_labels: np.ndarray, repeats: int = 5) -> float:
    """mAP@all of random rankings (seeded), the floor a trained head must clear."""
    rng = np.random.default_rng(0)
    return float(np.mean([retrieval_metrics(rng.random((len(q_labels), len(g_labels))), q_labels, g_labels)["mAP@all"]
                          for _ in range(repeats)]))


TASK = Task(
    name="sbir",
    description="Zero-shot SBIR: train on seen classes, unseen sketches query unseen photos (mAP, P@K).",
    options=SbirOptions,
    # temperature "0.02 (table is ambiguous)": PAPER.md section 4
    table7=TaskSettings(resolution=256, t=200, stages="mid,up", noise="ddim-inversion", attn_maps=None,
                        text_proj=True, temperature=0.02, lr=1e-4, lr_schedule="exponential", batch_size=64,
                        epochs=1),
    fast={},  # one epoch already
    prepare=prepare_sbir,
    train_heads=train_sbir_heads,
    main_metric="mAP@all",
    summary=metric_keys("mAP@all", "mAP@200", "P@100", "P@200", "random_ranking_mAP", "steps", "n"),
)
