"""Evaluation metrics of paper §4.3 (eq. 28-31) on binary (N, C, H, W) masks.

Dice and IoU are MONAI's own metrics (``MeanDice``, ``MeanIoUHandler`` in the configs).
Boundary F1 (eq. 30) and the Hausdorff distance, which MONAI lacks or computes on the host one
sample at a time, are written here in batched torch on the tensors' device:

* :class:`BoundaryF1Metric` / :class:`BoundaryF1Handler`: Csurka et al. (BMVC 2013) boundary F1.
* :class:`HausdorffMetric` / :class:`HausdorffHandler`: equals
  ``monai.metrics.compute_hausdorff_distance`` (euclidean, unit spacing) value for value,
  including ``percentile`` and the empty-mask cases.

Both use one boundary definition, MONAI's (:func:`mask_boundary`), and one exact distance routine
(:func:`nearest_sq_distance`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from monai.handlers import ConfusionMatrix, IgniteMetricHandler
from monai.metrics import (
    CumulativeIterationMetric,
)
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric
from monai.metrics.utils import do_metric_reduction, ignore_background
from monai.utils import MetricReduction

__all__ = [
    "mask_boundary",
    "nearest_sq_distance",
    "BoundaryF1Metric",
    "HausdorffMetric",
    "BoundaryF1Handler",
    "HausdorffHandler",
    "PixelPrecisionHandler",
    "PixelRecallHandler",
    "MATLAB_BFSCORE_FRACTION",
]

#: MATLAB ``bfscore``'s default tolerance: 0.75 % of the image diagonal.
MATLAB_BFSCORE_FRACTION = 0.0075

# Upper bound on elements gathered at once by the distance search, to bound memory on large inputs.
_CHUNK_ELEMENTS = 1 << 22
# Distance search stages (speed only, results are exact): capped row pass exact below 2**_CAP_BITS pixels,
# column windows widened through _WIDER_WINDOWS for the few queries the first window does not settle.
_CAP_BITS = 7
_WIDER_WINDOWS = (32,)


def mask_boundary(mask: torch.Tensor, connectivity: int = 1) -> torch.Tensor:
    """Inner contour of a binary mask (..., H, W): foreground pixels with a background neighbour.

    ``connectivity=1`` (default) looks at the 4 edge neighbours, which gives a thin, 8-connected contour
    and is exactly MONAI's ``get_mask_edges`` (``mask ^ scipy.ndimage.binary_erosion(mask)``).
    ``connectivity=2`` looks at all 8 neighbours (a thicker, 4-connected contour). Pixels outside the
    image count as background, so a nucleus cut by the tile border has a contour along the border and
    every non-empty mask has a non-empty boundary.
    """
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 (4-neighbours) or 2 (8-neighbours), got {connectivity}")
    m = mask.bool()
    p = F.pad(m.to(torch.uint8), (1, 1, 1, 1)).bool()  # zero pad: outside the image is background
    interior = p[..., :-2, 1:-1] & p[..., 2:, 1:-1] & p[..., 1:-1, :-2] & p[..., 1:-1, 2:]
    if connectivity == 2:
        interior = interior & p[..., :-2, :-2] & p[..., :-2, 2:] & p[..., 2:, :-2] & p[..., 2:, 2:]
    return m & ~interior


def _row_distance(dst: torch.Tensor, bits: int) -> torch.Tensor:
    """Horizontal distance from each pixel of (G, H, W) to the nearest ``dst`` pixel of its row, capped.

    Exact where it is ``< 2**bits``; elsewhere ``2**bits`` (a lower bound, also for rows without ``dst``).
    ``bits`` symmetric doubling steps ``D(j) = min(D(j), D(j -+ s) + s)``, s = 1, 2, 4, ...: every offset
    below ``2**bits`` is a sum of distinct steps of one sign, so its cost is found exactly, and no path
    costs less than its displacement. Small integers in uint8 keep these dense passes cheap.
    """
    dtype = torch.uint8 if bits <= 7 else torch.int16  # values stay <= 2**bits + 2**(bits - 1)
    cap = 1 << bits
    d = (~dst).to(dtype) * cap
    s = 1
    while s < cap and s < dst.shape[-1]:
        left, right = d[..., :-s] + s, d[..., s:] + s  # both from the previous step's d
        torch.minimum(d[..., s:], left, out=d[..., s:])
        torch.minimum(d[..., :-s], right, out=d[..., :-s])
        s *= 2
    return d


def _row_exact_distance(dst: torch.Tensor) -> torch.Tensor:
    """Exact horizontal distance (float32) to the nearest ``dst`` pixel of each row of (G, H, W); inf if none."""
    w = dst.shape[-1]
    cols = torch.arange(w, device=dst.device, dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=dst.device)
    before = torch.where(dst, cols, -inf).cummax(dim=-1).values  # last feature column <= j
    after = torch.where(dst, cols, inf).flip(-1).cummin(dim=-1).values.flip(-1)  # first feature column >= j
    return torch.minimum(cols - before, after - cols)


def _column_search(
    row_dist: torch.Tensor, pad_value: float, group: torch.Tensor, i: torch.Tensor, j: torch.Tensor, window: int
) -> torch.Tensor:
    """``min over |t| <= window of t^2 + row_dist(i + t, j)^2`` (float32) for each query pixel.

    Rows outside the image read ``pad_value`` (at least the row-distance cap, so they never decide a result).
    Each query reads one strided row of ``2 window + 1`` values (a view, no index tensor per value);
    only the gathered values are squared, in int16/int32 while they are small integers.
    """
    _, h, w = row_dist.shape
    window = min(window, h - 1)
    flat = F.pad(row_dist, (0, 0, window, window), value=pad_value).reshape(-1)
    columns = flat.as_strided((flat.numel() - 2 * window * w, 2 * window + 1), (1, w))  # row p: p, p + w, ...
    start = (group * (h + 2 * window) + i) * w + j  # pixel (i - window, j) of the padded image
    if row_dist.is_floating_point():
        dtype = torch.float32
    else:
        dtype = torch.int16 if pad_value**2 + window**2 < 1 << 15 else torch.int32
    step = torch.arange(-window, window + 1, device=row_dist.device).pow(2).to(dtype)
    out = torch.empty(group.shape[0], device=row_dist.device, dtype=dtype)
    chunk = max(1, _CHUNK_ELEMENTS // step.numel())
    for a in range(0, group.shape[0], chunk):
        v = columns[start[a : a + chunk]].to(dtype)
        out[a : a + chunk] = (v * v + step).amin(dim=1)
    return out.float()


def nearest_sq_distance(
    src: torch.Tensor, dst: torch.Tensor, window: int = 8, max_sq: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared Euclidean distance from every ``src`` pixel to the nearest ``dst`` pixel of the same image.

    ``src`` and ``dst`` are bool (G, H, W). Returns ``(group, sq_dist)`` for the ``src`` pixels in
    ``src.nonzero()`` order: the image index of each and its squared distance (float32, ``inf`` when that
    image's ``dst`` is empty). With ``max_sq`` the caller only asks whether ``sq_dist <= max_sq``: that test
    is exact, values above ``max_sq`` are lower bounds.

    Written here rather than with ``scipy.ndimage.distance_transform_edt`` (host only) or ``torch.cdist``
    (quadratic in boundary pixels): the separable exact EDT (Meijster et al. 2000) evaluated at the query
    pixels only, in stages because nearly all boundary distances are a few pixels. A row pass gives each
    pixel's horizontal distance ``D`` to ``dst``, exact below a cap of 128 px (:func:`_row_distance`); the
    column pass ``r = min_t t^2 + D(i + t, j)^2`` over ``|t| <= window`` is exact wherever
    ``r <= (window + 1)^2`` (rows farther away cost more) and ``r < cap^2`` (it came from an exact ``D``).
    The few other queries are searched again over 32, then 127 rows, and those whose nearest target is
    128 px or more away over whole columns of an uncapped row pass. A host sync (``nonzero``) per stage,
    none per image. ``window`` only trades speed; results do not depend on it.
    """
    if src.shape != dst.shape or src.ndim != 3:
        raise ValueError(f"src and dst must be (G, H, W) of one shape, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if max(src.shape[-2:]) >= 1 << 14:
        raise ValueError(f"images up to 16383 pixels a side are supported, got {tuple(src.shape[-2:])}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    dst = dst.bool()
    idx = src.nonzero()  # host sync: the number of query pixels
    group, i, j = idx.unbind(1)
    if max_sq is not None:
        # Only "within sqrt(max_sq)?" is asked: one window that wide, over row distances exact that far, decides.
        window = math.isqrt(int(max_sq))
        bits = max(1, window.bit_length())
        return group, _column_search(_row_distance(dst, bits), 1 << bits, group, i, j, window)
    bits = max(_CAP_BITS, window.bit_length())
    cap = 1 << bits
    row_dist = _row_distance(dst, bits)
    has_dst = _any_per_image(dst)[group]
    sq = _column_search(row_dist, cap, group, i, j, window)
    # A windowed result r is exact when nothing outside the window can beat it, r <= (window + 1)^2, and it
    # comes from an exact (below the cap) row distance, r < cap^2. Widen the window for the other queries ...

    def settled(win: int) -> int:
        return min((win + 1) ** 2, cap * cap - 1)

    redo = ((sq > settled(window)) & has_dst).nonzero().squeeze(1)
    for wide in [w for w in _WIDER_WINDOWS if window < w < cap] + [cap - 1]:
        if not redo.numel():
            break
        sq[redo] = _column_search(row_dist, cap, group[redo], i[redo], j[redo], wide)
        redo = redo[sq[redo] > settled(wide)]
    # ... and for a nearest target ``cap`` or more away, the uncapped row pass and whole columns.
    if redo.numel():
        images, local = torch.unique(group[redo], return_inverse=True)  # only the images that need it
        exact = _row_exact_distance(dst[images])
        sq[redo] = _column_search(exact, float("inf"), local, i[redo], j[redo], src.shape[-2])
    return group, torch.where(has_dst, sq, float("inf"))


def _any_per_image(x: torch.Tensor) -> torch.Tensor:
    """``x.flatten(1).any(1)`` for bool x, via a uint8 max (several times faster on CPU)."""
    return x.reshape(x.shape[0], -1).view(torch.uint8).amax(dim=1).bool()


def _binary(x: torch.Tensor, name: str) -> torch.Tensor:
    x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor: skip meta tracking in the maths
    if x.ndim != 4:
        raise ValueError(f"{name} must be a batch-first 2-D mask (N, C, H, W), got shape {tuple(x.shape)}")
    return x.bool() if x.dtype == torch.bool else x > 0.5


def _prepare(y_pred: torch.Tensor, y: torch.Tensor, include_background: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate, drop the background channel like MONAI, binarise, and fold channels into the batch."""
    if y is None:
        raise ValueError("y (the ground truth) is required")
    if include_background is False:
        y_pred, y = ignore_background(y_pred=y_pred, y=y)
    if y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
    p, g = _binary(y_pred, "y_pred"), _binary(y, "y")
    return p.flatten(0, 1), g.flatten(0, 1)


class _ReducedMetric(CumulativeIterationMetric):
    """Per-(sample, channel) values buffered for exact DDP gathering, reduced with MONAI's nan-aware reduction."""

    def __init__(self, reduction: MetricReduction | str, get_not_nans: bool) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def _compute_list(self, y_pred, y=None, **kwargs: Any):  # type: ignore[override]
        """Lists of channel-first tensors (decollated batches in MONAI workflows) are stacked and computed at once."""
        if y is not None and len(y_pred) == len(y) > 0 and len({tuple(t.shape) for t in [*y_pred, *y]}) == 1:
            stacked = torch.stack([p.detach() for p in y_pred]), torch.stack([t.detach() for t in y])
            return self._compute_tensor(*stacked, **kwargs)
        return super()._compute_list(y_pred, y, **kwargs)

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered (N, C) values over all iterations (and ranks); nan entries are skipped."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__}.aggregate() called before any values were computed")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class BoundaryF1Metric(_ReducedMetric):
    """Boundary F1 score (paper eq. 30; Csurka et al., BMVC 2013) per sample and channel.

    Boundaries are :func:`mask_boundary` contours (``connectivity=1``: foreground pixels with a background
    4-neighbour, pixels outside the image counting as background; the same edges MONAI's Hausdorff distance
    uses). Boundary precision is the share of predicted boundary pixels within ``θ`` (Euclidean, ``<= θ``)
    of a ground-truth boundary pixel, recall the converse, and BF1 their harmonic mean (0 when both are 0).

    Args:
        tolerance: ``θ`` in pixels. Default: 2 pixels when neither ``tolerance`` nor ``tolerance_fraction`` is given.
        tolerance_fraction: ``θ`` as a fraction of the image diagonal instead, e.g. :data:`MATLAB_BFSCORE_FRACTION`
            (0.0075, MATLAB ``bfscore``'s default). Give at most one of the two.
        connectivity: 1 (4-neighbours, default) or 2 (8-neighbours) for the boundary definition.
        include_background: as in MONAI's ``DiceMetric``: ``False`` drops channel 0 when there are several.
        ignore_empty: the empty-mask policy, the same as MONAI ``DiceMetric``'s ``ignore_empty``: with ``True``
            (default) an empty ground truth gives ``nan`` (skipped by ``aggregate``); with ``False`` it gives 1
            when the prediction is empty too, else 0. An empty prediction with a non-empty ground truth gives 0.
        reduction, get_not_nans: as in MONAI's metrics (``do_metric_reduction``).

    Inputs are binary (N, C, H, W) tensors (values > 0.5 are foreground); the output is (N, C) float32
    on their device, computed batched with one host sync per call.
    """

    def __init__(
        self,
        tolerance: float | None = None,
        tolerance_fraction: float | None = None,
        connectivity: int = 1,
        include_background: bool = True,
        ignore_empty: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction, get_not_nans)
        if tolerance is not None and tolerance_fraction is not None:
            raise ValueError(
                "give BoundaryF1Metric either tolerance (pixels) or tolerance_fraction (of the diagonal), not both"
            )
        if tolerance is None and tolerance_fraction is None:
            tolerance = 2.0
        value = tolerance if tolerance is not None else tolerance_fraction
        if not value >= 0:
            raise ValueError(f"the boundary tolerance must be >= 0, got {value}")
        if connectivity not in (1, 2):
            raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
        self.tolerance = tolerance
        self.tolerance_fraction = tolerance_fraction
        self.connectivity = connectivity
        self.include_background = include_background
        self.ignore_empty = ignore_empty

    def tolerance_for(self, height: int, width: int) -> float:
        """``θ`` in pixels for an image of this size."""
        if self.tolerance is not None:
            return float(self.tolerance)
        return float(self.tolerance_fraction) * math.hypot(height, width)

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        n_c = (y_pred.shape[0], y_pred.shape[1] - (1 if not self.include_background and y_pred.shape[1] > 1 else 0))
        p, g = _prepare(y_pred, y, self.include_background)
        k, h, w = p.shape
        theta = self.tolerance_for(h, w)
        max_sq = math.floor(theta * theta)  # squared distances are integers
        bp, bg = mask_boundary(p, self.connectivity), mask_boundary(g, self.connectivity)
        # Both directions in one pass: images 0..k-1 query predicted boundaries, k..2k-1 ground-truth ones.
        group, sq = nearest_sq_distance(torch.cat([bp, bg]), torch.cat([bg, bp]), max_sq=max_sq)
        hits = torch.zeros(2 * k, device=p.device, dtype=torch.float32).index_add_(0, group, (sq <= max_sq).float())
        counts = torch.bincount(group, minlength=2 * k).float()  # boundary pixels per image
        n_pred, n_gt = counts[:k], counts[k:]
        precision = torch.where(n_pred > 0, hits[:k] / n_pred.clamp(min=1), 0.0)
        recall = torch.where(n_gt > 0, hits[k:] / n_gt.clamp(min=1), 0.0)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), 0.0)
        empty_gt = n_gt == 0
        if self.ignore_empty:
            f1 = torch.where(empty_gt, float("nan"), f1)
        else:
            f1 = torch.where(empty_gt, (n_pred == 0).float(), f1)
        return f1.reshape(n_c)


