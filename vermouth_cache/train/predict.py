"""`predict` and `embed`: a trained head on new images, their features made with the run's own recipe.

    vermouth-cache predict RUN IMAGE_OR_DIR --out OUT [--top-k 5] [--text "the red ball"] [--classname kitchen]
    vermouth-cache embed RUN IMAGE_OR_DIR --out OUT

The run's features entry records the extraction request that made it; the new images go through
that request unchanged (model, t, noise, seed, prompt, taps, resolution, dtype, codec), only the
dataset differs: a manifest of the image files, written into OUT (images.csv). Before extracting,
each image is looked up in the run's store (`extract.reuse`): a row another dataset's entry of the
same recipe holds for the same image bytes is read from there, through the same checked reads,
when it is provably what extraction would compute (same recipe but for the dataset, same bytes,
same text; under DDPM noise, which is drawn per sample id, the same id, i.e. the same path relative
to the folder given). Only the rest is extracted, as the dataset OUT/extract.csv when some were
reused, into the run's store, so a second call on the same images computes nothing. The result
says how many images were reused and how many extracted. What comes out, per task:

    fewshot   the top-k classes of each image with their probabilities (the run's class prompts)
    sbir      the k nearest photos of the run's gallery (its photos entry, every class)
    seg       a label map of the centre crop, coloured, beside the crop: OUT/<image>.seg.png
    depth     the depth of the centre crop (metres, as grey levels), beside it: OUT/<image>.depth.png
    refer     the mask of the object --text refers to, over the crop: OUT/<image>.refer.png

(<image>: its path under the folder given, so two images of one name in two subfolders keep
both maps), and `embed` writes the pooled U-head embedding of each image (fewshot and sbir heads) to
OUT/embeddings.npz (`ids`, `embeddings`). A prompt that reads a label (VPD depth's table-class)
needs `--classname`; a sentence prompt (refer) needs `--text`. Runs whose features were recomputed
online (--tune-norms, --adapter, --tune-unet) are refused: their features are not in a store.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.data.images import decode_sample
from vermouth_cache.data.samples import Dataset, Sample
from vermouth_cache.data.seg import crop_box
from vermouth_cache.extract.classtext import class_text_features
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.reuse import Reusable, Reused, find_reusable
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.selection import features_facts, resolve_pins
from vermouth_cache.methods import method_named
from vermouth_cache.models.loading import resolve_device
from vermouth_cache.models.taps import BLOCK_ORDER
from vermouth_cache.store.entries import Store, refuse_inside_store
from vermouth_cache.store.entry import Entry
from vermouth_cache.store.gc import mark_used
from vermouth_cache.train.common import RunOptions, loader_for
from vermouth_cache.train.heads import TextClassifier
from vermouth_cache.train.inputs import CachedSplit, feature_query, feature_taps, open_split
from vermouth_cache.train.runs import load_head
from vermouth_cache.train.settings import TaskSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".tif", ".tiff", ".gif"}
GLOBAL_TASKS = ("fewshot", "sbir")


@dataclass
class RunHead:
    """A run directory's head with what it needs to score new images."""
    run: Path
    model: torch.nn.Module
    config: dict
    metrics: dict
    settings: TaskSettings
    store: Store

    @classmethod
    def open(cls, run: str | Path, store: str | None = None) -> "RunHead":
        run = Path(run)
        model, config, extra = load_head(run)
        if extra:
            raise VermouthError(f"{run} trained {', '.join(sorted({k.split('.')[0] for k in extra}))} online: its "
                                "features are recomputed every step, not read from a store, so predict cannot make "
                                "them from a cache")
        try:
            metrics = json.loads((run / "metrics.json").read_text())
        except (OSError, ValueError) as exc:
            raise VermouthError(f"{run}: unreadable metrics.json ({exc})") from None
        missing = [k for k in ("task", "settings", "store") if not isinstance(config, dict) or k not in config]
        if missing or not isinstance(metrics, dict):
            raise VermouthError(f"{run}: config.json or metrics.json is not a run's (missing {', '.join(missing) or 'metrics'})")
        return cls(run, model, config, metrics, TaskSettings.parse(config["settings"]),
                   Store(store or config["store"]))

    @property
    def task(self) -> str:
        return self.config["task"]

    def trained_entry(self) -> Entry:
        """The features entry the run was trained on."""
        key = _first_features_key(self.metrics.get("entries", {}))
        if key is None:
            raise VermouthError(f"{self.run}/metrics.json names no features entry")
        return self.store.find("features", key)

    def request(self) -> tuple[dict, str]:
        """The extraction request that made the run's training features, and their U-net's identity."""
        entry = self.trained_entry()
        return dict(entry.manifest["about"]["request"]), entry.manifest["recipe"]["unet"]

    def arrays(self) -> list[str]:
        """The feature arrays the head reads: its taps, and the attention maps it was trained with."""
        s = self.settings
        taps = list(feature_taps(s))
        if s.attn_maps:
            have = self.trained_entry().array_names()
            taps += [n for n in method_named(s.method).attention.taps(s.attn_maps, BLOCK_ORDER) if n in have]
        return taps

    def features_of(self, images: str | Path, out: Path, *, text: str | None = None, classname: str | None = None,
                    device: str | None = None, progress: bool = True) -> "NewFeatures":
        """The cached features of the new images: rows the store already holds for the same image
        (`extract.reuse`), and the rest extracted with the run's request."""
        saved, unet = self.request()
        manifest, root = write_manifest(Path(images), out, text=text, classname=classname)
        req = ExtractRequest.from_json(saved, dataset=str(manifest), image_root=str(root), split=None, shots=None,
                                       layout=None, views=1, slide=False, store=str(self.store.root),
                                       progress=progress, **({"device": device} if device else {}))
        if resolve_device(req.device).type == "cpu" and req.precision != "auto":
            req = req.with_(precision="auto")  # a run extracted in bf16 on a GPU: fp32 here (not in the key)
        ds = req.load_dataset()
        pins = {**resolve_pins(dict(self.config.get("select") or {})), "unet": unet}
        query = feature_query(self.settings, pins)
        arrays = self.arrays()
        if self.settings.expert and not req.expert:  # its expert maps came from another request: not looked up
            found = Reusable([], list(range(len(ds))))
        else:
            found = find_reusable(self.store, req, ds, t=self.settings.t, arrays=arrays,
                                  accept=lambda e: query.accepts(features_facts(self.store, e)))
        parts = [self._reused(ds, p, arrays) for p in found.parts]
        facts = {"reused": found.n_reused, "extracted": len(found.rest), "computed": {}, "notes": found.notes}
        skipped: dict[str, str] = {}
        rest = out / "extract.csv"  # the images to extract, when some were reused
        if rest.exists():
            rest.unlink()  # a former call's
        if found.rest:
            if len(found.rest) < len(ds):
                _write_rows(rest, [ds.samples[i].id for i in found.rest], text=text, classname=classname)
                req = req.with_(dataset=str(rest))
            report = extract(req)
            sub = req.load_dataset()
            split = open_split(self.store, sub, self.settings, pins=pins, empty_ok=bool(parts))
            if split.indices:  # else every image extracted now failed, and some were reused
                parts.append(Part(split, {row: [sub.samples[row]] for row in split.indices}))
            skipped = dict(split.skipped)
            facts["computed"] = dict(report.computed)
        return NewFeatures(ds, parts, skipped, facts)

    def _reused(self, ds: Dataset, found: Reused, arrays: list[str]) -> "Part":
        rows = sorted(found.rows)
        expert = found.expert if self.settings.expert else None
        for used in (found.features, expert):
            if used is not None:
                mark_used(self.store, used)  # for `gc --unused-days`, as a run's own reads do
        split = CachedSplit(ds, found.features, expert, rows, np.full(len(rows), -1),
                            [ds.samples[found.rows[r][0]].id for r in rows], list(arrays))
        return Part(split, {r: [ds.samples[i] for i in found.rows[r]] for r in rows})

    def options(self, device: str | None) -> RunOptions:
        return RunOptions(store=str(self.store.root), clip_model=self.config.get("clip_model") or "", device=device,
                          progress=False)

    def classifier(self, device) -> TextClassifier:
        """The run's class prompts (its CLIP model, templates and temperature), from the store."""
        text = class_text_features(self.store, self.config["classnames"] if self.task != "sbir" else self.config["seen"],
                                   self.config["templates"], self.config["clip_model"], proj=self.settings.text_proj)
        return TextClassifier(torch.from_numpy(text).to(device), self.config["temperature"])


