"""Referring segmentation from the cache: VPD's SimpleDecoding on VPD's taps (VPD.md section 2.3).

    vermouth-cache extract REFCOCO --split train --method vpd --prompt sentence --text-tokens 40 --store STORE
    vermouth-cache extract REFCOCO --split val   (the same options)
    vermouth-cache train refer --store STORE --dataset REFCOCO --out RUN

Every (image, sentence) pair is a cached sample: the sentence's 40 CLIP token states condition the
U-net, and its attention maps (A32: 40 channels at 1/16 and 1/32) join the features. The head's 2
logits at 1/8 are upsampled (bilinear, align_corners=True) to the squashed 512x512 mask and trained
with cross-entropy weighted [0.9, 1.1]; evaluation scores every pair of the evaluation split at
that size: mIoU, oIoU and P@0.5-0.9 (train/dense_metrics.py).

Differences from VPD, on purpose: every sentence of a training ref is a sample each epoch (VPD
draws one sentence per ref per epoch); the last weights are scored (VPD keeps its best val oIoU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.extract.targets import REFER_MASK, ensure_targets
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import (HeadJob, RunOptions, dataset_facts, dense_head_facts, feature_pins,
                                         loader_for, prepare_targets, run_config, shared_settings)
from vermouth_cache.train.dense_metrics import PRECISION_AT, referring_scores
from vermouth_cache.train.inputs import open_split
from vermouth_cache.train.loader import Field as LoaderField
from vermouth_cache.train.loop import Member, fit_many
from vermouth_cache.train.runs import finish_run, prepare_run_dir
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks.base import DataOptions, Task, metric_keys
from vermouth_cache.train.vpd_heads import SimpleDecoding, level_channels, pyramid_stages
from vermouth_cache.train.vpd_online import mode_label, online_taps

CLASS_WEIGHTS = (0.9, 1.1)  # background, object (VPD refer/train.py)


@dataclass(frozen=True)
class ReferData:
    path: str  # a REFER root (data/refer.py)
    split: str = "train"
    eval_split: str = "val"
    image_root: str | None = None


class ReferOptions(DataOptions):
    path: str = Field(description="REFER root (instances.json, refs(unc).p) of RefCOCO, RefCOCO+ or G-Ref.")
    split: str = Field("train", description="Its training split.")
    eval_split: str = Field("val", description="The split scored (val, testA, testB, test).")
    image_root: str | None = Field(None, description="The COCO train2014 images (default: beside the root).")

    def data(self) -> ReferData:
        return ReferData(self.path, self.split, self.eval_split, self.image_root)

    def extract_parts(self) -> list[dict]:
        return [{"dataset": self.path, "split": sp, "image_root": self.image_root}
                for sp in (self.split, self.eval_split)]


def _datasets(data: ReferData):
    return tuple(load_dataset(data.path, split=sp, image_root=data.image_root) for sp in (data.split, data.eval_split))


def prepare_refer(data: ReferData, s: TaskSettings, opts: RunOptions) -> None:
    prepare_targets(_datasets(data), REFER_MASK, s, opts)


def train_refer(data: ReferData, s: TaskSettings, opts: RunOptions) -> dict:
    return TASK.train(data, s, opts)


def train_refer_heads(data: ReferData, jobs: list[HeadJob], opts: RunOptions) -> list[dict]:
    s0 = shared_settings(jobs)
    outs = [prepare_run_dir(j.out, opts.overwrite) for j in jobs]
    store, device, pins = Store(opts.store), opts.torch_device, feature_pins(opts)
    train_ds, eval_ds = _datasets(data)
    train, ev = open_split(store, train_ds, s0, pins=pins), open_split(store, eval_ds, s0, pins=pins)
    masks = ensure_targets(store, train_ds, REFER_MASK, s0.resolution, like=train.features, progress=opts.progress)
    ev_masks = ensure_targets(store, eval_ds, REFER_MASK, s0.resolution, like=ev.features, progress=opts.progress)
    weights = torch.tensor(CLASS_WEIGHTS, device=device)
    online = online_taps(s0, train, opts)  # VPD-online: the adapter applied to every token of each sentence
    members = []
    for j in jobs:
        torch.manual_seed(j.settings.seed)
        stages = pyramid_stages(j.settings)  # Vermouth's features: its stage pyramid
        model = SimpleDecoding(level_channels(train.shapes()[0], stages=stages), width=j.settings.head_width,
                               stages=stages).to(device)
        params = [{"params": list(model.parameters()), "lr_scale": 1.0}]
        params += online.parameter_groups(TASK.unet_lr_scale) if online else []
        members.append(Member(model, params, _loss(model, weights, online), j.settings))
    name = train_ds.name.split("/")[0]
    fields = online.bind(store, train) if online else train.fields
    results = fit_many(members, loader_for(train, s0, opts, shuffle=True, desc=f"train refer {name}",
                                           fields={**fields, "mask": LoaderField(masks, "mask")}), s0)
    ev_fields = online.bind(store, ev) if online else ev.fields
    scores = evaluate([m.model for m in members], loader_for(ev, s0, opts, shuffle=False,
                                                             fields={**ev_fields, "mask": LoaderField(ev_masks, "mask")}),
                      features=(lambda b: {**b, **online(b)}) if online else (lambda b: b))
    out_metrics = []
    for j, m, result, score, out in zip(jobs, members, results, scores, outs):
        s = j.settings
        metrics = {"task": "refer", "steps": result.steps, **score, "eval_split": data.eval_split,
                   "mode": mode_label(s),
                   "n": {"train": len(train.indices), "eval": score["pairs"]},
                   "entries": {"train": {**train.keys(), "masks": masks.key}, "eval": {**ev.keys(), "masks": ev_masks.key}}}
        config = {**run_config("refer", s, opts, out_dim=2), "data": data.__dict__, "head": dense_head_facts(m.model),
                  "datasets": dataset_facts(train_ds, eval_ds), "title": f"refer {name}, {s.method} t={s.t}, "
                                                                           f"attn {s.attn_maps}"}
        extra = online.trained_state() if online else None
        out_metrics.append(finish_run(out, config, metrics, m.model, result, select=None, extra_weights=extra))
    return out_metrics


def logits_at(model: SimpleDecoding, batch: dict, size: int) -> torch.Tensor:
    """(B, 2, size, size): the head's 1/8 logits upsampled as VPD does (bilinear, align_corners=True)."""
    return F.interpolate(model(batch), size=(size, size), mode="bilinear", align_corners=True)


