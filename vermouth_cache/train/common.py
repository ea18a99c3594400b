"""Pieces every task shares: where a run reads from, the head and its text classifier, loaders
over cached splits, and batched inference."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .. import __version__
from ..classtext import class_text_features
from ..heads import HeadSpec, TextClassifier, VermouthHead, count_parameters, sd15_parameter_count
from ..loader import CacheLoader
from ..models import DEFAULT_CLIP_MODEL, Placement, StableDiffusion, resolve_device
from ..store import Store
from ..vocab import templates as template_list
from .inputs import CachedSplit
from .settings import TaskSettings


@dataclass(frozen=True)
class RunOptions:
    """Where a run reads and writes, and how it runs: the options every `train` command shares."""
    store: str
    out: str
    sd_model: str | None = None  # pins the features to this SD model's U-net; None: the one cached
    clip_model: str = DEFAULT_CLIP_MODEL
    device: str | None = None
    memory_gb: float = 8.0  # features up to this size are held in (GPU) memory, else streamed
    progress: bool = True
    overwrite: bool = False

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def unet_identity(opts: RunOptions) -> str | None:
    if opts.sd_model is None:
        return None
    return StableDiffusion(opts.sd_model, Placement(torch.device("cpu"), torch.float32)).identity("unet")


def class_text(store: Store, classnames, dataset_name: str, s: TaskSettings, opts: RunOptions) -> tuple[torch.Tensor, list[str]]:
    names = template_list(s.templates or dataset_name)
    feats = class_text_features(store, list(classnames), names, opts.clip_model, proj=s.text_proj)
    return torch.from_numpy(feats).to(opts.torch_device), list(names)


def build_head(split: CachedSplit, s: TaskSettings, flow: str, out_dim: int, device) -> VermouthHead:
    taps, experts = split.shapes()
    torch.manual_seed(s.seed)
    return VermouthHead(HeadSpec(s.head, flow, s.stages, taps, experts), out_dim).to(device)


def loader_for(split: CachedSplit, s: TaskSettings, opts: RunOptions, *, shuffle: bool, desc: str | None = None,
               extra: dict[str, np.ndarray] | None = None, fields: dict | None = None) -> CacheLoader:
    n = split.features.n_samples
    labels = np.full(n, -1, dtype=np.int64)
    labels[split.indices] = split.labels
    return CacheLoader(fields or split.fields, split.indices, s.batch_size, shuffle=shuffle, seed=s.seed,
                       mode="auto", memory_budget_bytes=int(opts.memory_gb * 2**30), device=opts.torch_device,
                       progress=desc if opts.progress else None, extra={"label": labels, **(extra or {})})


@torch.no_grad()
def infer(model: torch.nn.Module, loader: CacheLoader) -> tuple[torch.Tensor, np.ndarray]:
    """Model outputs for every sample of a non-shuffled loader, and their entry rows."""
    model.eval()
    outs, rows = [], []
    loader.set_epoch(0)
    for batch in loader:
        outs.append(model(batch).float())
        rows.append(batch["index"].cpu().numpy())
    return torch.cat(outs), np.concatenate(rows)


def head_facts(model: VermouthHead, s: TaskSettings, flow: str) -> dict:
    return {
        "spec": model.spec.to_json(),
        "trainable_parameters": count_parameters(model),
        "sd15_scale_parameters": sd15_parameter_count(s.head, flow, s.stages, expert=s.expert is not None),
        "paper_parameters": 8_600_000 if flow == "global" else 5_900_000,
    }


def base_config(task: str, s: TaskSettings, opts: RunOptions, classifier: TextClassifier, templates: list[str]) -> dict:
    return {
        "task": task,
        "vermouth_cache": __version__,
        "settings": s.to_json(),
        "store": os.path.abspath(opts.store),
        "sd_model": opts.sd_model,
        "clip_model": opts.clip_model,
        "device": str(opts.torch_device),
        "templates": templates,
        "temperature": classifier.temperature,
        "out_dim": int(classifier.text.shape[1]),
    }