class HausdorffMetric(_ReducedMetric):
    """Hausdorff distance (maximum, or a percentile) between the boundaries of two binary masks.

    Defaults give exactly ``monai.metrics.compute_hausdorff_distance(y_pred, y)`` (euclidean, unit spacing):
    the point sets are the :func:`mask_boundary` edges of each mask; each directed distance set holds, for
    every edge pixel of one mask, the distance to the nearest edge pixel of the other; with ``percentile``
    the percentile is taken per direction (``torch.quantile``, linear interpolation) and then the larger of
    the two directions is kept, as MONAI does.

    Empty masks (MONAI 1.6.1's values, warned about once per call when ``warn_empty``):

    * both empty: ``nan`` (skipped by ``aggregate``);
    * only one empty: ``inf`` for the maximum (so a mean over such samples is ``inf``), and ``nan`` with a
      ``percentile`` (MONAI's ``torch.quantile`` over all-infinite distances gives ``nan``).

    Args:
        percentile: ``None`` for the maximum, else a value in (0, 100], e.g. 95 for HD95.
        directed: only the distances from the prediction's edges to the ground truth's.
        include_background: as in MONAI's ``HausdorffDistanceMetric`` (default ``False``: channel 0 is dropped
            when there are several channels; a single channel is kept).
        reduction, get_not_nans: as in MONAI's metrics.
        warn_empty: warn when a call meets empty masks.

    Inputs are binary (N, C, H, W) tensors (values > 0.5 are foreground); the output is (N, C) float32 in
    pixels on their device, computed batched with a few host syncs per call (none per sample).
    """

    def __init__(
        self,
        percentile: float | None = None,
        directed: bool = False,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        warn_empty: bool = True,
    ) -> None:
        super().__init__(reduction, get_not_nans)
        if percentile is not None and not 0 < percentile <= 100:
            raise ValueError(f"percentile must be None (maximum) or in (0, 100], got {percentile}")
        self.percentile = percentile
        self.directed = directed
        self.include_background = include_background
        self.warn_empty = warn_empty

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        if kwargs.get("spacing") is not None:
            raise ValueError(
                "HausdorffMetric works in pixels; spacing is not supported (use MONAI's HausdorffDistanceMetric)"
            )
        n_c = (y_pred.shape[0], y_pred.shape[1] - (1 if not self.include_background and y_pred.shape[1] > 1 else 0))
        p, g = _prepare(y_pred, y, self.include_background)
        k = p.shape[0]
        bp, bg = mask_boundary(p), mask_boundary(g)
        src, dst = (bp, bg) if self.directed else (torch.cat([bp, bg]), torch.cat([bg, bp]))
        group, sq = nearest_sq_distance(src, dst)
        # sqrt in float64 then rounded, as MONAI's KD-tree distances are, so the values match bit for bit
        per_dir = _group_reduce(group, sq.double().sqrt().float(), src.shape[0], self.percentile)
        hd = per_dir if self.directed else torch.maximum(per_dir[:k], per_dir[k:])
        # Empty masks: the values MONAI 1.6.1 gives (see the class docstring).
        has_p, has_g = _any_per_image(p), _any_per_image(g)
        one_empty = torch.tensor(float("inf") if self.percentile is None else float("nan"), device=hd.device)
        hd = torch.where(has_p & has_g, hd, torch.where(has_p | has_g, one_empty, float("nan")))
        if self.warn_empty:
            n_empty_p, n_empty_g = torch.stack([(~has_p).sum(), (~has_g).sum()]).tolist()
            if n_empty_p or n_empty_g:
                warnings.warn(
                    f"HausdorffMetric: {n_empty_g} of {k} ground-truth masks and {n_empty_p} of {k} predictions are "
                    "empty; their distance is nan (both empty) or inf/nan (one empty), as in MONAI.",
                    stacklevel=3,
                )
        return hd.reshape(n_c)


