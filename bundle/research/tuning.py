"""Watershed parameters tuned on validation tiles only.

The items are what inference sees: a trained network's region and boundary maps at model scale (the chunk engine,
:func:`bundle.inference.chunks.predict_chunks`) on tiles it was neither trained nor tested on, next to the true instance
maps at native size; nuclei are scored at native size after the model-scale watershed (``post_scale="model"``,
:func:`score_watershed`). The search is two grids in turn, thresholds then sizes, each the full
product (:func:`tune_watershed`), so 58 settings rather than the ~700 of one joint grid.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bundle.data.io import read_image, read_label
from bundle.data.scale import scale_factor
from bundle.evaluation.instance import aji, aji_plus, panoptic_quality
from bundle.inference.chunks import maps_to_native, model_size, predict_chunks
from bundle.inference.colour import image_statistics
from bundle.inference.sources import ArraySource
from bundle.nuclei.watershed import (
    WatershedParams,
    instances_from_maps,
    upsample_labels,
)

__all__ = ["DEFAULT_GRID", "score_watershed", "tune_watershed", "THRESHOLD_GRID", "SIZE_GRID", "model_scale_maps", "validation_items", "native_items", "scaled_grid",
           "tune_in_stages"]

#: Small default search space for :func:`tune_watershed` (3 x 3 x 2 = 18 settings).
DEFAULT_GRID: dict[str, tuple] = {
    "mask_threshold": (0.4, 0.5, 0.6),
    "boundary_threshold": (0.3, 0.5, 0.7),
    "marker_threshold": (0.5, 0.7),
}

ValItem = tuple[np.ndarray, "np.ndarray | None", np.ndarray]


def score_watershed(val_items: Sequence[ValItem], params: WatershedParams, metric: str = "aji") -> float:
    """Mean of ``metric`` ("aji", "aji_plus" or "pq") over ``val_items`` = [(region_prob, boundary_prob, gt), ...].

    Maps smaller than their ``gt`` (model scale, as ``post_scale="model"`` runs the watershed) give instances that
    are resized to the ``gt`` grid with :func:`upsample_labels` before scoring, as inference does.
    """
    fns = {"aji": aji, "aji_plus": aji_plus, "pq": lambda pr, gt: panoptic_quality(pr, gt).pq}
    if metric not in fns:
        raise ValueError(f"score_watershed: metric must be one of {sorted(fns)}, got {metric!r}")
    scores = []
    for r, b, gt in val_items:
        gt = np.asarray(gt)
        inst = instances_from_maps(r, b, params)
        scores.append(fns[metric](inst if inst.shape == gt.shape else upsample_labels(inst, gt.shape), gt))
    return float(np.nanmean(scores)) if scores else float("nan")


def tune_watershed(
    val_items: Sequence[ValItem],
    grid: Mapping[str, Iterable[Any]] | None = None,
    *,
    base: WatershedParams | None = None,
    metric: str = "aji",
    return_table: bool = False,
) -> WatershedParams | tuple[WatershedParams, list[tuple[WatershedParams, float]]]:
    """Grid-search the watershed parameters that maximise the mean ``metric`` over VALIDATION items only.

    Args:
        val_items: ``[(region_prob, boundary_prob or None, gt_instance_map), ...]`` from the validation split;
            never pass test tiles, or the reported test scores are optimistic.
        grid: ``{field: candidate values}`` over :class:`WatershedParams` fields (default :data:`DEFAULT_GRID`);
            fields not in the grid keep ``base``'s values.
        metric: "aji" (default), "aji_plus" or "pq".
        return_table: also return every ``(params, score)`` tried, in grid order.

    Ties keep the first setting in grid order (itertools.product order of ``grid``).
    """
    if not val_items:
        raise ValueError("tune_watershed: val_items is empty; pass (region_prob, boundary_prob, gt) validation tiles")
    grid = dict(DEFAULT_GRID if grid is None else grid)
    base = base or WatershedParams()
    names = list(grid)
    unknown = sorted(set(names) - {f.name for f in dataclasses.fields(WatershedParams)})
    if unknown:
        raise ValueError(f"tune_watershed: unknown grid parameter(s) {unknown}")
    table: list[tuple[WatershedParams, float]] = []
    best, best_score = base, -np.inf
    for values in itertools.product(*(tuple(grid[n]) for n in names)):
        params = dataclasses.replace(base, **dict(zip(names, values)))
        score = score_watershed(val_items, params, metric)
        table.append((params, score))
        if score > best_score:
            best, best_score = params, score
    return (best, table) if return_table else best


#: stage 1: probability thresholds (MONAI HoVerNet-style markers: region minus uncertain boundary)
THRESHOLD_GRID: dict[str, tuple] = {
    "mask_threshold": (0.4, 0.5, 0.6),
    "marker_threshold": (0.5, 0.7),
    # down to 0.05: the boundary map is faint on the lines where nuclei touch (docs/README.md, "Separating touching
    # nuclei")
    "boundary_threshold": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7),
}
#: stage 2: sizes in model pixels (0.5 um/px: a nucleus of 6 um is ~110 px) and the elevation smoothing
SIZE_GRID: dict[str, tuple] = {
    "min_size": (4, 8, 16, 32),
    "min_marker_size": (2, 4, 8, 16, 32),
    "smooth_sigma": (0.5, 1.0),
}


def model_scale_maps(
    predictor: Callable[[np.ndarray], np.ndarray], rgb: np.ndarray, reference: Mapping[str, Sequence[float]],
    pixel_size: float, model_pixel_size: float, chunk: int = 1024, input_mode: str = "gray",
) -> tuple[np.ndarray, np.ndarray]:
    """Region and boundary probability maps (model scale, float32) of one RGB tile, chunk by chunk as
    ``scripts/segment.py`` computes them (the cores of the chunks tile the model-scale image)."""
    source = ArraySource(np.asarray(rgb))
    factor = scale_factor(pixel_size, model_pixel_size)
    h, w = source.shape
    shape = (model_size(h, factor), model_size(w, factor))
    region, boundary = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    stats = image_statistics(source, reference, input_mode=input_mode)
    window = getattr(predictor, "roi_size", 256)
    stride = getattr(predictor, "stride", max(int(window * 0.75), 1))
    for m in predict_chunks(source, predictor, stats, reference, factor, chunk=chunk, roi=window, stride=stride):
        (a, b), (c, d) = m.y.core, m.x.core
        ey, ex = a - m.y.exact[0], c - m.x.exact[0]
        region[a:b, c:d] = m.region[ey : ey + b - a, ex : ex + d - c]
        boundary[a:b, c:d] = m.boundary[ey : ey + b - a, ex : ex + d - c]
    return region, boundary


def validation_items(
    predictor: Callable[[np.ndarray], np.ndarray], datalist: Sequence[Mapping[str, str]],
    reference: Mapping[str, Sequence[float]], pixel_size: float, model_pixel_size: float, input_mode: str = "gray",
) -> list[ValItem]:
    """``[(region, boundary, true instances), ...]`` for the ``datalist`` tiles (``image`` and instance ``label``
    paths, e.g. :func:`bundle.research.transfer.transfer_datalist` ``part="val"``)."""
    items = []
    for d in datalist:
        region, boundary = model_scale_maps(predictor, read_image(d["image"]), reference, pixel_size, model_pixel_size,
                                            input_mode=input_mode)
        items.append((region, boundary, read_label(d["label"], kind="instance")))
    return items


def tune_in_stages(
    items: Sequence[ValItem], base: WatershedParams | None = None, metric: str = "aji",
    grids: Sequence[Mapping[str, Sequence[Any]]] = (THRESHOLD_GRID, SIZE_GRID),
) -> tuple[WatershedParams, list[dict[str, Any]]]:
    """Best parameters after searching each grid in turn (each from the previous best) and every setting tried:
    ``[{"stage", "params", "score"}, ...]``; the first row is ``base`` itself (stage 0)."""
    base = base or WatershedParams()
    rows = [{"stage": 0, "params": base.to_dict(), "score": score_watershed(items, base, metric)}]
    best = base
    for stage, grid in enumerate(grids, start=1):
        best, table = tune_watershed(items, grid, base=best, metric=metric, return_table=True)
        rows += [{"stage": stage, "params": p.to_dict(), "score": s} for p, s in table]
    return best, rows


def native_items(items: Sequence[ValItem]) -> list[ValItem]:
    """The same items with the maps brought to the truth's size (bilinear, as ``post_scale="native"`` does)."""
    out = []
    for region, boundary, gt in items:
        (h, w), (hm, wm) = np.shape(gt), np.shape(region)
        up = maps_to_native([region, boundary], (0, h), (0, w), (0, hm), (0, wm), (h, w), (hm, wm))
        out.append((up[0], up[1], gt))
    return out


def scaled_grid(grid: Mapping[str, Sequence[Any]], factor: float) -> dict[str, tuple]:
    """``grid`` for maps ``factor`` times larger per axis: areas x factor^2, lengths x factor."""
    area, length = ("min_size", "min_marker_size"), ("smooth_sigma", "marker_radius", "peak_min_distance")
    out = {}
    for key, values in grid.items():
        scale = factor**2 if key in area else factor if key in length else 1
        out[key] = tuple((round(v * scale) if isinstance(v, int) else v * scale) for v in values) if scale != 1 else tuple(values)
    return out
