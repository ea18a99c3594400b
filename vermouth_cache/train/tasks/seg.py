"""Open-vocabulary semantic segmentation from the cache (PAPER.md section 5).

    vermouth-cache extract COCOSTUFF --layout coco-stuff --split train2017 --store STORE --t 10 --resolution 512 \\
        --attn-maps up --expert resnet18
    vermouth-cache train seg --store STORE --dataset COCOSTUFF --layout coco-stuff --split train2017 \\
        --eval ADE:ade20k:validation --eval PC:pascal-context:val --out RUN

The dense U-head turns each pixel of the finest pyramid level into a vector; its cosine with the
CLIP features of the dataset's class prompts, over a temperature, gives per-pixel logits. Training
upsamples the logits (bilinear) to the cached training masks (the image's resize-and-crop, label
255 ignored, cross-entropy). Evaluation runs on other datasets with THEIR class names: logits are
upsampled to the crop region of each label map at its native resolution (`seg_data.crop_box`),
and mIoU is accumulated over a confusion matrix, ignored pixels skipped.

The default is the cached (frozen-backbone) variant. `--tune-norms` trains the U-net's norm
layers as the paper did; their features change every step, so they are recomputed online from
the cached latents and text conditions: one U-net forward and backward per step instead of a read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field, field_validator, model_validator

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.datasets import as_slide_views, load_dataset
from vermouth_cache.data.seg import LAYOUTS, crop_box, load_seg_dataset, read_mask
from vermouth_cache.data.views import scaled_size
from vermouth_cache.extract.masks import ensure_masks, ignore_value, label_rule
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import (HeadJob, RunOptions, base_config, build_head, class_text, dense_head_facts,
                                         feature_pins, head_facts, loader_for, shared_settings)
from vermouth_cache.train.config import Declared
from vermouth_cache.train.heads import ClosedSet, TextClassifier
from vermouth_cache.train.inputs import CachedSplit, open_split, union_split
from vermouth_cache.train.loader import Field as LoaderField
from vermouth_cache.train.loop import Member, fit_many
from vermouth_cache.train.metrics import confusion_matrix, miou
from vermouth_cache.train.online import OnlineTaps
from vermouth_cache.train.runs import finish_run, prepare_run_dir
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.vpd_online import freeze_prompt, mode_label, online_taps, table_pins
from vermouth_cache.train.vpd_heads import SemanticFPN, level_channels, pyramid_stages
from vermouth_cache.train.tasks.base import DataOptions, Task

Layout = Literal[tuple(LAYOUTS)]


@dataclass(frozen=True)
class SegSource:
    path: str
    layout: str | None = None
    split: str | None = None
    classnames: str | None = None  # a file of class names replacing the layout's list

    def load(self, slide: int | None = None):
        """The dataset; `slide`: as sliding windows of that size (data/views.py), for slide inference."""
        if self.classnames:
            ds = load_seg_dataset(self.path, self.layout, self.split, classnames_file=self.classnames)
            return as_slide_views(ds, slide) if slide else ds
        return load_dataset(self.path, layout=self.layout, split=self.split, slide=slide)


@dataclass(frozen=True)
class SegData:
    train: SegSource
    evals: tuple[SegSource, ...] = ()
    slide: bool = False  # score the evaluation sets by sliding windows at native size


class EvalSet(Declared):
    """A dataset a segmentation head is evaluated on, with its own class names."""
    path: str
    layout: Layout | None = None
    split: str | None = None
    classnames: str | None = None


class SegOptions(DataOptions):
    path: str = Field(description="Training segmentation dataset root (images + PNG label maps).")
    layout: Layout | None = Field(None, description="Its layout (default: detected).")
    split: str | None = Field(None, description="Its split, e.g. train2017, training, train.")
    classnames: str | None = Field(None, description="A file of class names replacing the layout's list.")
    eval: dict[str, EvalSet] = Field(
        default_factory=dict, description="Evaluation dataset PATH[:LAYOUT[:SPLIT]], with its own class names; "
                                          "repeatable or comma-separated.")
    slide: bool = Field(False, description="Score the evaluation sets by sliding windows (crop and short side "
                                           "--resolution, stride 341), logits averaged, at each image's native size "
                                           "(VPD's test); extract them with --slide.")

    @field_validator("eval", mode="before")
    @classmethod
    def _labelled_evals(cls, evals):
        """{label: {path, layout, split, classnames}}, as a recipe may write it; or a list of
        PATH[:LAYOUT[:SPLIT]] strings (the command line's form) and mappings with a `name`, labelled
        by the dataset folder's name (and the split when two share a folder)."""
        if evals is None:
            return {}
        return _labelled(evals) if isinstance(evals, (list, tuple)) else evals

    @model_validator(mode="after")
    def _slide_needs_evals(self):
        if self.slide and not self.eval:
            raise ValueError("--slide scores the --eval sets by sliding windows: give --eval")
        return self

    def data(self) -> SegData:
        return SegData(SegSource(self.path, self.layout, self.split, self.classnames),
                       tuple(SegSource(e.path, e.layout, e.split, e.classnames) for e in self.eval.values()), self.slide)

    def extract_parts(self) -> list[dict]:
        """The training split and every evaluation set (as sliding windows with `slide`)."""
        return [{"dataset": self.path, "layout": self.layout, "split": self.split}] + [
            {"dataset": e.path, "layout": e.layout, "split": e.split, **({"slide": True} if self.slide else {})}
            for e in self.eval.values()]

    def eval_sets(self) -> dict[str, dict]:
        return {label: e.model_dump(exclude_unset=True) for label, e in self.eval.items()}


def _labelled(items) -> dict[str, dict]:
    out = {}
    for item in items:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) > 3:
                raise ValueError(f"{item!r}: expected PATH[:LAYOUT[:SPLIT]]")
            item = dict(zip(("path", "layout", "split"), parts))
            label = Path(parts[0]).name
        elif isinstance(item, dict):
            item = dict(item)
            label = item.pop("name", None) or Path(str(item.get("path", ""))).name
        else:
            raise ValueError(f"{item!r}: expected PATH[:LAYOUT[:SPLIT]] or a mapping")
        if label in out and item.get("split"):
            label = f"{label}:{item['split']}"
        if label in out:
            raise ValueError(f"two evaluation sets are named {label!r}: name them ({{name: ..., path: ...}})")
        out[label] = {k: v for k, v in item.items() if v}
    return out