def _group_reduce(group: torch.Tensor, values: torch.Tensor, n_groups: int, percentile: float | None) -> torch.Tensor:
    """Per-group maximum, or percentile computed like ``torch.quantile`` (linear); ``nan`` for empty groups.

    ``group`` must be sorted (``nonzero`` order). Groups are padded into one (n_groups, max_count) matrix so
    every group is sorted and interpolated at once.
    """
    counts = torch.bincount(group, minlength=n_groups)
    if percentile is None:
        out = torch.full((n_groups,), float("-inf"), device=values.device, dtype=values.dtype)
        out = out.scatter_reduce(0, group, values, reduce="amax")
        return torch.where(counts > 0, out, float("nan"))
    width = max(int(counts.max().item()), 1) if n_groups else 1
    pos = torch.arange(group.numel(), device=group.device) - (counts.cumsum(0) - counts)[group]
    mat = torch.full((n_groups, width), float("inf"), device=values.device, dtype=values.dtype)
    mat[group, pos] = values
    mat = mat.sort(dim=1).values
    # torch.quantile (CPU, float32, as MONAI calls it), reproduced to the bit (checked empirically): rank =
    # float32(q) * (n - 1) in float64, then lerp between the neighbouring order statistics with the difference
    # rounded to float32 and a fused multiply-add, emulated in float64.
    q = float(torch.tensor(percentile / 100, dtype=torch.float32))
    ranks = q * (counts - 1).clamp(min=0).double()
    below, above = ranks.floor().long(), ranks.ceil().long()
    weight = ranks - below
    lo = mat.gather(1, below[:, None]).squeeze(1)
    hi = mat.gather(1, above[:, None]).squeeze(1)
    diff = (hi - lo).double()
    out = torch.where(weight < 0.5, lo.double() + weight * diff, hi.double() - diff * (1 - weight)).to(values.dtype)
    return torch.where(counts > 0, out, float("nan"))


