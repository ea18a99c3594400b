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

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import load_dataset
from ..errors import VermouthError
from ..heads import TextClassifier
from ..mask_cache import ensure_masks, ignore_value, label_rule
from ..metrics import confusion_matrix, miou
from ..seg_data import crop_box, read_mask
from ..store import Store
from .common import RunOptions, base_config, build_head, class_text, head_facts, loader_for, unet_identity
from .inputs import CachedSplit, open_split
from .loop import fit
from .online import OnlineTaps
from .runs import prepare_run_dir, write_run
from .settings import TaskSettings


@dataclass(frozen=True)
class SegSource:
    path: str
    layout: str | None = None
    split: str | None = None
    classnames: str | None = None  # a file of class names replacing the layout's list

    @classmethod
    def parse(cls, text: str) -> "SegSource":
        """PATH[:LAYOUT[:SPLIT]] as the command line gives it."""
        parts = text.split(":")
        if len(parts) > 3:
            raise VermouthError(f"--eval {text!r}: expected PATH[:LAYOUT[:SPLIT]]")
        return cls(*(p or None for p in parts + [""] * (3 - len(parts))))

    def load(self):
        if self.classnames:
            from ..seg_data import load_seg_dataset

            return load_seg_dataset(self.path, self.layout, self.split, classnames_file=self.classnames)
        return load_dataset(self.path, layout=self.layout, split=self.split)


@dataclass(frozen=True)
class SegData:
    train: SegSource
    evals: tuple[SegSource, ...] = ()


def train_seg(data: SegData, s: TaskSettings, opts: RunOptions) -> dict:
    out = prepare_run_dir(opts.out, opts.overwrite)
    store = Store(opts.store)
    device = opts.torch_device
    train_ds = data.train.load()
    uid = unet_identity(opts)
    train = open_split(store, train_ds, s, unet_identity=uid)
    eval_sets = [(src, src.load()) for src in data.evals]
    evals = [(ds, open_split(store, ds, s, unet_identity=uid)) for _, ds in eval_sets]
    masks = ensure_masks(store, train_ds, s.resolution, like=train.features, progress=opts.progress)

    name = train_ds.name.split("/")[0]
    text, templates = class_text(store, train_ds.classnames, "segmentation", s, opts)
    classifier = TextClassifier(text, s.temperature)
    model = build_head(train, s, "dense", text.shape[1], device)
    online = None
    params = list(model.parameters())
    fields = dict(train.fields)
    if s.tune_norms:
        if opts.sd_model is None:
            raise VermouthError("--tune-norms recomputes U-net features: give --sd-model")
        online = OnlineTaps(opts.sd_model, train, device)
        params += online.norm_parameters()
        fields = {**{k: v for k, v in fields.items() if k.startswith("expert.")}, **online.bind(store, train)}
    from ..loader import Field

    fields["mask"] = Field(masks, "mask")
    ignore = ignore_value(train_ds)

    def forward(batch):
        if online is not None:
            batch = {**batch, **online(batch)}
        return classifier(model(batch))  # (B, C, h, w)

    def loss_fn(batch):
        logits = forward(batch)
        target = batch["mask"].long()
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, target, ignore_index=ignore)

    result = fit(model, params, loss_fn, loader_for(train, s, opts, shuffle=True, desc=f"train seg {name}",
                                                     fields=fields), s)
    metrics = {"task": "seg", "steps": result.steps, "eval": {}, "n": {"train": len(train.indices)},
               "skipped": dict(train.skipped), "entries": {"train": {**train.keys(), "masks": masks.key}}}
    for (src, ds), (_, split) in zip(eval_sets, evals):
        ev_text, _ = class_text(store, ds.classnames, "segmentation", s, opts)
        ev_fields = dict(split.fields)
        if online is not None:
            ev_fields = {**{k: v for k, v in ev_fields.items() if k.startswith("expert.")}, **online.bind(store, split)}
        ev_classifier = TextClassifier(ev_text, s.temperature)
        scores = evaluate(lambda b, c=ev_classifier: c(model({**b, **online(b)} if online else b)),
                          split, loader_for(split, s, opts, shuffle=False, fields=ev_fields), len(ds.classnames))
        scores["per_class_IoU"] = dict(zip(ds.classnames, scores["per_class_IoU"]))
        metrics["eval"][ds.name] = scores
        metrics["entries"][ds.name] = split.keys()
    config = {**base_config("seg", s, opts, classifier, templates),
              "data": {"train": data.train.__dict__, "evals": [e.__dict__ for e in data.evals]},
              "classnames": list(train_ds.classnames),
              "datasets": {"train": {"name": train_ds.name, "identity": train_ds.identity()},
                           **{ds.name: {"name": ds.name, "identity": ds.identity()} for _, ds in eval_sets}},
              "head": head_facts(model, s, "dense"),
              "title": f"seg {name}, t={s.t}, {s.stages}, {s.head}" + (" +norms" if s.tune_norms else "")}
    write_run(out, config=config, metrics=metrics, model=model, history=result.history, select=None,
              extra_weights=online.norm_state() if online else None)
    return metrics


@torch.no_grad()
def evaluate(predict, split: CachedSplit, loader, n_classes: int) -> dict:
    """mIoU of `predict` (batch -> (B, C, h, w) logits) against each label map at its resolution."""
    rule = label_rule(split.dataset)
    conf = np.zeros((n_classes, n_classes), dtype=np.int64)
    resolution = int(split.features.manifest["about"]["resolution"])
    for batch in loader:
        logits = predict(batch).float()
        for row, lg in zip(batch["index"].tolist(), logits):
            mask = read_mask(split.dataset.samples[row].mask, rule, n_classes=n_classes)
            h, w = mask.shape
            left, top, right, bottom = crop_box(w, h, resolution)
            region = mask[top:bottom, left:right]
            pred = F.interpolate(lg[None], size=region.shape, mode="bilinear", align_corners=False)[0].argmax(0)
            ignore = int(np.iinfo(region.dtype).max)
            conf += confusion_matrix(pred.cpu().numpy(), region.astype(np.int64), n_classes, ignore_index=ignore)
    return miou(conf)