def train_seg(data: SegData, s: TaskSettings, opts: RunOptions) -> dict:
    """Train a dense head; returns the metrics written to RUN/metrics.json (mIoU per eval set)."""
    return TASK.train(data, s, opts)


def prepare_seg(data: SegData, s: TaskSettings, opts: RunOptions) -> None:
    """Write what a run adds to the store (training masks, every class list's prompt features),
    so that runs in parallel only read it."""
    store = Store(opts.store)
    train_ds = data.train.load()
    train = open_split(store, train_ds, s, pins=feature_pins(opts))
    ensure_masks(store, train_ds, s.resolution, like=train.features, progress=opts.progress)
    if pyramid_stages(s) is None:
        return  # a closed-set FPN head: no class prompts
    for ds in [train_ds] + [src.load() for src in data.evals]:
        class_text(store, ds.classnames, "segmentation", s, opts)


def train_seg_heads(data: SegData, jobs: list[HeadJob], opts: RunOptions) -> list[dict]:
    """Several dense heads in one pass over the same cached features; one metrics dict per head.
    A `tune_norms` head changes its features while it trains, so it always trains alone."""
    s0 = shared_settings(jobs)
    outs = [prepare_run_dir(j.out, opts.overwrite) for j in jobs]
    store = Store(opts.store)
    device = opts.torch_device
    train_ds = data.train.load()
    pins = feature_pins(opts)
    per_job = [open_split(store, train_ds, j.settings, pins=pins) for j in jobs]
    train = union_split(per_job)
    eval_sets = [src.load(s0.resolution if data.slide else None) for src in data.evals]
    evals = [union_split([open_split(store, ds, j.settings, pins=pins) for j in jobs]) for ds in eval_sets]
    masks = ensure_masks(store, train_ds, s0.resolution, like=train.features, progress=opts.progress)
    name = train_ds.name.split("/")[0]
    table = None
    if s0.freeze_prompt_after:  # the adapter learns the prompt online, then the head trains from a new cache
        def tune(settings, online):
            member, _ = _fpn_member(settings, train, train_ds, online, device)
            fields = {**online.bind(store, train), "mask": LoaderField(masks, "mask")}
            fit_many([member], loader_for(train, settings, opts, shuffle=True, desc=f"tune prompt {name}",
                                          fields=fields), settings)

        _same_classes(train_ds, eval_sets)
        table = freeze_prompt(s0, train, [train.features] + [e.features for e in evals], opts, outs[0], tune)
        pins = table_pins(pins, table)
        per_job = [open_split(store, train_ds, j.settings, pins=pins) for j in jobs]
        train = union_split(per_job)
        evals = [union_split([open_split(store, ds, j.settings, pins=pins) for j in jobs]) for ds in eval_sets]
        masks = ensure_masks(store, train_ds, s0.resolution, like=train.features, progress=opts.progress)

    online = None
    fields = dict(train.fields)
    members, classifiers, templates_of = [], [], []
    for j, sp in zip(jobs, per_job):
        if pyramid_stages(j.settings) is None:  # VPD's features: Semantic FPN over the training classes
            _same_classes(train_ds, eval_sets)
            online = online_taps(j.settings, train, opts)  # VPD-online: the adapter (and U-net) train too
            if online is not None:
                fields = {**{k: v for k, v in fields.items() if k.startswith("expert.")}, **online.bind(store, train)}
            member, classifier = _fpn_member(j.settings, sp, train_ds, online, device)
            members.append(member)
            classifiers.append(classifier)
            templates_of.append([])
            continue
        text, templates = class_text(store, train_ds.classnames, "segmentation", j.settings, opts)
        classifier = TextClassifier(text, j.settings.temperature)
        model = build_head(sp, j.settings, "dense", text.shape[1], device)
        params = list(model.parameters())
        if j.settings.tune_norms:
            if opts.sd_model is None:
                raise VermouthError("--tune-norms recomputes U-net features: give --sd-model")
            online = OnlineTaps(opts.sd_model, train, device)
            params += online.norm_parameters()
            fields = {**{k: v for k, v in fields.items() if k.startswith("expert.")}, **online.bind(store, train)}
        members.append(Member(model, params, _seg_loss(model, classifier, online, ignore_value(train_ds)), j.settings))
        classifiers.append(classifier)
        templates_of.append(templates)
    fields["mask"] = LoaderField(masks, "mask")
    results = fit_many(members, loader_for(train, s0, opts, shuffle=True, desc=f"train seg {name}", fields=fields), s0)

    scores_of: list[dict] = [{} for _ in jobs]
    for ds, split in zip(eval_sets, evals):
        ev_fields = dict(split.fields)
        if online is not None:
            ev_fields = {**{k: v for k, v in ev_fields.items() if k.startswith("expert.")}, **online.bind(store, split)}
        predicts = []
        for j, m, own in zip(jobs, members, classifiers):
            if isinstance(own, ClosedSet):
                predicts.append(lambda b, model=m.model: model({**b, **online(b)} if online else b))
                continue
            ev_text, _ = class_text(store, ds.classnames, "segmentation", j.settings, opts)
            c = TextClassifier(ev_text, j.settings.temperature)
            predicts.append(lambda b, c=c, model=m.model: c(model({**b, **online(b)} if online else b)))
        for acc, scores in zip(scores_of, evaluate(predicts, split, loader_for(split, s0, opts, shuffle=False,
                                                                                fields=ev_fields), len(ds.classnames))):
            scores["per_class_IoU"] = dict(zip(ds.classnames, scores["per_class_IoU"]))
            acc[ds.name] = (scores, split.keys())

    out_metrics = []
    for j, sp, m, result, classifier, templates, scores, out in zip(
            jobs, per_job, members, results, classifiers, templates_of, scores_of, outs):
        s = j.settings
        metrics = {"task": "seg", "steps": result.steps, "eval": {k: v[0] for k, v in scores.items()},
                   **({"mode": mode_label(s), "adapted_table": table} if s.method == "vpd" else {}),
                   "n": {"train": len(train.indices)}, "skipped": dict(sp.skipped),
                   "entries": {"train": {**sp.keys(), "masks": masks.key}, **{k: v[1] for k, v in scores.items()}}}
        config = {**base_config("seg", s, opts, classifier, templates), "slide": data.slide,
                  "data": {"train": data.train.__dict__, "evals": [e.__dict__ for e in data.evals]},
                  "classnames": list(train_ds.classnames),
                  "datasets": {"train": {"name": train_ds.name, "identity": train_ds.identity()},
                               **{ds.name: {"name": ds.name, "identity": ds.identity()} for ds in eval_sets}},
                  "head": (head_facts(m.model, s, "dense") if not isinstance(classifier, ClosedSet) else
                           dense_head_facts(m.model)),
                  "heads_in_pass": len(jobs),
                  "title": f"seg {name}, t={s.t}, {s.stages}, {s.head}" + (" +norms" if s.tune_norms else "")}
        out_metrics.append(finish_run(out, config, metrics, m.model, result, select=None,
                                      extra_weights=online.trained_state() if online else None))
    return out_metrics


