"""Monocular depth from the cache: VPD's depth head on VPD's taps (VPD.md section 2.2).

    vermouth-cache tables make nyu.safetensors --classes NYU/classes.txt --templates imagenet_ensemble
    vermouth-cache extract NYU --split train --method vpd --prompt table-class --context-table nyu.safetensors \\
        --attn-maps none --store STORE
    vermouth-cache extract NYU --split test  (the same options)
    vermouth-cache train depth --store STORE --dataset NYU --out RUN

Training views are the cached crops (K per image, `extract --views K`), each with its depth map cut
the same way (extract/targets.py); the loss is VPD's SiLog (lambda 0.5) on the pixels with ground
truth inside the view. Testing predicts each of an image's 4 cached views (two shift windows,
each mirrored), mirrors back, averages the overlaps at the image's native size and scores the
raw depth map with VPD's nine metrics per image, averaged (train/dense_metrics.py). The scene
class conditions every image, also at test time: VPD uses the label (flagged in the config).

Differences from VPD, on purpose: crops and flips are drawn once per view and cached rather than
every step; no photometric augmentation or CutDepth (latents cannot be augmented); the lr follows
the shared polynomial schedule rather than VPD's warm-up-then-decay; no model selection on the
test set (VPD keeps the best test RMSE epoch): the last weights are scored. A run also draws
`depth_examples.png` (image, ground truth, prediction, error) of a few test images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from vermouth_cache.core.errors import VermouthError, available
from vermouth_cache.core.progress import get_logger
from vermouth_cache.data.datasets import load_dataset
from vermouth_cache.data.depth import read_depth
from vermouth_cache.data.images import decode_image
from vermouth_cache.extract.targets import DEPTH, ensure_targets
from vermouth_cache.store.entries import Store
from vermouth_cache.train.common import (HeadJob, RunOptions, dataset_facts, dense_head_facts, feature_pins,
                                         loader_for, prepare_targets, run_config, shared_settings)
from vermouth_cache.train.dense_metrics import DEPTH_KEYS, depth_errors, mean_depth_metrics
from vermouth_cache.train.inputs import CachedSplit, open_split
from vermouth_cache.train.loader import Field as LoaderField
from vermouth_cache.train.loop import Member, fit_many
from vermouth_cache.train.runs import finish_run, prepare_run_dir
from vermouth_cache.train.settings import TaskSettings
from vermouth_cache.train.tasks.base import DataOptions, Task, metric_keys
from vermouth_cache.train.vpd_heads import DepthHead, level_channels, pyramid_stages, silog_loss
from vermouth_cache.train.vpd_online import freeze_prompt, mode_label, online_taps, table_pins

log = get_logger(__name__)
MAX_DEPTH = 10.0
EXAMPLES = 4  # test images drawn in depth_examples.png


@dataclass(frozen=True)
class DepthData:
    path: str  # a depth root (data/depth.py)
    views: int = 1  # cached training views per image
    view_seed: int = 0


class DepthOptions(DataOptions):
    path: str = Field(description="Depth dataset root in the BTS/VPD NYU-v2 layout (sync/, official_splits/).")
    views: int = Field(1, description="Cached training views per image (`extract --views`).")
    view_seed: int = Field(0, description="Seed of the training views (`extract --shot-seed`).")

    def data(self) -> DepthData:
        return DepthData(self.path, self.views, self.view_seed)

    def extract_parts(self) -> list[dict]:
        return [{"dataset": self.path, "split": "train", "views": self.views, "shot_seed": self.view_seed},
                {"dataset": self.path, "split": "test"}]


def _datasets(data: DepthData):
    return (load_dataset(data.path, split="train", views=data.views, shot_seed=data.view_seed),
            load_dataset(data.path, split="test"))


def _crop(split: CachedSplit) -> int:
    sizes = {s.view.size for s in split.dataset.samples}
    if len(sizes) != 1 or len({*next(iter(sizes))}) != 1:
        raise VermouthError(f"{split.dataset.name}: depth views must be squares of one size, found {sorted(sizes)}")
    return next(iter(sizes))[0]


def prepare_depth(data: DepthData, s: TaskSettings, opts: RunOptions) -> None:
    prepare_targets(_datasets(data), DEPTH, s, opts)


def train_depth(data: DepthData, s: TaskSettings, opts: RunOptions) -> dict:
    return TASK.train(data, s, opts)


def train_depth_heads(data: DepthData, jobs: list[HeadJob], opts: RunOptions) -> list[dict]:
    s0 = shared_settings(jobs)
    outs = [prepare_run_dir(j.out, opts.overwrite) for j in jobs]
    store, pins = Store(opts.store), feature_pins(opts)
    train_ds, test_ds = _datasets(data)
    train = open_split(store, train_ds, s0, pins=pins)
    test = open_split(store, test_ds, s0, pins=pins)
    crop = _crop(train)
    depths = ensure_targets(store, train_ds, DEPTH, s0.resolution, like=train.features, progress=opts.progress)
    name = train_ds.name.split("/")[0]
    table = None
    if s0.freeze_prompt_after:  # the adapter learns the prompt online, then the head trains from a new cache
        table = freeze_prompt(s0, train, [train.features, test.features], opts, outs[0], lambda st, on: _fit(
            train, store, depths, crop, st, opts, on, f"tune prompt {name}"))
        pins = table_pins(pins, table)
        train, test = open_split(store, train_ds, s0, pins=pins), open_split(store, test_ds, s0, pins=pins)
        depths = ensure_targets(store, train_ds, DEPTH, s0.resolution, like=train.features, progress=opts.progress)
    online = online_taps(s0, train, opts)  # VPD-online: features recomputed through the adapter (and U-net)
    members, results = _fit(train, store, depths, crop, s0, opts, online, f"train depth {name}", jobs)
    features = (lambda b: {**b, **online(b)}) if online else (lambda b: b)
    test_fields = {**test.fields, **online.bind(store, test)} if online else None
    per_member = evaluate([m.model for m in members], test, loader_for(test, s0, opts, shuffle=False,
                                                                       fields=test_fields),
                          crop=_crop(test), max_depth=MAX_DEPTH, features=features)
    out_metrics = []
    for j, m, result, (metrics, predictions), out in zip(jobs, members, results, per_member, outs):
        s = j.settings
        metrics = {"task": "depth", "steps": result.steps, **metrics, "mode": mode_label(s),
                   "adapted_table": table, "n": {"train": len(train.indices),
                   "test_images": metrics["images"]}, "entries": {"train": {**train.keys(), "depths": depths.key},
                                                                   "test": test.keys()}}
        config = {**run_config("depth", s, opts, out_dim=1), "uses_label_at_test": s.prompt == "table-class",
                  "data": data.__dict__, "head": dense_head_facts(m.model), "datasets": dataset_facts(train_ds, test_ds),
                  "title": f"depth {name}, {s.method} t={s.t}, views {data.views}"}
        extra = online.trained_state() if online else None
        finished = finish_run(out, config, metrics, m.model, result, select=None, extra_weights=extra)
        if "error" not in finished and available("matplotlib"):
            plot_examples(out / "depth_examples.png", predictions[:EXAMPLES])
        out_metrics.append(finished)
    return out_metrics


def _fit(train: CachedSplit, store, depths, crop: int, s: TaskSettings, opts: RunOptions, online, desc: str,
         jobs: list[HeadJob] | None = None):
    """Heads (one per job, or one of settings `s`) trained on the cached views; with `online`, the
    features come through it and its parameters train too."""
    members = []
    for settings in [j.settings for j in jobs] if jobs else [s]:
        torch.manual_seed(settings.seed)
        stages = pyramid_stages(settings)  # Vermouth's features: its stage pyramid
        model = DepthHead(level_channels(train.shapes()[0], with_attention=False, stages=stages), max_depth=MAX_DEPTH,
                          width=settings.head_width, stages=stages).to(opts.torch_device)
        params = [{"params": list(model.parameters()), "lr_scale": 1.0}]
        if online is not None:
            params += online.parameter_groups(TASK.unet_lr_scale)
        members.append(Member(model, params, _loss(model, crop, online), settings))
    fields = {**(online.bind(store, train) if online else train.fields), "depth": LoaderField(depths, "depth")}
    results = fit_many(members, loader_for(train, s, opts, shuffle=True, desc=desc, fields=fields), s)
    return members, results


def _loss(model: DepthHead, crop: int, online=None):
    def loss_fn(batch):
        if online is not None:
            batch = {**batch, **online(batch)}
        pred = model(batch, crop)[:, 0, :crop, :crop]
        return silog_loss(pred, batch["depth"][:, :crop, :crop])
    return loss_fn


@torch.no_grad()
def predict_images(model: DepthHead, split: CachedSplit, loader, crop: int, features=lambda b: b) -> dict[Path, np.ndarray]:
    """Each test image's depth at its native size: its views predicted, mirrored back and averaged."""
    model.eval()
    loader.set_epoch(0)
    sums: dict[Path, np.ndarray] = {}
    counts: dict[Path, np.ndarray] = {}
    batches = ((model(features(b), crop)[:, 0, :crop, :crop].float().cpu().numpy(), b["index"].tolist())
               for b in loader)
    for pred, row in ((p, r) for preds, rows in batches for p, r in zip(preds, rows)):
        sample = split.dataset.samples[int(row)]  # rows are dataset indices (no superset here)
        if sample.path not in sums:
            with decode_image(sample.path, sample.id) as img:
                sums[sample.path] = np.zeros((img.height, img.width))
                counts[sample.path] = np.zeros((img.height, img.width))
        left, top, right, bottom = sample.view.box
        p = pred[:, ::-1] if sample.view.flip else pred
        sums[sample.path][top:bottom, left:right] += p[: bottom - top, : right - left]
        counts[sample.path][top:bottom, left:right] += 1
    return {path: sums[path] / np.maximum(counts[path], 1) for path in sums}


