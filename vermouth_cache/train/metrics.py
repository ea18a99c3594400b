"""Evaluation metrics for probes on cached features: classification, zero-shot SBIR retrieval, segmentation.

Definitions (inputs may be numpy arrays or torch tensors):

- top1: fraction of samples whose predicted class (argmax over the last axis for (N, C) scores) equals y.
- per_class_accuracy: for each class c, top-1 accuracy over the samples with y == c; None if c is absent from y.
- AP of one query (mAP@all): mean over its relevant gallery items (same label) of the precision at each
  one's rank in the whole ranked gallery (non-interpolated; sklearn's average_precision_score on tie-free scores).
- mAP@k: AP on the top-k list only, divided by the number of relevant items inside the top k; 0 when the
  top k holds none (sem-pcyc `utils.apsak`; Doodle2Search's commented-out mAP@200: sklearn AP on the top k).
- P@k: relevant items among the top min(k, G), divided by min(k, G).
- Ties in similarity: pessimistic; among equal scores irrelevant items rank before relevant ones, for AP,
  mAP@k and P@k alike, so results never depend on gallery order.
- Queries with no relevant item in the gallery have no AP: they are left out of every mean (mAP and P@k)
  and counted in "n_queries_without_relevant" (sem-pcyc would score them 0; zero-shot splits have none).
- confusion_matrix: conf[t, p] = pixels with target t and prediction p, target == ignore_index skipped.
- IoU_c = conf[c, c] / (row_c + col_c - conf[c, c]); NaN (reported None) when that union is 0, and mIoU is
  the mean over the other classes (mmsegmentation's nanmean), so a class predicted but absent scores 0.
- pixel_acc: trace / total; mAcc: mean over classes present in the target of conf[c, c] / row_c.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vermouth_cache.core.errors import VermouthError

# Bounds the (rows x G) working arrays of retrieval_metrics to about 2M elements each (~150 MB all told).
_CHUNK_ELEMENTS = 1 << 21


def _np(x) -> np.ndarray:
    # Tensors that need grad or live on a GPU refuse np.asarray; metrics never need either.
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def _int_labels(x, name: str, ndim: int = 1) -> np.ndarray:
    a = _np(x)
    if a.ndim != ndim:
        raise VermouthError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype != bool and not np.issubdtype(a.dtype, np.integer):
        raise VermouthError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    return a.astype(np.int64)


def _class_ids(pred, y) -> tuple[np.ndarray, np.ndarray]:
    p = _np(pred)
    y = _int_labels(y, "y")
    if p.ndim == 2:
        p = p.argmax(axis=1)  # ties go to the lowest class id
    p = _int_labels(p, "pred")
    if p.shape != y.shape:
        raise VermouthError(f"pred has {p.shape[0]} samples but y has {y.shape[0]}")
    if y.size == 0:
        raise VermouthError("no samples to score")
    return p, y


def top1(pred, y) -> float:
    """Top-1 accuracy; `pred` is (N,) class ids or (N, C) scores."""
    p, y = _class_ids(pred, y)
    return float(np.mean(p == y))


def per_class_accuracy(pred, y, n_classes: int) -> list[float | None]:
    """Top-1 accuracy of each class over its own samples; None for a class with no sample in y."""
    p, y = _class_ids(pred, y)
    for name, a in (("y", y), ("pred", p)):
        if a.min() < 0 or a.max() >= n_classes:
            raise VermouthError(f"{name} has class ids outside 0..{n_classes - 1}")
    total = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y[p == y], minlength=n_classes)
    return [float(h / t) if t else None for h, t in zip(hits.tolist(), total.tolist())]


def _retrieval_chunk(sim: np.ndarray, rel: np.ndarray, ks: Sequence[int]):
    """Per-query AP@all, and per k: AP@k and relevant-in-top-k, under the pessimistic tie rule."""
    rows, g = sim.shape
    order = np.argsort(-sim, axis=1)  # tie order is arbitrary here and corrected below
    s = np.take_along_axis(sim, order, axis=1)
    r = np.take_along_axis(rel, order, axis=1)
    cumrel = np.cumsum(r, axis=1, dtype=np.int64)
    idx = np.arange(g)
    is_end = np.ones((rows, g), dtype=bool)
    is_end[:, :-1] = s[:, :-1] != s[:, 1:]
    if is_end.all():
        rank = np.broadcast_to(idx + 1, (rows, g))
    else:
        # Pessimistic rank of the n-th relevant item = n + (irrelevant items scoring >= it), i.e. its
        # tie block's irrelevant items all count as ahead of it. Within a block the relevant items
        # take the n's cumrel assigns them in any order, so the arbitrary argsort order is harmless.
        end = np.where(is_end, idx, g - 1)
        end = np.minimum.accumulate(end[:, ::-1], axis=1)[:, ::-1]
        irrelevant_to_end = end + 1 - np.take_along_axis(cumrel, end, axis=1)
        rank = cumrel + irrelevant_to_end
    prec = np.where(r, cumrel / rank, 0.0)
    n_rel = cumrel[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap_all = prec.sum(axis=1) / n_rel
    at_k = []
    for k in ks:
        # Normalised by the relevant items inside the top k, as sem-pcyc (src/utils.py apsak) and
        # Doodle2Search (src/test.py) do; SAKE's eval_AP_inner instead VOC-interpolates precision and
        # divides by min(k, n_relevant), which gives different numbers: not followed.
        in_k = r & (rank <= k)
        hits = in_k.sum(axis=1)
        ap_k = np.where(in_k, prec, 0.0).sum(axis=1) / np.maximum(hits, 1)
        at_k.append((ap_k, hits))
    return n_rel, ap_all, at_k


def retrieval_metrics(sim, query_labels, gallery_labels, ks: Sequence[int] = (100, 200)) -> dict:
    """ZS-SBIR metrics of a (Q, G) similarity matrix (higher = more similar); see the module docstring."""
    sim = _np(sim)
    if sim.ndim != 2:
        raise VermouthError(f"sim must be 2-D (queries x gallery), got shape {sim.shape}")
    if not np.issubdtype(sim.dtype, np.floating) or sim.dtype.itemsize < 4:
        sim = sim.astype(np.float64)  # -sim must not wrap (unsigned) or lose ties to rounding
    ql = _np(query_labels)
    gl = _np(gallery_labels)
    if ql.ndim != 1 or gl.ndim != 1:
        raise VermouthError("query_labels and gallery_labels must be 1-D")
    if sim.shape != (ql.shape[0], gl.shape[0]):
        raise VermouthError(
            f"sim has shape {sim.shape} but there are {ql.shape[0]} queries and {gl.shape[0]} gallery items"
        )
    if sim.size == 0:
        raise VermouthError("retrieval needs at least one query and one gallery item")
    if np.isnan(sim).any():
        raise VermouthError("sim contains NaN")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise VermouthError(f"ks must be positive, got {ks}")
    q, g = sim.shape
    n_rel = np.empty(q, dtype=np.int64)
    ap_all = np.empty(q)
    ap_k = np.empty((len(ks), q))
    hits_k = np.empty((len(ks), q), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // g)
    for a in range(0, q, step):
        b = min(q, a + step)
        rel = ql[a:b, None] == gl[None, :]
        n_rel[a:b], ap_all[a:b], at_k = _retrieval_chunk(sim[a:b], rel, ks)
        for i, (ap, hits) in enumerate(at_k):
            ap_k[i, a:b], hits_k[i, a:b] = ap, hits
    kept = n_rel > 0
    if not kept.any():
        raise VermouthError("no query has a relevant item (same label) in the gallery")
    out = {"mAP@all": float(ap_all[kept].mean())}
    for i, k in enumerate(ks):
        out[f"mAP@{k}"] = float(ap_k[i, kept].mean())
        out[f"P@{k}"] = float((hits_k[i, kept] / min(k, g)).mean())
    out["n_queries"] = int(kept.sum())
    out["n_queries_without_relevant"] = int(q - kept.sum())
    return out


def confusion_matrix(pred, target, n_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(C, C) int64 counts, rows = target class, columns = predicted class; sum over images to accumulate."""
    p = _np(pred)
    t = _np(target)
    if p.shape != t.shape:
        raise VermouthError(f"pred has shape {p.shape} but target has {t.shape}")
    p = _int_labels(p.reshape(-1), "pred")
    t = _int_labels(t.reshape(-1), "target")
    if n_classes < 1:
        raise VermouthError(f"n_classes must be positive, got {n_classes}")
    if p.size and (p.min() < 0 or p.max() >= n_classes):
        raise VermouthError(f"pred has class ids outside 0..{n_classes - 1}")
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if t.size and (t.min() < 0 or t.max() >= n_classes):
        raise VermouthError(f"target has class ids outside 0..{n_classes - 1} (ignore_index={ignore_index})")
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64)


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def miou(conf) -> dict:
    """mIoU, per-class IoU (None where undefined), pixel accuracy and mean class accuracy of a confusion matrix."""
    conf = _np(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise VermouthError(f"confusion matrix must be square, got shape {conf.shape}")
    conf = conf.astype(np.float64)
    total = conf.sum()
    if total == 0:
        raise VermouthError("confusion matrix is empty (no labelled pixels)")
    tp = np.diag(conf)
    in_target = conf.sum(axis=1)
    union = in_target + conf.sum(axis=0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
        acc = tp / in_target
    return {
        # A non-empty matrix has a class with union > 0 and one with target pixels: no all-NaN means.
        "mIoU": float(np.nanmean(iou)),
        "per_class_IoU": [_none_if_nan(v) for v in iou.tolist()],
        "pixel_acc": float(tp.sum() / total),
        "mAcc": float(np.nanmean(acc)),
    }