def _fpn_member(settings: TaskSettings, split: CachedSplit, train_ds, online, device) -> tuple[Member, ClosedSet]:
    """A Semantic FPN head over the training classes (VPD's features), with the online module's
    parameters (adapter, U-net) when there is one; and its (closed-set) classifier."""
    torch.manual_seed(settings.seed)
    model = SemanticFPN(level_channels(split.shapes()[0]), len(train_ds.classnames),
                        width=settings.head_width).to(device)
    params = [{"params": list(model.parameters()), "lr_scale": 1.0}]
    params += online.parameter_groups(TASK.unet_lr_scale) if online is not None else []
    classifier = ClosedSet(len(train_ds.classnames))
    return Member(model, params, _seg_loss(model, classifier, online, ignore_value(train_ds)), settings), classifier


def _same_classes(train_ds, eval_sets) -> None:
    """A closed-set head scores only datasets of its training classes."""
    for ds in eval_sets:
        if tuple(ds.classnames) != tuple(train_ds.classnames):
            raise VermouthError(f"a Semantic FPN head (vpd features) predicts the {len(train_ds.classnames)} classes of "
                                f"{train_ds.name}; {ds.name} has other classes: evaluate it on datasets of those")


def _seg_loss(model, classifier, online, ignore: int):
    def loss_fn(batch):
        if online is not None:
            batch = {**batch, **online(batch)}
        logits = classifier(model(batch))  # (B, C, h, w)
        target = batch["mask"].long()
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, target, ignore_index=ignore)
    return loss_fn


