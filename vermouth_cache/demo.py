"""`demo`: the whole flow on tiny models and the bundled demo data, in seconds on 2 CPUs.

    vermouth-cache demo --out demo-out

Writes tiny random models, extracts the demo split's train, val and test images into a store,
lists the store, fits a linear probe on the cached train features and prints its accuracy on the
held-out (val + test) images. The models are RANDOM: the figure checks the flow, not the method.
t defaults to 10 because at t=200 the noise swamps what random weights keep of an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .extract import ExtractReport, extract
from .listing import table
from .probe import fit_linear_probe, pooled_features, top1
from .request import ExtractRequest
from .store import Store
from .tiny_models import write_tiny_models

DEMO_SPLIT = Path(__file__).resolve().parent.parent / "data" / "demo" / "split_zhou_Demo.json"


@dataclass
class DemoResult:
    reports: dict[str, ExtractReport]
    listing: str
    accuracy: float
    n_train: int
    n_test: int
    n_classes: int


def run_demo(out: str | Path, *, progress: bool = True, t: int = 10, stages: str = "mid,up") -> DemoResult:
    out = Path(out)
    models = out / "models"
    if not (models / "sd" / "model_index.json").is_file():
        write_tiny_models(models)
    base = ExtractRequest(dataset=str(DEMO_SPLIT), store=str(out / "store"), sd_model=str(models / "sd"),
                          captioner=str(models / "blip"), resolution=128, t=(t,), stages=stages, device="cpu",
                          shard_size=16, batch_size=8, progress=progress)
    reports = {split: extract(base.with_(split=split)) for split in ("train", "val", "test")}
    store = Store(out / "store")
    feats, labels = {}, {}
    for split, rep in reports.items():
        entry = store.find("features", rep.entries[f"features t={t}"])
        x, keep = pooled_features(entry, entry.array_names())
        record = store.dataset(rep.dataset["record"])
        feats[split], labels[split] = x, np.array([record["labels"][i] for i in keep])
    n_classes = len(store.dataset(reports["train"].dataset["record"])["classnames"])
    predict = fit_linear_probe(feats["train"], labels["train"], n_classes)
    held_x = np.concatenate([feats["val"], feats["test"]])
    held_y = np.concatenate([labels["val"], labels["test"]])
    acc = top1(predict(held_x), held_y)
    return DemoResult(reports, table(store), acc, len(labels["train"]), len(held_y), n_classes)
