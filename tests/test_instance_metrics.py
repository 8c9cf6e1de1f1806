"""Instance metrics: hand-worked cases, a naive per-pair reference, and MONAI's PanopticQualityMetric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import PanopticQualityMetric
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from bundle.data.io import read_label
from bundle.evaluation.instance import (
    aji,
    aji_plus,
    contingency,
    detection_f1,
    instance_metrics,
    panoptic_quality,
)


def grid(text: str) -> np.ndarray:
    """An instance map from rows of digits (0 = background)."""
    return np.array([[int(ch) for ch in row.strip()] for row in text.strip().splitlines()], dtype=np.int32)


# --- hand-worked cases ----------------------------------------------------------------------------------------
# A split nucleus: one 4x4 GT nucleus (16 px) predicted as a 4x3 part (12 px) and a 4x1 part (4 px).
SPLIT_GT = grid("1111\n1111\n1111\n1111")
SPLIT_PRED = grid("1112\n1112\n1112\n1112")
# A merged pair: GT nuclei of 12 px and 4 px predicted as one 16 px nucleus.
MERGE_GT = grid("1112\n1112\n1112\n1112")
MERGE_PRED = grid("1111\n1111\n1111\n1111")
# One prediction overlapping two nuclei (2 x 10 strip): g1 = cols 0-3 (8 px), g2 = cols 6-9 (8 px);
# p1 = col 0 (2 px), p2 = cols 1-6 (12 px: 6 px of g1, 4 px background, 2 px of g2), p3 = cols 7-9 (6 px).
BRIDGE_GT = grid("1111002222\n1111002222")
BRIDGE_PRED = grid("1222222333\n1222222333")


def test_split_nucleus_by_hand():
    # IoU(g, p1) = 12/16 = 0.75, IoU(g, p2) = 4/16 = 0.25.
    # AJI: g -> p1, C = 12, U = 16 (g | p1) + 4 (p2 unused) = 20 -> 0.6; AJI+ pairs the same -> 0.6.
    # PQ: TP = 1 (IoU 0.75), FP = 1 (p2), FN = 0: DQ = 1 / (1 + 0.5) = 2/3, SQ = 0.75, PQ = 0.5.
    assert aji(SPLIT_PRED, SPLIT_GT) == pytest.approx(0.6)
    assert aji_plus(SPLIT_PRED, SPLIT_GT) == pytest.approx(0.6)
    q = panoptic_quality(SPLIT_PRED, SPLIT_GT)
    assert (q.tp, q.fp, q.fn) == (1, 1, 0)
    assert (q.dq, q.sq, q.pq) == pytest.approx((2 / 3, 0.75, 0.5))
    assert detection_f1(SPLIT_PRED, SPLIT_GT) == pytest.approx(2 / 3)
    # centroids: g (1.5, 1.5), p1 (1.5, 1.0), p2 (1.5, 3.0): g pairs p1 at distance 0.5 -> F1 = 2*1 / (1 + 2)
    assert detection_f1(SPLIT_PRED, SPLIT_GT, mode="centroid", radius=12) == pytest.approx(2 / 3)
    assert detection_f1(SPLIT_PRED, SPLIT_GT, mode="centroid", radius=0.4) == 0.0


def test_merged_pair_by_hand_aji_double_counts_aji_plus_does_not():
    # IoU(g1, p) = 12/16 = 0.75, IoU(g2, p) = 4/16 = 0.25; both GT nuclei pick p in AJI.
    # AJI: C = 12 + 4 = 16, U = 16 + 16 = 32 (p's area counted twice) -> 0.5.
    # AJI+: only g1-p is paired: C = 12, U = 16 + 4 (g2 unpaired) = 20 -> 0.6.
    # PQ: TP = 1 (0.75), FP = 0, FN = 1: DQ = 2/3, SQ = 0.75, PQ = 0.5.
    assert aji(MERGE_PRED, MERGE_GT) == pytest.approx(0.5)
    assert aji_plus(MERGE_PRED, MERGE_GT) == pytest.approx(0.6)
    q = panoptic_quality(MERGE_PRED, MERGE_GT)
    assert (q.tp, q.fp, q.fn) == (1, 0, 1)
    assert (q.dq, q.sq, q.pq) == pytest.approx((2 / 3, 0.75, 0.5))


def test_one_prediction_overlapping_two_nuclei_by_hand():
    # IoU: g1-p1 = 2/8 = 0.25, g1-p2 = 6/(8+12-6) = 3/7, g2-p2 = 2/(8+12-2) = 1/9, g2-p3 = 6/8 = 0.75.
    # AJI: g1 -> p2 (3/7), g2 -> p3. C = 6 + 6 = 12, U = 14 + 8 + 2 (p1 unused) = 24 -> 0.5.
    # AJI+: the best one-to-one pairing is also {g1-p2, g2-p3} (3/7 + 0.75 > 0.25 + 0.75) -> 0.5.
    # PQ: only g2-p3 exceeds 0.5: TP = 1, FP = 2, FN = 1: DQ = 1 / (1 + 1 + 0.5) = 0.4, SQ = 0.75, PQ = 0.3.
    t = contingency(BRIDGE_PRED, BRIDGE_GT)
    np.testing.assert_array_equal(t.inter, [[2, 6, 0], [0, 2, 6]])
    np.testing.assert_allclose(t.iou, [[0.25, 3 / 7, 0], [0, 1 / 9, 0.75]])
    assert aji(BRIDGE_PRED, BRIDGE_GT) == pytest.approx(0.5)
    assert aji_plus(BRIDGE_PRED, BRIDGE_GT) == pytest.approx(0.5)
    q = panoptic_quality(BRIDGE_PRED, BRIDGE_GT)
    assert (q.tp, q.fp, q.fn) == (1, 2, 1)
    assert (q.dq, q.sq, q.pq) == pytest.approx((0.4, 0.75, 0.3))
    assert detection_f1(BRIDGE_PRED, BRIDGE_GT) == pytest.approx(0.4)


def test_perfect_match_with_other_ids_and_dtypes():
    gt = grid("1100220\n1100220\n0003300\n4003300")
    pred = np.where(gt > 0, gt * 7 + 40000, 0).astype(np.uint16)  # different, non-consecutive ids
    for name, value in instance_metrics(pred, gt).items():
        assert value == pytest.approx(1.0), name


def test_huge_ids_take_the_sorting_path_and_agree():
    gt = grid("1100220\n1100220\n0003300\n4003300")
    pred = grid("1110220\n1100200\n0033300\n0003300")
    huge = np.where(pred > 0, pred.astype(np.int64) + 2**40, 0)
    assert instance_metrics(huge, gt) == pytest.approx(instance_metrics(pred, gt))


def test_empty_policy():
    gt = grid("0110\n0110\n0000")
    empty = np.zeros_like(gt)
    for pred, truth in ((empty, gt), (gt, empty)):  # empty prediction, then empty GT: 0 for every metric
        for name, value in instance_metrics(pred, truth).items():
            assert value == 0.0, name
    # both empty: "nothing predicted where there is nothing" scores both_empty (default 1.0), or nan on request
    for name, value in instance_metrics(empty, empty).items():
        assert value == 1.0, name
    assert all(math.isnan(v) for v in instance_metrics(empty, empty, both_empty=float("nan")).values())


def test_bad_input_raises_value_error():
    gt = grid("0110\n0110")
    with pytest.raises(ValueError, match="shape"):
        aji(gt[:1], gt)
    with pytest.raises(ValueError, match="negative"):
        aji(-gt, gt)
    with pytest.raises(ValueError, match="integer"):
        aji(gt * 0.5, gt)
    with pytest.raises(ValueError, match="2D"):
        aji(np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match="mode"):
        detection_f1(gt, gt, mode="dice")


# --- independent references on real MoNuSeg instances ----------------------------------------------------------
def naive_pairs(pred, gt):
    """Per-pair boolean-mask loops (the MoNuSeg / HoVer-Net reference style): inter, union, areas."""
    g_ids, p_ids = [i for i in np.unique(gt) if i], [i for i in np.unique(pred) if i]
    inter = np.zeros((len(g_ids), len(p_ids)))
    union = np.zeros_like(inter)
    for a, g in enumerate(g_ids):
        gm = gt == g
        for b, p in enumerate(p_ids):
            pm = pred == p
            inter[a, b] = (gm & pm).sum()
            union[a, b] = (gm | pm).sum()
    return inter, union, np.array([(gt == g).sum() for g in g_ids]), np.array([(pred == p).sum() for p in p_ids])


def naive_aji(pred, gt, one_to_one: bool) -> float:
    inter, union, g_area, p_area = naive_pairs(pred, gt)
    iou = inter / union
    if one_to_one:
        rows, cols = linear_sum_assignment(-iou)
        pairs = [(r, c) for r, c in zip(rows, cols) if iou[r, c] > 0]
    else:
        pairs = [(r, int(np.argmax(iou[r]))) for r in range(len(g_area)) if iou[r].max() > 0]
    c = sum(inter[r, k] for r, k in pairs)
    u = sum(union[r, k] for r, k in pairs)
    used_g, used_p = {r for r, _ in pairs}, {k for _, k in pairs}
    u += sum(g_area[r] for r in range(len(g_area)) if r not in used_g)
    u += sum(p_area[k] for k in range(len(p_area)) if k not in used_p)
    return c / u


@pytest.fixture(scope="module")
def monuseg_crops(monuseg_dir):
    ids = sorted(p.stem for p in (monuseg_dir / "labels").glob("*.png"))[:2]
    return [read_label(monuseg_dir / "labels" / f"{i}.png", kind="instance")[:256, :256] for i in ids]


def perturbations(gt: np.ndarray, seed: int) -> list[np.ndarray]:
    """Realistic prediction errors: shifted, eroded subset, merged neighbours, split nuclei, dropped + false nuclei."""
    rng = np.random.default_rng(seed)
    ids = np.unique(gt)[1:]
    out = [np.roll(gt, (1, 2), axis=(0, 1))]
    eroded = gt.copy()
    for i in rng.choice(ids, len(ids) // 2, replace=False):
        m = gt == i
        eroded[m & ~ndimage.binary_erosion(m, iterations=2)] = 0
    out.append(eroded)
    merged = gt.copy()  # dilate every 3rd nucleus by 2 px into its neighbours' pixels, relabelled to one id
    for i in ids[::3]:
        grown = ndimage.binary_dilation(gt == i, iterations=2)
        touched = np.unique(gt[grown])
        merged[np.isin(gt, touched[touched > 0]) | grown] = i
    out.append(merged)
    split = gt.copy()
    for i in ids[::2]:
        rows, cols = np.nonzero(gt == i)
        right = cols > np.median(cols)
        split[rows[right], cols[right]] = 10000 + i
    out.append(split)
    dropped = np.where(np.isin(gt, rng.choice(ids, len(ids) // 4, replace=False)), 0, gt)
    dropped[5:15, 5:15] = 50000  # a false positive square (may overlap a nucleus)
    out.append(dropped)
    return out


def monai_pq(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float]:
    metric = PanopticQualityMetric(num_classes=1, metric_name=("pq", "sq", "rq"), reduction="mean_batch")

    def as_b2hw(inst):
        inst = torch.as_tensor(inst.astype(np.int64))
        return torch.stack([inst, (inst > 0).long()])[None]

    metric(as_b2hw(pred), as_b2hw(gt))
    pq, sq, rq = (float(v.reshape(-1)[0]) for v in metric.aggregate())
    return pq, sq, rq


@pytest.mark.parametrize("case", ["split", "merge", "bridge"])
def test_pq_equals_monai_on_hand_cases(case):
    pred, gt = {"split": (SPLIT_PRED, SPLIT_GT), "merge": (MERGE_PRED, MERGE_GT), "bridge": (BRIDGE_PRED, BRIDGE_GT)}[
        case
    ]
    q = panoptic_quality(pred, gt)
    assert (q.pq, q.sq, q.dq) == pytest.approx(monai_pq(pred, gt), abs=1e-5)  # MONAI adds 1e-6 to denominators


def test_metrics_match_naive_reference_and_monai_on_monuseg(monuseg_crops):
    checked = 0
    for k, gt in enumerate(monuseg_crops):
        for pred in perturbations(gt, seed=k):
            assert aji(pred, gt) == pytest.approx(naive_aji(pred, gt, one_to_one=False), rel=1e-12)
            assert aji_plus(pred, gt) == pytest.approx(naive_aji(pred, gt, one_to_one=True), rel=1e-12)
            q = panoptic_quality(pred, gt)
            assert (q.pq, q.sq, q.dq) == pytest.approx(monai_pq(pred, gt), abs=1e-5)
            assert 0.0 < q.pq < 1.0  # the perturbations are real errors
            checked += 1
    assert checked == 5 * len(monuseg_crops)


def test_merges_are_double_counted_by_aji_only(monuseg_crops):
    gt = monuseg_crops[0]
    merged = perturbations(gt, seed=0)[2]
    # every merged prediction is the best match of several GT nuclei: AJI counts its area once per nucleus
    assert aji(merged, gt) < aji_plus(merged, gt) < 1.0