@dataclass
class Part:
    """Rows of one features entry (and its expert entry), and the new images each row serves."""
    split: CachedSplit
    samples: dict[int, list[Sample]]  # entry row -> the images (more than one: the same bytes twice)

    def batches(self, head: RunHead, opts: RunOptions):
        """(batch, the images of each of its rows) in entry order."""
        for batch in loader_for(self.split, head.settings, opts, shuffle=False):
            yield batch, [self.samples[r] for r in batch["index"].tolist()]


@dataclass
class NewFeatures:
    """The new images (OUT/images.csv) and where their features are read from."""
    dataset: Dataset
    parts: list[Part]
    skipped: dict[str, str]  # image id -> why (failed at extraction)
    facts: dict  # reused, extracted (image counts), computed (samples through each model), notes

    @property
    def keys(self) -> list[str]:
        return sorted({p.split.features.key for p in self.parts})

    def in_order(self, results: list[dict]) -> list[dict]:
        """Results in the images' order (that of OUT/images.csv)."""
        at = {s.id: k for k, s in enumerate(self.dataset.samples)}
        return sorted(results, key=lambda r: at[r["id"]])


def _first_features_key(entries: dict) -> str | None:
    for value in entries.values():
        if isinstance(value, dict):
            if isinstance(value.get("features"), str):
                return value["features"]
            found = _first_features_key(value)
            if found:
                return found
    return None


