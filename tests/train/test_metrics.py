"""Metrics against hand-worked examples (arithmetic in the comments) and a brute-force retrieval loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vermouth_cache.core.errors import VermouthError
from vermouth_cache.train.metrics import confusion_matrix, miou, per_class_accuracy, retrieval_metrics, top1


# ---- classification -------------------------------------------------------------------------


def test_top1_from_ids_and_from_scores():
    # 3 of 4 correct (the third sample predicts 2, truth 1) -> 3/4
    assert top1([0, 1, 2, 1], [0, 1, 1, 1]) == 0.75
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    assert top1(scores, torch.tensor([0, 1, 1, 1])) == 0.75


def test_per_class_accuracy_with_absent_class():
    y = [0, 0, 1, 1, 1, 3]
    pred = [0, 1, 1, 1, 0, 2]
    # class 0: 1 of 2 -> 0.5; class 1: 2 of 3; class 2: not in y -> None; class 3: 0 of 1
    assert per_class_accuracy(pred, y, 4) == pytest.approx([0.5, 2 / 3, None, 0.0])


def test_classification_validation():
    with pytest.raises(VermouthError):
        top1([0, 1], [0, 1, 1])
    with pytest.raises(VermouthError):
        top1([], [])
    with pytest.raises(VermouthError):
        per_class_accuracy([0, 4], [0, 1], 4)


# ---- retrieval: hand-worked -------------------------------------------------------------------


def test_ap_one_query_relevant_at_ranks_1_and_3():
    sim = [[0.7, 0.9, 0.5, 0.8, 0.6]]
    gallery = [1, 1, 0, 0, 0]
    # ranking: g1 (rel), g3, g0 (rel), g4, g2 -> relevant at ranks 1 and 3
    m = retrieval_metrics(sim, [1], gallery, ks=(2, 3))
    assert m["mAP@all"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # 5/6
    assert m["mAP@2"] == pytest.approx(1 / 1)  # top 2 holds one relevant item, at rank 1
    assert m["mAP@3"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # both relevant items in the top 3
    assert m["P@2"] == pytest.approx(1 / 2)
    assert m["P@3"] == pytest.approx(2 / 3)
    assert m["n_queries"] == 1 and m["n_queries_without_relevant"] == 0


def test_map_at_k_normalised_by_relevant_retrieved_in_top_k():
    sim = [[0.9, 0.8, 0.7, 0.6, 0.5]]
    gallery = [0, 1, 0, 1, 1]
    # relevant at ranks 2, 4, 5 (3 in all)
    m = retrieval_metrics(sim, [1], gallery, ks=(2, 1))
    assert m["mAP@all"] == pytest.approx((1 / 2 + 2 / 4 + 3 / 5) / 3)  # 0.5333...
    # top 2 holds one relevant item (rank 2): (1/2) / 1, not (1/2) / min(2, 3) as SAKE's code would give
    assert m["mAP@2"] == pytest.approx(0.5)
    assert m["mAP@1"] == 0.0  # no relevant item in the top 1 -> AP@1 = 0, still counted in the mean
    assert m["P@2"] == pytest.approx(1 / 2)


def test_mean_over_queries_and_query_without_relevant_items():
    sim = [
        [0.7, 0.9, 0.5, 0.8, 0.6],  # label 1: relevant at ranks 1, 3 -> AP 5/6, P@2 1/2
        [0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: g4, g3, g2 relevant at ranks 1, 2, 3 -> AP 1, P@2 1
        [0.5, 0.4, 0.3, 0.2, 0.1],  # label 7: nothing in the gallery -> left out, counted
    ]
    m = retrieval_metrics(sim, [1, 0, 7], [1, 1, 0, 0, 0], ks=(2,))
    assert m["mAP@all"] == pytest.approx((5 / 6 + 1) / 2)  # 11/12
    assert m["P@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["mAP@2"] == pytest.approx((1 + 1) / 2)
    assert m["n_queries"] == 2 and m["n_queries_without_relevant"] == 1


def test_ties_are_pessimistic_and_gallery_order_free():
    sim = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    gallery = np.array([1, 0, 0, 1, 1])
    # g1 (0.9, irrelevant) first; tie at 0.5 {g0 rel, g2 irr, g3 rel}: the irrelevant g2 takes rank 2,
    # g0 and g3 ranks 3 and 4; g4 (0.1, rel) rank 5 -> relevant at ranks 3, 4, 5
    expected = {
        "mAP@all": (1 / 3 + 2 / 4 + 3 / 5) / 3,  # 43/90
        "mAP@3": (1 / 3) / 1,  # one relevant item in the top 3, at rank 3
        "P@2": 0 / 2,  # an arbitrary tie order could put g0 or g3 at rank 2 and give 1/2
        "P@3": 1 / 3,
    }
    rng = np.random.default_rng(0)
    for _ in range(20):
        perm = rng.permutation(5)
        m = retrieval_metrics(sim[:, perm], [1], gallery[perm], ks=(2, 3))
        for key, value in expected.items():
            assert m[key] == pytest.approx(value), key


def test_retrieval_accepts_tensors_and_small_gallery():
    sim = torch.tensor([[0.7, 0.9, 0.5, 0.8, 0.6]], dtype=torch.float16)
    m = retrieval_metrics(sim, torch.tensor([1]), torch.tensor([1, 1, 0, 0, 0]))
    # k = 100, 200 > G = 5: the top k is the whole gallery, P@k = 2 relevant / 5
    assert m["mAP@100"] == m["mAP@200"] == pytest.approx(5 / 6)
    assert m["P@100"] == pytest.approx(2 / 5)


def test_retrieval_validation():
    good = np.zeros((2, 3))
    with pytest.raises(VermouthError):
        retrieval_metrics(np.zeros(3), [0], [0, 0, 0])
    with pytest.raises(VermouthError):
        retrieval_metrics(good, [0], [0, 0, 0])
    with pytest.raises(VermouthError):
        retrieval_metrics(good, [0, 0], [0, 0])
    with pytest.raises(VermouthError):
        retrieval_metrics(np.full((2, 3), np.nan), [0, 0], [0, 0, 0])
    with pytest.raises(VermouthError):
        retrieval_metrics(good, [0, 0], [0, 0, 0], ks=(0,))
    with pytest.raises(VermouthError, match="relevant"):
        retrieval_metrics(good, [5, 6], [0, 0, 0])


# ---- retrieval: brute force -------------------------------------------------------------------


def _brute_force(sim, ql, gl, ks):
    """The definitions, literally: rank by (-score, relevant) so ties put irrelevant items first."""
    aps, ap_k, p_k = [], {k: [] for k in ks}, {k: [] for k in ks}
    skipped = 0
    for q in range(sim.shape[0]):
        rel = [int(gl[j] == ql[q]) for j in range(sim.shape[1])]
        ranked = [rel[j] for j in sorted(range(len(rel)), key=lambda j: (-sim[q, j], rel[j]))]
        if sum(ranked) == 0:
            skipped += 1
            continue
        precs = [sum(ranked[: i + 1]) / (i + 1) for i in range(len(ranked)) if ranked[i]]
        aps.append(sum(precs) / len(precs))
        for k in ks:
            top = ranked[:k]
            pk = [sum(top[: i + 1]) / (i + 1) for i in range(len(top)) if top[i]]
            ap_k[k].append(sum(pk) / len(pk) if pk else 0.0)
            p_k[k].append(sum(top) / len(top))
    out = {"mAP@all": np.mean(aps), "n_queries_without_relevant": skipped}
    for k in ks:
        out[f"mAP@{k}"] = np.mean(ap_k[k])
        out[f"P@{k}"] = np.mean(p_k[k])
    return out


@pytest.mark.parametrize("levels", [None, 4])  # continuous scores, and scores on 4 levels (many ties)
def test_retrieval_matches_brute_force(levels, monkeypatch):
    rng = np.random.default_rng(1 if levels is None else 2)
    q, g, ks = 7, 50, (1, 5, 10, 100)
    sim = rng.standard_normal((q, g))
    if levels is not None:
        sim = rng.integers(0, levels, (q, g)).astype(np.float32)
    ql = rng.integers(0, 6, q)
    ql[-1] = 9  # no gallery item has label 9
    gl = rng.integers(0, 6, g)
    expected = _brute_force(sim, ql, gl, ks)
    # chunks of 2 queries, so the chunk loop and a ragged last chunk are exercised
    monkeypatch.setattr("vermouth_cache.train.metrics._CHUNK_ELEMENTS", 2 * g)
    got = retrieval_metrics(sim, ql, gl, ks=ks)
    assert got["n_queries_without_relevant"] == expected["n_queries_without_relevant"] == 1
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# ---- segmentation -----------------------------------------------------------------------------

TARGET = np.array([[0, 0, 1, 255], [1, 1, 255, 0], [0, 0, 0, 1]])
PRED = np.array([[0, 1, 1, 3], [1, 2, 3, 0], [0, 0, 0, 0]])
# counted (target, pred) pairs, the two 255 pixels skipped:
#   row 0: (0,0) (0,1) (1,1)   row 1: (1,1) (1,2) (0,0)   row 2: (0,0) (0,0) (0,0) (1,0)
CONF = [[5, 1, 0, 0], [1, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix_skips_ignored_pixels_and_accumulates():
    conf = confusion_matrix(PRED, TARGET, 4)
    assert conf.dtype == np.int64
    assert conf.tolist() == CONF
    split = confusion_matrix(PRED[:1], TARGET[:1], 4) + confusion_matrix(torch.from_numpy(PRED[1:]), TARGET[1:], 4)
    assert split.tolist() == CONF


def test_miou_with_absent_class():
    m = miou(confusion_matrix(PRED, TARGET, 4))
    # IoU_c = tp / (row + col - tp)
    # class 0: 5 / (6 + 6 - 5) = 5/7; class 1: 2 / (4 + 3 - 2) = 2/5
    # class 2: predicted once, never in the target -> 0 / (0 + 1 - 0) = 0, counted
    # class 3: predicted only on ignored pixels -> union 0 -> NaN, left out (None)
    assert m["per_class_IoU"] == pytest.approx([5 / 7, 2 / 5, 0.0, None])
    assert m["mIoU"] == pytest.approx((5 / 7 + 2 / 5 + 0) / 3)  # 13/35
    assert m["pixel_acc"] == pytest.approx(7 / 10)  # (5 + 2) correct of 10 counted
    assert m["mAcc"] == pytest.approx((5 / 6 + 2 / 4) / 2)  # classes 2 and 3 have no target pixels


def test_segmentation_validation():
    with pytest.raises(VermouthError):
        confusion_matrix(PRED[:2], TARGET, 4)  # shape mismatch
    with pytest.raises(VermouthError):
        confusion_matrix(PRED, TARGET, 3)  # prediction 3 outside 0..2
    with pytest.raises(VermouthError):
        confusion_matrix(np.where(PRED == 2, -1, PRED), TARGET, 4)
    with pytest.raises(VermouthError):
        confusion_matrix(PRED, np.where(TARGET == 255, 7, TARGET), 4)  # target 7, not ignored
    with pytest.raises(VermouthError):
        confusion_matrix(PRED.astype(np.float32), TARGET, 4)
    with pytest.raises(VermouthError):
        miou(np.zeros((3, 4)))
    with pytest.raises(VermouthError):
        miou(np.zeros((3, 3)))
