"""Pieces every task shares: where a run reads from, the head and its text classifier, loaders
over cached splits, and batched inference."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vermouth_cache import __version__
from vermouth_cache.extract.classtext import class_text_features
from vermouth_cache.train.heads import HeadSpec, TextClassifier, VermouthHead, count_parameters, sd15_parameter_count
from vermouth_cache.train.loader import CacheLoader
from vermouth_cache.models.loading import DEFAULT_CLIP_MODEL, Placement, resolve_device
from vermouth_cache.models.pipeline import StableDiffusion
from vermouth_cache.store.entries import Store
from vermouth_cache.data.vocab import templates as template_list
from vermouth_cache.train.inputs import CachedSplit
from vermouth_cache.train.settings import TaskSettings


@dataclass(frozen=True)
class HeadJob:
    """One head of a shared training pass: its settings and its run directory."""
    settings: TaskSettings
    out: str


# settings a head may change while sharing its pass over the features with other heads; every
# other field (which features, batch size, length, seed) must be the same for all of them
HEAD_SIDE = ("head", "text_proj", "temperature", "templates", "lr", "lr_schedule", "gamma", "power", "weight_decay",
             "grad_clip", "stages", "attn_maps", "expert")


def pass_key(s: TaskSettings) -> dict:
    """What heads sharing one pass must agree on."""
    return {k: v for k, v in s.to_json().items() if k not in HEAD_SIDE}


def shared_settings(jobs: list[HeadJob]) -> TaskSettings:
    """The settings of the pass (the first head's); refuses heads that cannot share it."""
    from vermouth_cache.core.errors import VermouthError

    if not jobs:
        raise VermouthError("no head to train")
    first = pass_key(jobs[0].settings)
    for j in jobs[1:]:
        other = pass_key(j.settings)
        diff = sorted(k for k in first if first[k] != other[k])
        if diff:
            raise VermouthError(f"heads {jobs[0].out} and {j.out} cannot share a pass: they differ in {', '.join(diff)}")
    online = ("tune_norms", "adapter", "tune_unet", "freeze_prompt_after")
    if len(jobs) > 1 and any(getattr(jobs[0].settings, k) for k in online):
        raise VermouthError("--tune-norms, --adapter, --tune-unet and --freeze-prompt-after change the features: "
                            "such a head trains alone")
    outs = [str(j.out) for j in jobs]
    if len(set(outs)) != len(outs):
        raise VermouthError("two heads of one pass write the same run directory")
    return jobs[0].settings


@dataclass(frozen=True)
class RunOptions:
    """Where a run reads and writes, and how it runs: the options every `train` command shares."""
    store: str
    out: str | None = None  # the run directory (train_*); a shared pass gives one per HeadJob
    sd_model: str | None = None  # pins the features to this SD model's U-net; None: the one cached
    clip_model: str = DEFAULT_CLIP_MODEL
    device: str | None = None
    memory_gb: float = 8.0  # features up to this size are held in (GPU) memory, else streamed
    progress: bool = True
    overwrite: bool = False
    select: tuple = ()  # ((pin name, value), ...): extraction options the features must have (selection.PINS)

    def __post_init__(self):
        from vermouth_cache.core.errors import VermouthError

        m = self.memory_gb
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise VermouthError(f"--memory-gb must be a finite number of GiB >= 0, got {m!r}")
        if self.out is not None:
            from vermouth_cache.train.runs import check_run_dir

            check_run_dir(self.out)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def unet_identity(opts: RunOptions) -> str | None:
    if opts.sd_model is None:
        return None
    return StableDiffusion(opts.sd_model, Placement(torch.device("cpu"), torch.float32)).identity("unet")


def feature_pins(opts: RunOptions) -> dict:
    """What the run pins its features to besides its settings: the SD model's U-net and the
    extraction options of `selection.PINS` (`opts.select`), as recipe facts."""
    from vermouth_cache.extract.selection import resolve_pins

    return {"unet": unet_identity(opts), **resolve_pins(dict(opts.select))}


def class_text(store: Store, classnames, dataset_name: str, s: TaskSettings, opts: RunOptions) -> tuple[torch.Tensor, list[str]]:
    names = template_list(s.templates or dataset_name)
    feats = class_text_features(store, list(classnames), names, opts.clip_model, proj=s.text_proj)
    return torch.from_numpy(feats).to(opts.torch_device), list(names)


def build_head(split: CachedSplit, s: TaskSettings, flow: str, out_dim: int, device) -> VermouthHead:
    taps, experts = split.shapes()
    torch.manual_seed(s.seed)
    return VermouthHead(HeadSpec(s.head, flow, s.stages, taps, experts), out_dim).to(device)


def ce_loss(model: torch.nn.Module, classifier: TextClassifier):
    """Cross-entropy of the head's cosine logits against the batch's labels."""
    def loss_fn(batch):
        return F.cross_entropy(classifier(model(batch)), batch["label"])
    return loss_fn


def loader_for(split: CachedSplit, s: TaskSettings, opts: RunOptions, *, shuffle: bool, desc: str | None = None,
               extra: dict[str, np.ndarray] | None = None, fields: dict | None = None) -> CacheLoader:
    n = split.features.n_samples
    labels = np.full(n, -1, dtype=np.int64)
    labels[split.indices] = split.labels
    return CacheLoader(fields or split.fields, split.indices, s.batch_size, shuffle=shuffle, seed=s.seed,
                       mode="auto", memory_budget_bytes=int(opts.memory_gb * 2**30), device=opts.torch_device,
                       progress=desc if opts.progress else None, extra={"label": labels, **(extra or {})})


def infer(model: torch.nn.Module, loader: CacheLoader) -> tuple[torch.Tensor, np.ndarray]:
    """Model outputs for every sample of a non-shuffled loader, and their entry rows."""
    outs, rows = infer_many([model], loader)
    return outs[0], rows


@torch.no_grad()
def infer_many(models: list[torch.nn.Module], loader: CacheLoader) -> tuple[list[torch.Tensor], np.ndarray]:
    """Every model's outputs over ONE pass of a non-shuffled loader, and the entry rows."""
    for m in models:
        m.eval()
    outs, rows = [[] for _ in models], []
    loader.set_epoch(0)
    for batch in loader:
        for acc, m in zip(outs, models):
            acc.append(m(batch).float())
        rows.append(batch["index"].cpu().numpy())
    return [torch.cat(o) for o in outs], np.concatenate(rows)


def head_facts(model: VermouthHead, s: TaskSettings, flow: str) -> dict:
    return {
        "spec": model.spec.to_json(),
        "trainable_parameters": count_parameters(model),
        "sd15_scale_parameters": sd15_parameter_count(s.head, flow, s.stages, expert=s.expert is not None),
        "paper_parameters": 8_600_000 if flow == "global" else 5_900_000,
    }


def run_config(task: str, s: TaskSettings, opts: RunOptions, *, out_dim: int) -> dict:
    """What every run's config.json opens with: the task, the settings and where the features came from."""
    return {
        "task": task,
        "vermouth_cache": __version__,
        "settings": s.to_json(),
        "store": os.path.abspath(opts.store),
        "sd_model": opts.sd_model,
        "select": dict(opts.select),  # extraction options the features were pinned to (selection.PINS)
        "device": str(opts.torch_device),
        "out_dim": out_dim,
    }


def base_config(task: str, s: TaskSettings, opts: RunOptions, classifier: TextClassifier, templates: list[str]) -> dict:
    """run_config of a head scored by a text classifier (its CLIP model, templates and temperature)."""
    return {**run_config(task, s, opts, out_dim=classifier.out_dim), "clip_model": opts.clip_model,
            "templates": templates, "temperature": classifier.temperature}


def dense_head_facts(model) -> dict:
    """The head block of a VPD head's config (its spec and size; no paper-scale count to compare)."""
    return {"spec": model.spec.to_json(), "trainable_parameters": count_parameters(model)}


def dataset_facts(*datasets) -> dict:
    return {d.name: {"name": d.name, "identity": d.identity()} for d in datasets}


def prepare_targets(datasets, target, s: TaskSettings, opts: RunOptions) -> None:
    """Write each dataset's per-sample targets (depth maps, referring masks: extract/targets.py)
    beside its features, so that runs in parallel only read them."""
    from vermouth_cache.extract.targets import ensure_targets
    from vermouth_cache.train.inputs import open_split

    store = Store(opts.store)
    for ds in datasets:
        split = open_split(store, ds, s, pins=feature_pins(opts))
        ensure_targets(store, ds, target, s.resolution, like=split.features, progress=opts.progress)
