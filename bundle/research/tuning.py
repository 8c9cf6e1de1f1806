"""Watershed parameters tuned on validation tiles only.

The items are what inference sees: a trained network's region and boundary maps at model scale (the chunk engine,
:func:`bundle.inference.chunks.predict_chunks`) on tiles it was neither trained nor tested on, next to the true instance
maps at native size; nuclei are scored at native size after the model-scale watershed (``post_scale="model"``,
:func:`bundle.nuclei.watershed.score_watershed`). The search is two grids in turn, thresholds then sizes, each the full
product (:func:`bundle.nuclei.watershed.tune_watershed`), so 58 settings rather than the ~700 of one joint grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bundle.data.io import read_image, read_label
from bundle.data.scale import scale_factor
from bundle.inference.chunks import maps_to_native, model_size, predict_chunks
from bundle.inference.colour import image_statistics
from bundle.inference.sources import ArraySource
from bundle.nuclei.watershed import (
    ValItem,
    WatershedParams,
    score_watershed,
    tune_watershed,
)

__all__ = ["THRESHOLD_GRID", "SIZE_GRID", "model_scale_maps", "validation_items", "native_items", "scaled_grid",
           "tune_in_stages"]

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
