"""Depth and referring-segmentation metrics exactly as VPD computes them (VPD.md sections 2.2, 2.3).

Depth (depth/utils_depth/metrics.py), per image, then averaged over images:
    pred: inf -> max_depth, nan -> min_depth; valid = min_depth < gt < max_depth (1e-3, 10), within
    the Eigen crop [45:471, 41:601] on 480x640 maps (`eigen_crop`); thresh = max(gt/p, p/gt);
    d1, d2, d3 = mean(thresh < 1.25 ** k); abs_rel = mean(|p - gt| / gt); sq_rel = mean((p - gt)^2 / gt);
    rmse = sqrt(mean((p - gt)^2)); rmse_log = sqrt(mean((ln p - ln gt)^2));
    log10 = mean(|log10 p - log10 gt|); silog = sqrt(mean(e^2) - 0.5 mean(e)^2), e = ln p - ln gt
    (lambda 0.5, no x100; BTS's silog is 100 sqrt(mean e^2 - mean(e)^2)).
Referring (refer/train.py, from LAVT): per (image, sentence) pair, I = |pred & gt|, U = |pred | gt|,
    IoU = I/U (0 when U = 0); mIoU = mean IoU; oIoU = sum I / sum U; P@X = share with IoU >= X.
"""

from __future__ import annotations

import numpy as np

DEPTH_KEYS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
EIGEN_CROP = (45, 471, 41, 601)  # rows, cols of NYU's 480x640 maps
PRECISION_AT = (0.5, 0.6, 0.7, 0.8, 0.9)


def depth_errors(pred: np.ndarray, gt: np.ndarray, *, min_depth: float = 1e-3, max_depth: float = 10.0,
                 eigen_crop: bool | None = None) -> dict[str, float] | None:
    """The nine metrics of one image (None when it has no valid pixel). eigen_crop None: on when
    the map is NYU's 480x640."""
    pred = np.asarray(pred, dtype=np.float64).copy()
    gt = np.asarray(gt, dtype=np.float64)
    pred[np.isinf(pred)] = max_depth
    pred[np.isnan(pred)] = min_depth
    valid = (gt > min_depth) & (gt < max_depth)
    if eigen_crop is None:
        eigen_crop = gt.shape == (480, 640)
    if eigen_crop:
        crop = np.zeros_like(valid)
        r0, r1, c0, c1 = EIGEN_CROP
        crop[r0:r1, c0:c1] = True
        valid &= crop
    if not valid.any():
        return None
    p, g = pred[valid], gt[valid]
    thresh = np.maximum(g / p, p / g)
    diff = p - g
    e = np.log(p) - np.log(g)
    return {"d1": float((thresh < 1.25).mean()), "d2": float((thresh < 1.25 ** 2).mean()),
            "d3": float((thresh < 1.25 ** 3).mean()), "abs_rel": float(np.mean(np.abs(diff) / g)),
            "sq_rel": float(np.mean(diff ** 2 / g)), "rmse": float(np.sqrt(np.mean(diff ** 2))),
            "rmse_log": float(np.sqrt(np.mean(e ** 2))), "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
            "silog": float(np.sqrt(max(0.0, np.mean(e ** 2) - 0.5 * np.mean(e) ** 2)))}


def mean_depth_metrics(per_image: list[dict]) -> dict[str, float]:
    """The average over images of each metric (VPD's MetricLogger.global_avg)."""
    per_image = [m for m in per_image if m is not None]
    return {k: float(np.mean([m[k] for m in per_image])) for k in DEPTH_KEYS} | {"images": len(per_image)}


def referring_scores(preds: list[np.ndarray], gts: list[np.ndarray]) -> dict[str, float]:
    """mIoU, oIoU and P@0.5..0.9 over (image, sentence) pairs of boolean masks."""
    inter = np.array([np.logical_and(p, g).sum() for p, g in zip(preds, gts)], dtype=np.float64)
    union = np.array([np.logical_or(p, g).sum() for p, g in zip(preds, gts)], dtype=np.float64)
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    out = {"mIoU": float(iou.mean()) if len(iou) else 0.0,
           "oIoU": float(inter.sum() / union.sum()) if union.sum() else 0.0, "pairs": len(iou)}
    out.update({f"P@{x}": float((iou >= x).mean()) if len(iou) else 0.0 for x in PRECISION_AT})
    return out