@torch.no_grad()
def evaluate(predicts: list, split: CachedSplit, loader, n_classes: int) -> list[dict]:
    """mIoU of each `predict` (batch -> (B, C, h, w) logits) against each label map at its
    resolution, over one pass of `loader` (every label map is read once for all of them)."""
    rule = label_rule(split.dataset)
    confs = [np.zeros((n_classes, n_classes), dtype=np.int64) for _ in predicts]
    resolution = int(split.features.manifest["about"]["resolution"])
    if split.dataset.source.get("slide"):
        return _evaluate_slide(predicts, split, loader, n_classes, rule, confs, resolution)
    for batch in loader:
        logits = [p(batch).float() for p in predicts]
        for k, row in enumerate(batch["index"].tolist()):
            mask = read_mask(split.dataset.samples[row].mask, rule, n_classes=n_classes)
            h, w = mask.shape
            left, top, right, bottom = crop_box(w, h, resolution)
            region = mask[top:bottom, left:right]
            ignore = int(np.iinfo(region.dtype).max)
            target = region.astype(np.int64)
            for conf, lg in zip(confs, logits):
                pred = F.interpolate(lg[k][None], size=region.shape, mode="bilinear", align_corners=False)[0].argmax(0)
                conf += confusion_matrix(pred.cpu().numpy(), target, n_classes, ignore_index=ignore)
    return [miou(conf) for conf in confs]


