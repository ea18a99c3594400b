"""`predict` and `embed`: a trained head on new images, their features made with the run's own recipe.

    vermouth-cache predict RUN IMAGE_OR_DIR --out OUT [--top-k 5] [--text "the red ball"] [--classname kitchen]
    vermouth-cache embed RUN IMAGE_OR_DIR --out OUT

The run's features entry records the extraction request that made it; the new images go through
that request unchanged (model, t, noise, seed, prompt, taps, resolution, dtype, codec), only the
dataset differs: a manifest of the image files, written into OUT. The features go into the run's
store, so the keys follow the same rule as every other entry, and a second call on the same images
computes nothing. What comes out, per task:

    fewshot   the top-k classes of each image with their probabilities (the run's class prompts)
    sbir      the k nearest photos of the run's gallery (its photos entry, every class)
    seg       a label map of the centre crop, coloured, beside the crop: OUT/<image>.seg.png
    depth     the depth of the centre crop (metres, as grey levels), beside it: OUT/<image>.depth.png
    refer     the mask of the object --text refers to, over the crop: OUT/<image>.refer.png

and `embed` writes the pooled U-head embedding of each image (fewshot and sbir heads) to
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
from vermouth_cache.data.seg import crop_box
from vermouth_cache.extract.classtext import class_text_features
from vermouth_cache.extract.request import ExtractRequest
from vermouth_cache.extract.run import extract
from vermouth_cache.extract.selection import resolve_pins
from vermouth_cache.store.entries import Store, refuse_inside_store
from vermouth_cache.train.common import RunOptions, loader_for
from vermouth_cache.train.heads import TextClassifier
from vermouth_cache.train.inputs import CachedSplit, open_split
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

    def request(self) -> tuple[dict, str]:
        """The extraction request that made the run's training features, and their U-net's identity."""
        key = _first_features_key(self.metrics.get("entries", {}))
        if key is None:
            raise VermouthError(f"{self.run}/metrics.json names no features entry")
        entry = self.store.find("features", key)
        return dict(entry.manifest["about"]["request"]), entry.manifest["recipe"]["unet"]

    def features_of(self, images: str | Path, out: Path, *, text: str | None = None, classname: str | None = None,
                    device: str | None = None, progress: bool = True) -> tuple[CachedSplit, dict]:
        """The cached features of the new images (extracted with the run's request if missing)."""
        saved, unet = self.request()
        manifest, root = write_manifest(Path(images), out, text=text, classname=classname)
        req = ExtractRequest.from_json(saved, dataset=str(manifest), image_root=str(root), split=None, shots=None,
                                       layout=None, views=1, slide=False, store=str(self.store.root),
                                       progress=progress, **({"device": device} if device else {}))
        report = extract(req)
        ds = req.load_dataset()
        pins = {**resolve_pins(dict(self.config.get("select") or {})), "unet": unet}
        return open_split(self.store, ds, self.settings, pins=pins), {"computed": dict(report.computed),
                                                                     "entries": report.entries}

    def options(self, device: str | None) -> RunOptions:
        return RunOptions(store=str(self.store.root), clip_model=self.config.get("clip_model") or "", device=device,
                          progress=False)

    def classifier(self, device) -> TextClassifier:
        """The run's class prompts (its CLIP model, templates and temperature), from the store."""
        text = class_text_features(self.store, self.config["classnames"] if self.task != "sbir" else self.config["seen"],
                                   self.config["templates"], self.config["clip_model"], proj=self.settings.text_proj)
        return TextClassifier(torch.from_numpy(text).to(device), self.config["temperature"])


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
    with manifest.open("w", newline="") as f:
        cols = ["path"] + (["text"] if text is not None else []) + (["classname"] if classname is not None else [])
        w = csv.writer(f)
        w.writerow(cols)
        for p in files:
            w.writerow([p.relative_to(root).as_posix()] + ([text] if text is not None else [])
                       + ([classname] if classname is not None else []))
    return manifest, root


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
    split, facts = head.features_of(images, out, text=text, classname=classname, device=device, progress=progress)
    opts = head.options(device)
    dev = opts.torch_device
    model = head.model.to(dev).eval()
    loader = loader_for(split, head.settings, opts, shuffle=False)
    rows = {r: i for i, r in enumerate(split.indices)}
    results = []
    with torch.no_grad():
        if head.task == "fewshot":
            classifier = head.classifier(dev)
            names = head.config["classnames"]
            k = min(top_k, len(names))
            for batch in loader:
                p = classifier(model(batch)).softmax(1).cpu()
                for row, probs in zip(batch["index"].tolist(), p):
                    top = probs.topk(k)
                    results.append({"id": split.sample_ids[rows[row]], "top": [
                        {"class": names[int(c)], "p": round(float(v), 6)} for v, c in zip(top.values, top.indices)]})
        elif head.task == "sbir":
            results = _nearest_photos(head, model, split, loader, opts, top_k)
        else:
            results = _dense(head, model, split, loader, out, dev)
    report = {"run": str(head.run), "task": head.task, "images": len(results), "skipped": dict(split.skipped),
              "features": split.features.key, "computed": facts["computed"], "predictions": results}
    (out / "predictions.json").write_text(json.dumps(report, indent=1))
    return report


def _nearest_photos(head: RunHead, model, queries: CachedSplit, loader, opts, top_k: int) -> list[dict]:
    from vermouth_cache.train.tasks.sbir import SbirData, _trees

    photos = _trees(SbirData(**head.config["data"])).photos
    pins = {**resolve_pins(dict(head.config.get("select") or {})), "unet": head.request()[1]}
    gallery = open_split(head.store, photos, head.settings, pins=pins)
    g = torch.cat([model(b).float() for b in loader_for(gallery, head.settings, opts, shuffle=False)])
    q_rows = {r: i for i, r in enumerate(queries.indices)}
    out = []
    for batch in loader:
        sim = F.normalize(model(batch).float(), dim=1) @ F.normalize(g, dim=1).T
        top = sim.topk(min(top_k, g.shape[0]), dim=1)
        for row, vals, idx in zip(batch["index"].tolist(), top.values, top.indices):
            out.append({"id": queries.sample_ids[q_rows[row]], "nearest": [
                {"photo": gallery.sample_ids[int(i)], "class": photos.classnames[int(gallery.labels[int(i)])],
                 "cosine": round(float(v), 6)} for v, i in zip(vals, idx)]})
    return out


def _dense(head: RunHead, model, split: CachedSplit, loader, out: Path, device) -> list[dict]:
    """Seg, depth and refer: each image's map at the crop's resolution, drawn beside the crop."""
    res = head.settings.resolution
    closed = head.task != "seg" or head.settings.method != "vermouth"  # VPD's FPN predicts its classes itself
    classifier = None if closed else head.classifier(device)
    results = []
    for batch in loader:
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
        for row, m in zip(batch["index"].tolist(), maps.cpu().numpy()):
            sample = split.dataset.samples[row]  # rows are dataset indices (the manifest is the whole dataset)
            png = out / (Path(sample.id).name + f".{head.task}.png")
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
    split, facts = head.features_of(images, out, device=device, progress=progress)
    opts = head.options(device)
    model = head.model.to(opts.torch_device).eval()
    rows = {r: i for i, r in enumerate(split.indices)}
    ids, vecs = [], []
    with torch.no_grad():
        for batch in loader_for(split, head.settings, opts, shuffle=False):
            vecs.append(model(batch).float().cpu().numpy())
            ids += [split.sample_ids[rows[r]] for r in batch["index"].tolist()]
    emb = np.concatenate(vecs)
    np.savez(out / "embeddings.npz", ids=np.array(ids), embeddings=emb)
    return {"run": str(head.run), "images": len(ids), "dim": int(emb.shape[1]), "skipped": dict(split.skipped),
            "computed": facts["computed"], "path": str(out / "embeddings.npz")}