def _loss(model: SimpleDecoding, weights: torch.Tensor, online=None):
    def loss_fn(batch):
        if online is not None:
            batch = {**batch, **online(batch)}
        target = batch["mask"].long()
        return F.cross_entropy(logits_at(model, batch, target.shape[-1]), target, weight=weights)
    return loss_fn


@torch.no_grad()
def evaluate(models: list, loader, features=lambda b: b) -> list[dict]:
    """VPD's referring scores of each model over one pass of `loader` (pairs at the mask's size)."""
    for m in models:
        m.eval()
    preds: list[list[np.ndarray]] = [[] for _ in models]
    gts: list[np.ndarray] = []
    loader.set_epoch(0)
    for batch in loader:
        target = batch["mask"]
        gts += list(target.cpu().numpy() > 0.5)
        fb = features(batch)
        for acc, m in zip(preds, models):
            acc += list(logits_at(m, fb, target.shape[-1]).argmax(1).cpu().numpy() == 1)
    return [referring_scores(p, gts) for p in preds]


TASK = Task(
    name="refer",
    description="Referring segmentation (VPD): SimpleDecoding on VPD taps and sentence attention; mIoU, oIoU, P@X.",
    options=ReferOptions,
    # VPD refer: AdamW 5e-5 wd 1e-2, total batch 32, 40 epochs, (1 - it/total)^0.9, 512x512 squash, L=40 (RefCOCO)
    table7=TaskSettings(method="vpd", resolution=512, t=1, noise="none", prompt="sentence", attn_maps="a32",
                        expert=None, lr=5e-5, lr_schedule="polynomial", power=0.9, weight_decay=1e-2, batch_size=32,
                        epochs=40, eval_every=1),
    fast={"epochs": 10},
    prepare=prepare_refer,
    train_heads=train_refer_heads,
    main_metric="oIoU",
    summary=metric_keys("oIoU", "mIoU", *(f"P@{x}" for x in PRECISION_AT)),
    own_settings=("head_width", "adapter", "tune_unet"),
    defaults_from="VPD",
    # no text classifier (VPD's own heads) and no model selection (the last weights are scored)
    unread=("text_proj", "temperature", "templates", "head", "eval_every"),
    unet_lr_scale={"default": 1.0},  # VPD refer: its 0.01 lr_scale is never read: the U-net trains at the full lr
)
