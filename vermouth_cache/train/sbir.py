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

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets import load_dataset
from ..errors import VermouthError
from ..heads import TextClassifier
from ..metrics import retrieval_metrics
from ..sbir_data import find_sbir_trees, sbir_split
from ..store import Store
from ..vocab import read_name_list, unseen_classes
from .common import RunOptions, base_config, build_head, class_text, head_facts, infer, loader_for, unet_identity
from .inputs import CachedSplit, open_split
from .loop import fit
from .runs import prepare_run_dir, write_run
from .settings import TaskSettings


@dataclass(frozen=True)
class SbirData:
    root: str  # the dataset root holding a photo tree and a sketch tree
    unseen: str | None = None  # a file of unseen class names; default: the literature's split for `name`
    name: str | None = None  # sketchy | tuberlin | quickdraw; guessed from the layout when absent


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
    out = prepare_run_dir(opts.out, opts.overwrite)
    store = Store(opts.store)
    photo_dir, sketch_dir, guess = find_sbir_trees(data.root)
    name = data.name or guess
    if data.unseen:
        unseen = read_name_list(data.unseen)
    elif name:
        unseen = unseen_classes(name)
    else:
        raise VermouthError(f"{data.root}: cannot tell which dataset this is; give --unseen FILE (or --name)")
    photos_ds, sketches_ds = load_dataset(photo_dir), load_dataset(sketch_dir)
    split = sbir_split(photos_ds.classnames, sketches_ds.classnames, list(unseen))
    uid = unet_identity(opts)
    photos = open_split(store, photos_ds, s, unet_identity=uid)
    sketches = open_split(store, sketches_ds, s, unet_identity=uid)

    def by_name(sp: CachedSplit, names: tuple[str, ...]) -> CachedSplit:
        index = {n: i for i, n in enumerate(names)}
        cls = [sp.dataset.classnames[y] for y in sp.labels]
        keep = np.array([c in index for c in cls])
        return restrict(sp, keep, np.array([index.get(c, -1) for c in cls]))

    seen_p, seen_s = by_name(photos, split.seen), by_name(sketches, split.seen)
    gallery, queries = by_name(photos, split.unseen), by_name(sketches, split.unseen)
    text, templates = class_text(store, split.seen, name or "sbir", s, opts)
    classifier = TextClassifier(text, s.temperature)
    model = build_head(photos, s, "global", text.shape[1], opts.torch_device)
    half = replace(s, batch_size=max(1, s.batch_size // 2))
    train_loader = PairedLoader(loader_for(seen_p, half, opts, shuffle=True, desc=f"train sbir {name or ''}"),
                                loader_for(seen_s, replace(half, seed=s.seed + 1), opts, shuffle=True))

    def loss_fn(batch):
        return F.cross_entropy(classifier(model(batch)), batch["label"])

    result = fit(model, list(model.parameters()), loss_fn, train_loader, s)
    q, _ = infer(model, loader_for(queries, s, opts, shuffle=False))
    g, _ = infer(model, loader_for(gallery, s, opts, shuffle=False))
    sim = (F.normalize(q, dim=1) @ F.normalize(g, dim=1).T).cpu().numpy()
    metrics = {
        "task": "sbir",
        **retrieval_metrics(sim, queries.labels, gallery.labels, ks=(100, 200)),
        "random_ranking_mAP": _random_map(queries.labels, gallery.labels),
        "steps": result.steps,
        "n": {"seen_photos": len(seen_p.indices), "seen_sketches": len(seen_s.indices),
              "unseen_photos": len(gallery.indices), "unseen_sketches": len(queries.indices)},
        "skipped": {**photos.skipped, **sketches.skipped},
        "entries": {"photos": photos.keys(), "sketches": sketches.keys()},
    }
    config = {**base_config("sbir", s, opts, classifier, templates), "data": data.__dict__, "name": name,
              "seen": list(split.seen), "unseen": list(split.unseen),
              "datasets": {"photos": {"name": photos_ds.name, "identity": photos_ds.identity()},
                           "sketches": {"name": sketches_ds.name, "identity": sketches_ds.identity()}},
              "head": head_facts(model, s, "global"),
              "title": f"sbir {name or data.root}, t={s.t}, {s.stages}, {s.head}"}
    write_run(out, config=config, metrics=metrics, model=model, history=result.history, select=None)
    return metrics


def _random_map(q_labels: np.ndarray, g_labels: np.ndarray, repeats: int = 5) -> float:
    """mAP@all of random rankings (seeded), the floor a trained head must clear."""
    rng = np.random.default_rng(0)
    return float(np.mean([retrieval_metrics(rng.random((len(q_labels), len(g_labels))), q_labels, g_labels)["mAP@all"]
                          for _ in range(repeats)]))
