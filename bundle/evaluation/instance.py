"""Per-image nucleus instance metrics (numpy): AJI, AJI+, panoptic quality (DQ, SQ, PQ) and detection F1.

All metrics take two (H, W) integer instance maps, ``pred`` first and ``gt`` second (MONAI's ``y_pred, y``
order), 0 = background; ids need not be consecutive. Every overlap comes from one contingency table
(:func:`contingency`, ``np.bincount`` of ``gt_index * P + pred_index``), never from per-pair mask loops.

Definitions:
- AJI (Kumar et al., IEEE TMI 2017; the MoNuSeg code): each GT nucleus G_i is matched to the prediction S_j with
  the largest IoU (a prediction may be used by several GT nuclei); C = sum |G_i & S_j|, U = sum |G_i | S_j|
  + area of GT nuclei that overlap nothing + area of predictions used by no GT nucleus; AJI = C / U.
- AJI+ (Graham et al., HoVer-Net, MedIA 2019): the same with a one-to-one pairing that maximises the summed IoU
  (Hungarian, ``scipy.optimize.linear_sum_assignment``), so a prediction that merges two nuclei is not counted
  twice in U.
- PQ (Kirillov et al., CVPR 2019): pairs with IoU > 0.5 (unique by construction); TP/FP/FN counts;
  DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the TP pairs (0 when TP = 0), PQ = DQ * SQ.
- Detection F1, ``mode="iou"`` (default): the same IoU > 0.5 pairs, so F1 = 2TP / (2TP + FP + FN) = DQ.
  ``mode="centroid"``: HoVer-Net's detection F1 (``compute_stats.py``, ``pair_coordinates``): Hungarian pairing
  of GT and predicted centroids by Euclidean distance, a pair counts when distance <= ``radius`` (12 px there).

Empty-image policy (``both_empty``): when both maps hold no nucleus every metric returns ``both_empty``
(default 1.0: "no nucleus" was predicted correctly, which rewards not hallucinating nuclei in empty tiles; pass
``float('nan')`` to drop such tiles from a ``np.nanmean``). When exactly one map is empty every metric is 0.
MONAI's ``PanopticQualityMetric`` returns 0 for both-empty (0 / (0 + 1e-6)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "Contingency",
    "PQResult",
    "contingency",
    "aji",
    "aji_plus",
    "panoptic_quality",
    "detection_f1",
    "instance_metrics",
]


@dataclass(frozen=True)
class Contingency:
    """Overlaps of the nuclei of two instance maps.

    ``inter[i, j]`` = pixels shared by GT nucleus ``gt_ids[i]`` and predicted nucleus ``pred_ids[j]``;
    ``gt_area`` / ``pred_area`` = pixel counts of each nucleus.
    """

    inter: np.ndarray  # (G, P) int64
    gt_area: np.ndarray  # (G,) int64
    pred_area: np.ndarray  # (P,) int64
    gt_ids: np.ndarray  # (G,)
    pred_ids: np.ndarray  # (P,)

    @property
    def union(self) -> np.ndarray:
        return self.gt_area[:, None] + self.pred_area[None, :] - self.inter

    @property
    def iou(self) -> np.ndarray:
        union = self.union
        return np.divide(self.inter, union, out=np.zeros(union.shape, np.float64), where=union > 0)


@dataclass(frozen=True)
class PQResult:
    dq: float
    sq: float
    pq: float
    tp: int
    fp: int
    fn: int


def _as_instance_map(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"instance metrics: {name} must be a 2D (H, W) instance map, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"instance metrics: {name} must hold integer instance ids, got non-integer floats")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind == "b":
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "ui":
        raise ValueError(f"instance metrics: {name} has unsupported dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"instance metrics: {name} has negative ids; use 0 for background and positive ids")
    if arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"instance metrics: {name} has ids above 2**63 - 1")
    return arr.astype(np.int64, copy=False)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, index)``: the nucleus ids present (sorted, background excluded) and each pixel's 0..K index
    (0 = background) - ``np.unique(..., return_inverse=True)`` semantics, via a lookup table when ids are small."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= 4 * flat.size + 1024:  # O(H*W) lookup instead of an O(H*W log) sort
        present = np.bincount(flat, minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, np.int64)
        lut[ids] = np.arange(1, len(ids) + 1)
        return ids, lut[flat]
    ids, inverse = np.unique(np.concatenate([[0], flat]), return_inverse=True)
    return ids[1:], inverse[1:]


def contingency(pred: np.ndarray, gt: np.ndarray) -> Contingency:
    """Contingency table of ``gt`` x ``pred`` nuclei from one ``np.bincount`` (background row/column dropped)."""
    pred = _as_instance_map(pred, "pred")
    gt = _as_instance_map(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"instance metrics: pred shape {pred.shape} differs from gt shape {gt.shape}")
    g_ids, g_idx = _compact(gt)
    p_ids, p_idx = _compact(pred)
    n_g, n_p = len(g_ids) + 1, len(p_ids) + 1
    table = np.bincount(g_idx * n_p + p_idx, minlength=n_g * n_p).reshape(n_g, n_p)
    return Contingency(
        inter=table[1:, 1:],
        gt_area=table[1:].sum(axis=1),
        pred_area=table[:, 1:].sum(axis=0),
        gt_ids=g_ids,
        pred_ids=p_ids,
    )


def _empty_value(t: Contingency, both_empty: float) -> float | None:
    n_g, n_p = len(t.gt_ids), len(t.pred_ids)
    if n_g == 0 and n_p == 0:
        return float(both_empty)
    if n_g == 0 or n_p == 0:
        return 0.0
    return None


def _aji_from_pairs(t: Contingency, gt_idx: np.ndarray, pred_idx: np.ndarray) -> float:
    """C / U for the given (gt, pred) pairs; unpaired GT and unused predictions go into U."""
    union = t.gt_area[gt_idx] + t.pred_area[pred_idx] - t.inter[gt_idx, pred_idx]
    c = float(t.inter[gt_idx, pred_idx].sum())
    gt_unpaired = np.ones(len(t.gt_ids), bool)
    gt_unpaired[gt_idx] = False
    pred_unused = np.ones(len(t.pred_ids), bool)
    pred_unused[pred_idx] = False
    u = float(union.sum() + t.gt_area[gt_unpaired].sum() + t.pred_area[pred_unused].sum())
    return c / u


def _aji(t: Contingency, both_empty: float) -> float:
    empty = _empty_value(t, both_empty)
    if empty is not None:
        return empty
    iou = t.iou
    best = iou.argmax(axis=1)  # ties -> lowest prediction id, as np.argmax in the MoNuSeg/HoVer-Net code
    gt_idx = np.flatnonzero(iou[np.arange(len(best)), best] > 0)
    return _aji_from_pairs(t, gt_idx, best[gt_idx])


def _aji_plus(t: Contingency, both_empty: float) -> float:
    empty = _empty_value(t, both_empty)
    if empty is not None:
        return empty
    iou = t.iou
    gt_idx, pred_idx = linear_sum_assignment(-iou)
    keep = iou[gt_idx, pred_idx] > 0
    return _aji_from_pairs(t, gt_idx[keep], pred_idx[keep])


def _pq(t: Contingency, iou_threshold: float, both_empty: float) -> PQResult:
    if not 0.0 < iou_threshold < 1.0:
        raise ValueError(f"panoptic_quality: iou_threshold must be in (0, 1), got {iou_threshold}")
    n_g, n_p = len(t.gt_ids), len(t.pred_ids)
    if n_g == 0 and n_p == 0:
        v = float(both_empty)
        return PQResult(v, v, v, 0, 0, 0)
    iou = t.iou
    if iou_threshold >= 0.5:
        ious = iou[iou > iou_threshold]  # IoU > 0.5 pairs are one-to-one by construction
    else:
        # IoU > t < 0.5 pairs are not unique: take the maximal one-to-one pairing (HoVer-Net / MONAI do the same)
        g, p = linear_sum_assignment(-iou)
        ious = iou[g, p][iou[g, p] > iou_threshold]
    tp = len(ious)
    fp, fn = n_p - tp, n_g - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ious.sum() / tp) if tp else 0.0
    return PQResult(dq=float(dq), sq=sq, pq=float(dq * sq), tp=tp, fp=fp, fn=fn)


def aji(pred: np.ndarray, gt: np.ndarray, both_empty: float = 1.0) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017): best-IoU match per GT nucleus, reuse allowed (module doc)."""
    return _aji(contingency(pred, gt), both_empty)