def evaluate(models: list, split: CachedSplit, loader, *, crop: int, max_depth: float,
             features=lambda b: b) -> list[tuple[dict, list]]:
    """Per model: (VPD's nine metrics averaged over images, [(image, gt, prediction)] in image order)."""
    depth_of = {s.path: s.depth for s in split.dataset.samples}
    out = []
    for model in models:
        model.eval()
        preds = predict_images(model, split, loader, crop, features)
        per_image, shown, unscored = [], [], []
        for path in sorted(preds, key=str):
            gt = read_depth(depth_of[path])
            if gt.shape != preds[path].shape:
                raise VermouthError(f"depth map {depth_of[path]} is {gt.shape[1]}x{gt.shape[0]}; its image {path} is "
                                    f"{preds[path].shape[1]}x{preds[path].shape[0]}")
            errors = depth_errors(preds[path], gt, max_depth=max_depth)
            if errors is None:  # no pixel within (1e-3, max_depth): nothing to score
                unscored.append(depth_of[path])
                continue
            per_image.append(errors)
            shown.append((path, gt, preds[path]))
        if not per_image:
            raise VermouthError(f"no test depth map of {split.dataset.name} has a valid pixel (depth within 0.001-"
                                f"{max_depth:g} m), e.g. {unscored[0]}")
        if unscored and model is models[0]:
            log.warning(f"{len(unscored)} test depth map(s) have no valid pixel and are not scored: "
                        + ", ".join(map(str, unscored[:5])) + (" ..." if len(unscored) > 5 else ""))
        out.append((mean_depth_metrics(per_image), shown))
    return out