def write_manifest(images: Path, out: Path, *, text: str | None, classname: str | None) -> tuple[Path, Path]:
    """OUT/images.csv listing the image file(s) at `images` (a file, or a folder read recursively),
    ids relative to their folder; with the sentence or class every row then carries."""
    if not images.exists():
        raise VermouthError(f"no such image or folder: {images}")
    root = images if images.is_dir() else images.parent
    files = [images] if images.is_file() else sorted(
        p for p in images.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(images).parts))
    if not files:
        raise VermouthError(f"{images}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "images.csv"
    _write_rows(manifest, [p.relative_to(root).as_posix() for p in files], text=text, classname=classname)
    return manifest, root


def _write_rows(manifest: Path, paths: list[str], *, text: str | None, classname: str | None) -> None:
    with manifest.open("w", newline="") as f:
        cols = ["path"] + (["text"] if text is not None else []) + (["classname"] if classname is not None else [])
        w = csv.writer(f)
        w.writerow(cols)
        for rel in paths:
            w.writerow([rel] + ([text] if text is not None else []) + ([classname] if classname is not None else []))


# -- predict -------------------------------------------------------------------------------------
def predict(run: str | Path, images: str | Path, out: str | Path, *, top_k: int = 5, text: str | None = None,
            classname: str | None = None, store: str | None = None, device: str | None = None,
            progress: bool = True) -> dict:
    """Predictions of the run's head on `images`, written to OUT/predictions.json (and maps as PNGs)."""
    head = RunHead.open(run, store)
    out = Path(out)
    refuse_inside_store(out, "prediction directory")
    if head.task == "refer" and not text:
        raise VermouthError("a refer head segments what a sentence refers to: give --text")
    if text and head.task != "refer":
        raise VermouthError(f"--text is the referring sentence of a refer head; {head.run} is a {head.task} run")
    new = head.features_of(images, out, text=text, classname=classname, device=device, progress=progress)
    opts = head.options(device)
    dev = opts.torch_device
    model = head.model.to(dev).eval()
    results = []
    with torch.no_grad():
        if head.task == "fewshot":
            classifier = head.classifier(dev)
            names = head.config["classnames"]
            k = min(top_k, len(names))
            for part in new.parts:
                for batch, served in part.batches(head, opts):
                    p = classifier(model(batch)).softmax(1).cpu()
                    for samples, probs in zip(served, p):
                        top = probs.topk(k)
                        results += [{"id": sample.id, "top": [
                            {"class": names[int(c)], "p": round(float(v), 6)} for v, c in zip(top.values, top.indices)]}
                            for sample in samples]
        elif head.task == "sbir":
            results = _nearest_photos(head, model, new.parts, opts, top_k)
        else:
            results = _dense(head, model, new.parts, opts, out, dev)
    results = new.in_order(results)
    report = {"run": str(head.run), "task": head.task, "images": len(results), "skipped": new.skipped,
              "features": new.keys, **new.facts, "predictions": results}
    (out / "predictions.json").write_text(json.dumps(report, indent=1))
    return report


def _nearest_photos(head: RunHead, model, parts: list[Part], opts, top_k: int) -> list[dict]:
    from vermouth_cache.train.tasks.sbir import SbirData, _trees

    photos = _trees(SbirData(**head.config["data"])).photos
    pins = {**resolve_pins(dict(head.config.get("select") or {})), "unet": head.request()[1]}
    gallery = open_split(head.store, photos, head.settings, pins=pins)
    g = torch.cat([model(b).float() for b in loader_for(gallery, head.settings, opts, shuffle=False)])
    out = []
    for part in parts:
        for batch, served in part.batches(head, opts):
            sim = F.normalize(model(batch).float(), dim=1) @ F.normalize(g, dim=1).T
            top = sim.topk(min(top_k, g.shape[0]), dim=1)
            for samples, vals, idx in zip(served, top.values, top.indices):
                out += [{"id": sample.id, "nearest": [
                    {"photo": gallery.sample_ids[int(i)], "class": photos.classnames[int(gallery.labels[int(i)])],
                     "cosine": round(float(v), 6)} for v, i in zip(vals, idx)]} for sample in samples]
    return out


def _dense(head: RunHead, model, parts: list[Part], opts, out: Path, device) -> list[dict]:
    """Seg, depth and refer: each image's map at the crop's resolution, drawn beside the crop."""
    res = head.settings.resolution
    closed = head.task != "seg" or head.settings.method != "vermouth"  # VPD's FPN predicts its classes itself
    classifier = None if closed else head.classifier(device)
    results = []
    for part in parts:
        for batch, served in part.batches(head, opts):
            if head.task == "seg":
                logits = model(batch) if classifier is None else classifier(model(batch))
                maps = F.interpolate(logits.float(), size=(res, res), mode="bilinear", align_corners=False).argmax(1)
            elif head.task == "depth":
                maps = model(batch, res)[:, 0, :res, :res].float()
            elif head.task == "refer":
                from vermouth_cache.train.tasks.refer import logits_at

                maps = logits_at(model, batch, res).argmax(1)
            else:
                raise VermouthError(f"predict does not know task {head.task!r}")
            for samples, m in zip(served, maps.cpu().numpy()):
                for sample in samples:
                    png = out / (sample.id + f".{head.task}.png")  # its path under the folder: names may repeat
                    png.parent.mkdir(parents=True, exist_ok=True)
                    stats = _draw(sample, m, head.task, res, png, n_classes=len(head.config.get("classnames") or []))
                    results.append({"id": sample.id, "png": str(png), **stats})
    return results


def _draw(sample, m: np.ndarray, task: str, res: int, png: Path, n_classes: int) -> dict:
    """The image's centre crop and its map side by side (refer: the mask over the crop)."""
    img = decode_sample(sample)
    left, top, right, bottom = crop_box(img.width, img.height, res)
    crop = img.crop((left, top, right, bottom))
    size = crop.size
    if task == "seg":
        palette = np.random.default_rng(0).integers(40, 256, (max(n_classes, int(m.max()) + 1), 3), dtype=np.uint8)
        drawn = Image.fromarray(palette[m]).resize(size, Image.Resampling.NEAREST)
        stats = {"classes": {int(c): int(n) for c, n in zip(*np.unique(m, return_counts=True))}}
    elif task == "depth":
        scaled = np.clip(m / max(float(m.max()), 1e-6) * 255, 0, 255).astype(np.uint8)
        drawn = Image.fromarray(scaled).convert("RGB").resize(size, Image.Resampling.BILINEAR)
        stats = {"depth_min_m": round(float(m.min()), 4), "depth_max_m": round(float(m.max()), 4)}
    else:
        mask = Image.fromarray((m > 0).astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        red = Image.new("RGB", size, (255, 0, 0))
        drawn = Image.composite(Image.blend(crop, red, 0.5), crop, mask)
        stats = {"mask_fraction": round(float((m > 0).mean()), 4)}
    canvas = Image.new("RGB", (size[0] * 2, size[1]))
    canvas.paste(crop, (0, 0))
    canvas.paste(drawn, (size[0], 0))
    canvas.save(png)
    return stats


# -- embed ---------------------------------------------------------------------------------------
def embed(run: str | Path, images: str | Path, out: str | Path, *, store: str | None = None,
          device: str | None = None, progress: bool = True) -> dict:
    """The pooled U-head embedding of each image (what the classifier scores), to OUT/embeddings.npz."""
    head = RunHead.open(run, store)
    if head.task not in GLOBAL_TASKS:
        raise VermouthError(f"embed takes a head that pools an image into one vector ({', '.join(GLOBAL_TASKS)}); "
                            f"{head.run} is a {head.task} run")
    out = Path(out)
    refuse_inside_store(out, "embedding directory")
    new = head.features_of(images, out, device=device, progress=progress)
    opts = head.options(device)
    model = head.model.to(opts.torch_device).eval()
    at = {s.id: k for k, s in enumerate(new.dataset.samples)}
    ids, vecs = [], []
    with torch.no_grad():
        for part in new.parts:
            for batch, served in part.batches(head, opts):
                v = model(batch).float().cpu().numpy()
                for samples, row in zip(served, v):
                    ids += [s.id for s in samples]
                    vecs += [row] * len(samples)
    order = sorted(range(len(ids)), key=lambda k: at[ids[k]])
    ids, emb = [ids[k] for k in order], np.stack([vecs[k] for k in order])
    np.savez(out / "embeddings.npz", ids=np.array(ids), embeddings=emb)
    return {"run": str(head.run), "images": len(ids), "dim": int(emb.shape[1]), "skipped": new.skipped,
            "features": new.keys, **new.facts, "path": str(out / "embeddings.npz")}