def aji_plus(pred: np.ndarray, gt: np.ndarray, both_empty: float = 1.0) -> float:
    """AJI+ (Graham et al. 2019): one-to-one pairing maximising the summed IoU, then C / U as AJI (module doc)."""
    return _aji_plus(contingency(pred, gt), both_empty)


def panoptic_quality(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5, both_empty: float = 1.0) -> PQResult:
    """Panoptic quality (Kirillov et al. 2019) with IoU > ``iou_threshold`` matching.

    Returns ``PQResult(dq, sq, pq, tp, fp, fn)``.
    """
    return _pq(contingency(pred, gt), iou_threshold, both_empty)


def _centroids(labels: np.ndarray) -> np.ndarray:
    """(K, 2) (row, col) centroids of the nuclei in id order, via bincount (= regionprops' ``centroid``)."""
    ids, idx = _compact(labels)
    rows, cols = np.indices(labels.shape)
    n = np.bincount(idx, minlength=len(ids) + 1)[1:]
    r = np.bincount(idx, weights=rows.ravel(), minlength=len(ids) + 1)[1:]
    c = np.bincount(idx, weights=cols.ravel(), minlength=len(ids) + 1)[1:]
    return np.stack([r / n, c / n], axis=1)


def detection_f1(
    pred: np.ndarray, gt: np.ndarray, mode: str = "iou", radius: float = 12.0, both_empty: float = 1.0
) -> float:
    """Detection F1 = 2TP / (2TP + FP + FN).

    ``mode="iou"``: TP = pairs with IoU > 0.5 (equals PQ's DQ). ``mode="centroid"``: TP = Hungarian pairs of
    centroids at Euclidean distance <= ``radius`` pixels (HoVer-Net's F1_d, radius 12 px at 40x).
    """
    if mode == "iou":
        return panoptic_quality(pred, gt, both_empty=both_empty).dq
    if mode != "centroid":
        raise ValueError(f"detection_f1: mode must be 'iou' or 'centroid', got {mode!r}")
    pred = _as_instance_map(pred, "pred")
    gt = _as_instance_map(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"instance metrics: pred shape {pred.shape} differs from gt shape {gt.shape}")
    cg, cp = _centroids(gt), _centroids(pred)
    if len(cg) == 0 and len(cp) == 0:
        return float(both_empty)
    if len(cg) == 0 or len(cp) == 0:
        return 0.0
    dist = np.sqrt(((cg[:, None, :] - cp[None, :, :]) ** 2).sum(-1))
    g, p = linear_sum_assignment(dist)
    tp = int((dist[g, p] <= radius).sum())
    return 2.0 * tp / (len(cg) + len(cp))


def instance_metrics(pred: np.ndarray, gt: np.ndarray, both_empty: float = 1.0) -> dict[str, float]:
    """All per-image instance metrics: aji, aji_plus, dq, sq, pq, f1_iou (= dq), f1_centroid (12 px)."""
    t = contingency(pred, gt)
    q = _pq(t, 0.5, both_empty)
    return {
        "aji": _aji(t, both_empty),
        "aji_plus": _aji_plus(t, both_empty),
        "dq": q.dq,
        "sq": q.sq,
        "pq": q.pq,
        "f1_iou": q.dq,
        "f1_centroid": detection_f1(pred, gt, mode="centroid", both_empty=both_empty),
    }