def plot_examples(path: Path, shown: list) -> None:
    """Image, ground truth, prediction and absolute error of a few test images, one row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shown), 4, figsize=(10, 2.2 * len(shown)), squeeze=False, dpi=100)
    for row, (img_path, gt, pred) in zip(axes, shown):
        valid = gt > 0
        err = np.where(valid, np.abs(pred - gt), np.nan)
        with decode_image(img_path, str(img_path)) as img:
            row[0].imshow(img)
        vmax = float(gt[valid].max()) if valid.any() else MAX_DEPTH
        row[1].imshow(np.where(valid, gt, np.nan), vmin=0, vmax=vmax, cmap="viridis")
        row[2].imshow(pred, vmin=0, vmax=vmax, cmap="viridis")
        im = row[3].imshow(err, cmap="magma")
        fig.colorbar(im, ax=row[3], fraction=0.046, label="m")
        for ax, title in zip(row, ("image", "ground truth", "prediction", "|error|")):
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


TASK = Task(
    name="depth",
    description="Monocular depth (VPD): its depth head on VPD taps, SiLog loss, VPD's nine metrics on test views.",
    options=DepthOptions,
    # VPD depth: AdamW lr 5e-4 wd 0.1, batch 24, 25 epochs at 480x480 crops padded to 512; no attention maps
    table7=TaskSettings(method="vpd", resolution=512, t=1, noise="none", prompt="table-class", attn_maps=None,
                        expert=None, lr=5e-4, lr_schedule="polynomial", weight_decay=0.1, batch_size=24, epochs=25,
                        eval_every=1),
    fast={"epochs": 5},
    prepare=prepare_depth,
    train_heads=train_depth_heads,
    main_metric="rmse",
    summary=metric_keys(*DEPTH_KEYS),
    own_settings=("head_width", "adapter", "tune_unet", "freeze_prompt_after"),
    defaults_from="VPD",
    # no text classifier (VPD's own heads) and no model selection (the last weights are scored)
    unread=("text_proj", "temperature", "templates", "head", "eval_every"),
    unet_lr_scale={"default": 0.01},  # VPD depth: lr_scale 0.01 for names containing "unet"
    percent=False,
)