class BoundaryF1Handler(IgniteMetricHandler):
    """Ignite handler for :class:`BoundaryF1Metric` (mean over samples and iterations, gathered across ranks).

    Configs: ``{"_target_": "bundle.evaluation.pixel.BoundaryF1Handler", "output_transform": ...}``; the other arguments
    are :class:`BoundaryF1Metric`'s.
    """

    def __init__(
        self,
        tolerance: float | None = None,
        tolerance_fraction: float | None = None,
        connectivity: int = 1,
        include_background: bool = True,
        ignore_empty: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = BoundaryF1Metric(
            tolerance=tolerance,
            tolerance_fraction=tolerance_fraction,
            connectivity=connectivity,
            include_background=include_background,
            ignore_empty=ignore_empty,
            reduction=reduction,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class HausdorffHandler(IgniteMetricHandler):
    """Ignite handler for :class:`HausdorffMetric` (e.g. ``percentile=95`` for HD95), gathered across ranks.

    Configs: ``{"_target_": "bundle.evaluation.pixel.HausdorffHandler", "percentile": 95, "output_transform": ...}``.
    """

    def __init__(
        self,
        percentile: float | None = None,
        directed: bool = False,
        include_background: bool = False,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        warn_empty: bool = True,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric_fn = HausdorffMetric(
            percentile=percentile,
            directed=directed,
            include_background=include_background,
            reduction=reduction,
            warn_empty=warn_empty,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class _PerImageConfusionMetric(ConfusionMatrix):
    """MONAI's ``ConfusionMatrix`` handler whose saved details are the per-image metric values (N, C), not the
    raw (N, C, 4) confusion matrices, so per-image tables (``bundle.handlers.tables.MetricsTableWriter``) read them like
    every other metric's details."""

    def completed(self, engine: Any, name: str) -> None:
        super().completed(engine, name)
        if self.save_details:
            cm = engine.state.metric_details[name]
            engine.state.metric_details[name] = compute_confusion_matrix_metric(self.metric_fn.metric_name[0], cm)


class PixelPrecisionHandler(_PerImageConfusionMetric):
    """Ignite handler for pixel precision ``TP / (TP + FP)`` (eq. 31): MONAI ``ConfusionMatrix`` on binary masks.

    ``compute_sample=True`` (default) averages per-image precision (an image with an empty prediction gives nan and
    is skipped, MONAI's policy); ``False`` pools the pixels of all images first.
    """

    def __init__(
        self,
        compute_sample: bool = True,
        include_background: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            include_background=include_background,
            metric_name="precision",
            compute_sample=compute_sample,
            reduction=reduction,
            output_transform=output_transform,
            save_details=save_details,
        )


class PixelRecallHandler(_PerImageConfusionMetric):
    """Ignite handler for pixel recall ``TP / (TP + FN)`` (eq. 31); see :class:`PixelPrecisionHandler`.

    Per image (default), an empty ground truth gives nan and is skipped.
    """

    def __init__(
        self,
        compute_sample: bool = True,
        include_background: bool = True,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        super().__init__(
            include_background=include_background,
            metric_name="recall",
            compute_sample=compute_sample,
            reduction=reduction,
            output_transform=output_transform,
            save_details=save_details,
        )


