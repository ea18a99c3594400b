"""Few-shot classification from the cache, CoOp protocol (PAPER.md section 5).

    vermouth-cache train fewshot --store STORE --dataset split_zhou_OxfordPets.json --shots 16 --out RUN

K shots per class from the train split with a seed (the same sampler `extract --shots` uses), the
val split for model selection (the epoch with the best val top-1 is kept), top-1 on the test split.
Features come from an extraction of that K-shot subset, or of the whole train split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..datasets import load_dataset
from ..heads import TextClassifier
from ..metrics import per_class_accuracy, top1
from ..store import Store
from .common import RunOptions, base_config, build_head, class_text, head_facts, infer, loader_for, unet_identity
from .inputs import CachedSplit, open_split
from .loop import fit
from .runs import prepare_run_dir, write_run
from .settings import TaskSettings

SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class FewshotData:
    dataset: str  # a CoOp split file (or any dataset with train/val/test splits)
    image_root: str | None = None
    shots: int = 16
    shot_seed: int = 0


def train_fewshot(data: FewshotData, s: TaskSettings, opts: RunOptions) -> dict:
    """Train a head on K-shot cached features; returns the metrics written to RUN/metrics.json."""
    out = prepare_run_dir(opts.out, opts.overwrite)
    store = Store(opts.store)
    kw = {"image_root": data.image_root}
    train_ds = load_dataset(data.dataset, split="train", shots=data.shots, shot_seed=data.shot_seed, **kw)
    full_train = load_dataset(data.dataset, split="train", **kw)
    uid = unet_identity(opts)
    train = open_split(store, train_ds, s, unet_identity=uid, superset=full_train)
    val = open_split(store, load_dataset(data.dataset, split="val", **kw), s, unet_identity=uid)
    test = open_split(store, load_dataset(data.dataset, split="test", **kw), s, unet_identity=uid)
    _same_features(train, val, test)

    name = train_ds.name.split("/")[0]
    text, templates = class_text(store, train_ds.classnames, name, s, opts)
    classifier = TextClassifier(text, s.temperature)
    model = build_head(train, s, "global", text.shape[1], opts.torch_device)
    n_classes = len(train_ds.classnames)

    def loss_fn(batch):
        return F.cross_entropy(classifier(model(batch)), batch["label"])

    scorer = torch.nn.Sequential(model, classifier)

    def accuracy(split: CachedSplit, loader) -> tuple[float, list]:
        logits, _ = infer(scorer, loader)
        pred = logits.argmax(1).cpu().numpy()
        return top1(pred, split.labels), per_class_accuracy(pred, split.labels, n_classes)

    val_loader = loader_for(val, s, opts, shuffle=False)
    result = fit(model, list(model.parameters()), loss_fn,
                 loader_for(train, s, opts, shuffle=True, desc=f"train fewshot {name}"), s,
                 evaluate=lambda: {"top1": accuracy(val, val_loader)[0]}, select="top1")
    test_top1, per_class = accuracy(test, loader_for(test, s, opts, shuffle=False))
    metrics = {
        "task": "fewshot",
        "top1": test_top1,
        "val_top1": result.best["top1"] if result.best else None,
        "best_step": result.best_step,
        "steps": result.steps,
        "chance": 1 / n_classes,
        "per_class_top1": dict(zip(train_ds.classnames, per_class)),
        "n": {"train": len(train.indices), "val": len(val.indices), "test": len(test.indices)},
        "skipped": {**train.skipped, **val.skipped, **test.skipped},
        "entries": {"train": train.keys(), "val": val.keys(), "test": test.keys()},
    }
    config = {**base_config("fewshot", s, opts, classifier, templates),
              "data": data.__dict__, "classnames": list(train_ds.classnames),
              "datasets": {k: {"name": sp.dataset.name, "identity": sp.dataset.identity()}
                           for k, sp in (("train", train), ("val", val), ("test", test))},
              "head": head_facts(model, s, "global"),
              "title": f"fewshot {name} {data.shots}-shot, t={s.t}, {s.stages}, {s.head}"}
    write_run(out, config=config, metrics=metrics, model=model, history=result.history, select="top1")
    return metrics


def _same_features(*splits: CachedSplit) -> None:
    """train/val/test must share the U-net, schedule and options; only the dataset may differ."""
    from ..errors import VermouthError

    facts = [{k: v for k, v in sp.features.manifest["recipe"].items() if k not in ("latents", "text")} for sp in splits]
    for sp, f in zip(splits[1:], facts[1:]):
        diff = sorted(k for k in set(f) | set(facts[0]) if f.get(k) != facts[0].get(k))
        if diff:
            raise VermouthError(f"features of {sp.dataset.name} and {splits[0].dataset.name} were made "
                                f"differently ({', '.join(diff)}): extract every split with the same options")
