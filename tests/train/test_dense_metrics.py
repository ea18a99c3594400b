"""Depth and referring metrics against hand-worked examples and the formulas VPD.md quotes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vermouth_cache.train.dense_metrics import depth_errors, mean_depth_metrics, referring_scores


def test_depth_errors_by_hand():
    gt = np.array([[1.0, 2.0], [4.0, 0.0]])  # one pixel without ground truth
    pred = np.array([[1.0, 2.5], [2.0, 7.0]])
    m = depth_errors(pred, gt)
    # valid pixels: (1, 1), (2.5, 2), (2, 4); thresh = 1, 1.25, 2
    assert m["d1"] == pytest.approx(1 / 3)  # 1.25 is not < 1.25
    assert m["d2"] == pytest.approx(2 / 3) and m["d3"] == pytest.approx(2 / 3)
    assert m["abs_rel"] == pytest.approx((0 + 0.5 / 2 + 2 / 4) / 3)
    assert m["sq_rel"] == pytest.approx((0 + 0.25 / 2 + 4 / 4) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 4) / 3))
    e = [0.0, math.log(1.25), math.log(0.5)]
    assert m["rmse_log"] == pytest.approx(math.sqrt(sum(x * x for x in e) / 3))
    assert m["log10"] == pytest.approx(sum(abs(x) for x in e) / math.log(10) / 3)
    assert m["silog"] == pytest.approx(math.sqrt(sum(x * x for x in e) / 3 - 0.5 * (sum(e) / 3) ** 2))


def test_depth_errors_follow_vpd_not_bts_for_silog_and_clean_bad_predictions():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.5, 9.0, (20, 30))
    pred = gt * rng.uniform(0.8, 1.2, gt.shape)
    m = depth_errors(pred, gt)
    e = np.log(pred) - np.log(gt)
    bts_silog = 100 * np.sqrt(np.mean(e ** 2) - np.mean(e) ** 2)  # BTS: lambda 1, x100
    assert m["silog"] == pytest.approx(np.sqrt(np.mean(e ** 2) - 0.5 * np.mean(e) ** 2))
    assert m["silog"] != pytest.approx(bts_silog / 100)
    # BTS/AdaBins compute_errors: the other eight agree
    thresh = np.maximum(gt / pred, pred / gt)
    assert m["d1"] == pytest.approx((thresh < 1.25).mean()) and m["rmse"] == pytest.approx(np.sqrt(((gt - pred) ** 2).mean()))
    bad = pred.copy()
    bad[0, 0], bad[0, 1] = np.inf, np.nan  # inf -> max depth, nan -> min depth (VPD)
    fixed = pred.copy()
    fixed[0, 0], fixed[0, 1] = 10.0, 1e-3
    assert depth_errors(bad, gt) == depth_errors(fixed, gt)
    gt10 = gt.copy()
    gt10[5, 5] = 10.0  # not < max depth: not scored
    assert depth_errors(pred, gt10)["rmse"] != depth_errors(pred, gt)["rmse"]


def test_the_eigen_crop_applies_to_nyu_sized_maps():
    gt = np.full((480, 640), 3.0)
    pred = np.full((480, 640), 3.0)
    pred[:45] = 9.0  # outside the crop: not scored
    assert depth_errors(pred, gt)["rmse"] == 0.0
    assert depth_errors(pred, gt, eigen_crop=False)["rmse"] > 0
    assert depth_errors(pred, np.zeros_like(gt)) is None
    assert mean_depth_metrics([{"rmse": 1.0, **dict.fromkeys(["d1", "d2", "d3", "abs_rel", "sq_rel", "rmse_log",
                                                                   "log10", "silog"], 0.0)}, None,
                               {"rmse": 3.0, **dict.fromkeys(["d1", "d2", "d3", "abs_rel", "sq_rel", "rmse_log",
                                                                   "log10", "silog"], 0.0)}])["rmse"] == 2.0


def test_referring_scores_by_hand():
    g1 = np.zeros((4, 4), bool)
    g1[:2] = True  # 8 pixels
    p1 = np.zeros((4, 4), bool)
    p1[:1] = True  # 4 of them: IoU 0.5
    g2 = np.zeros((4, 4), bool)
    g2[:, :1] = True  # 4 pixels
    p2 = g2.copy()  # IoU 1
    p3 = np.zeros((4, 4), bool)
    g3 = np.zeros((4, 4), bool)  # empty both: IoU 0 (U = 0), as LAVT/VPD
    s = referring_scores([p1, p2, p3], [g1, g2, g3])
    assert s["mIoU"] == pytest.approx(0.5)
    assert s["oIoU"] == pytest.approx((4 + 4) / (8 + 4))
    assert s["P@0.5"] == pytest.approx(2 / 3) and s["P@0.6"] == pytest.approx(1 / 3) and s["P@0.9"] == pytest.approx(1 / 3)
    assert s["pairs"] == 3