def _evaluate_slide(predicts: list, split: CachedSplit, loader, n_classes: int, rule: str, confs,
                    resolution: int) -> list[dict]:
    """mmseg's slide inference over cached windows: each window's logits upsampled to its crop,
    summed into the resized image, divided by the windows covering each pixel, resized to the label
    map's native size (bilinear) and scored on the whole map. Windows of an image come together
    (ids sort by image), so one image's canvases are held at a time."""
    current, sums, counts, native = None, None, None, None

    def finish():
        mask = read_mask(current.mask, rule, n_classes=n_classes)
        if mask.shape != native:
            raise VermouthError(f"label map {current.mask} is {mask.shape[1]}x{mask.shape[0]}; its image {current.path} "
                                f"is {native[1]}x{native[0]}")
        ignore = int(np.iinfo(mask.dtype).max)
        for conf, acc in zip(confs, sums):
            avg = (acc / counts.clamp(min=1))[None]
            pred = F.interpolate(avg, size=mask.shape, mode="bilinear", align_corners=False)[0].argmax(0)
            conf += confusion_matrix(pred.cpu().numpy(), mask.astype(np.int64), n_classes, ignore_index=ignore)

    for batch in loader:
        logits = [p(batch).float() for p in predicts]
        for k, row in enumerate(batch["index"].tolist()):
            sample = split.dataset.samples[row]
            if current is None or sample.path != current.path:
                if current is not None:
                    finish()
                current = sample
                with Image.open(sample.path) as im:
                    native = (im.height, im.width)
                    w, h = scaled_size(*im.size, sample.view.short)
                sums = [torch.zeros(n_classes, h, w) for _ in predicts]
                counts = torch.zeros(h, w)
            x1, y1, x2, y2 = sample.view.box
            for acc, lg in zip(sums, logits):  # the window's logits at its padded input size, the padding cut
                up = F.interpolate(lg[k][None], size=(resolution, resolution), mode="bilinear", align_corners=False)
                acc[:, y1:y2, x1:x2] += up[0, :, : y2 - y1, : x2 - x1].cpu()
            counts[y1:y2, x1:x2] += 1
    if current is not None:
        finish()
    return [miou(conf) for conf in confs]


TASK = Task(
    name="seg",
    description="Open-vocabulary segmentation: train on one dataset, mIoU on others with their own class names.",
    options=SegOptions,
    # temperature: the paper gives none for segmentation; 0.07 is CLIP's initial value
    table7=TaskSettings(resolution=512, t=10, stages="mid,up", noise="ddpm", attn_maps="up", text_proj=False,
                        temperature=0.07, lr=5e-4, lr_schedule="polynomial", batch_size=16, epochs=None,
                        iters=120_000, eval_every=10_000),
    fast={"iters": 8_000, "eval_every": 2_000},
    prepare=prepare_seg,
    train_heads=train_seg_heads,
    main_metric="mIoU",
    summary=lambda m: {k: {"mIoU": v["mIoU"], "pixel_acc": v["pixel_acc"]} for k, v in m["eval"].items()},
    per_eval_set=True,
    own_settings=("tune_norms", "head_width", "adapter", "tune_unet", "freeze_prompt_after"),
    # VPD seg: the U-net at x0.1, but mmcv's custom key `norm` gives its transformer norms x1.0
    unet_lr_scale={"default": 0.1, "norm": 1.0},
)
