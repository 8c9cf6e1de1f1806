"""Per-image nucleus metrics inside a MONAI evaluator, on the nuclei a user of the bundle gets.

:func:`native_nuclei` turns one tile's region and boundary maps into nuclei as ``configs/inference.json`` does with
``post_scale="model"``: the marker watershed (:func:`bundle.nuclei.watershed.instances_from_output`) on the maps at
the model scale, the label map resized to the tile's own size. :func:`nuclei_scores` scores them against the tile's
released label at that size: the nuclei foreground's Dice, boundary F1 (2 px) and HD95, and, where the label
holds instances (not a binary mask), AJI, AJI+, DQ, SQ, PQ and detection F1
(:func:`bundle.evaluation.instance.instance_metrics`).

:class:`InstanceMetricsHandler` does this for every evaluated tile. The per-image values go into
``engine.state.metric_details`` and their means into ``engine.state.metrics``, where
:class:`bundle.handlers.tables.MetricsTableWriter` and MONAI's ``StatsHandler`` find them beside the pixel metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.core.cli import read_flags
from bundle.core.distributed import gather_objects
from bundle.data.scale import model_shape, scale_factor
from bundle.evaluation.instance import instance_metrics
from bundle.evaluation.pixel import BoundaryF1Metric, HausdorffMetric
from bundle.nuclei.watershed import (
    WatershedParams,
    instances_from_output,
    upsample_labels,
)

__all__ = ["FOREGROUND_METRICS", "INSTANCE_METRICS", "InstanceMetricsHandler", "native_nuclei", "nuclei_scores",
           "unpad"]

#: the per-image metrics of the instance labels (keys of :func:`bundle.evaluation.instance.instance_metrics`)
INSTANCE_METRICS = ("aji", "aji_plus", "dq", "sq", "pq", "f1_iou", "f1_centroid")
#: the per-image metrics of the nuclei foreground, defined for binary and instance labels alike
FOREGROUND_METRICS = ("nuclei_dice", "nuclei_bf1", "nuclei_hd95")


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def unpad(maps: Any, shape: Sequence[int]) -> np.ndarray:
    """The centre ``shape`` (h, w) of ``maps`` (C, H, W): undoes MONAI's ``SpatialPad`` (symmetric, the extra pixel
    after), which pads tiles smaller than the network's window in the validation chain."""
    arr = _numpy(maps)
    h, w = int(shape[0]), int(shape[1])
    if arr.shape[-2] < h or arr.shape[-1] < w:
        raise ValueError(f"unpad: maps {arr.shape[-2:]} are smaller than the tile {(h, w)}")
    top, left = (arr.shape[-2] - h) // 2, (arr.shape[-1] - w) // 2
    return arr[..., top:top + h, left:left + w]


def native_nuclei(maps: Any, native_shape: Sequence[int], params: WatershedParams,
                  model_size: Sequence[int] | None = None) -> np.ndarray:
    """Nucleus label map (H, W) at ``native_shape`` from one tile's maps (C, h, w; 0 region, 1 boundary).

    ``model_size``: the tile's (h, w) at the model scale when ``maps`` may carry the validation chain's padding
    (cut off first); None when ``maps`` are exactly the tile. The watershed runs on the maps as they are and its
    labels are resized to ``native_shape`` (nearest), as inference does with ``post_scale="model"``."""
    arr = unpad(maps, model_size) if model_size is not None else _numpy(maps)
    return upsample_labels(instances_from_output(arr, params), tuple(native_shape[-2:]))


def nuclei_scores(nuclei: np.ndarray, truth: np.ndarray, instances: bool = True) -> dict[str, float]:
    """Metrics of one tile's ``nuclei`` (H, W) against its released label ``truth`` (H, W), both at the tile's size.

    The foreground metrics (:data:`FOREGROUND_METRICS`) compare ``nuclei > 0`` with ``truth > 0``: Dice (1 when
    both are empty), boundary F1 at 2 px and HD95 (:mod:`bundle.evaluation.pixel`). The instance metrics
    (:data:`INSTANCE_METRICS`) need ``instances=True`` (``truth`` holds one id per nucleus) and are nan otherwise."""
    nuclei, truth = np.asarray(nuclei), np.asarray(truth)
    if nuclei.shape != truth.shape:
        raise ValueError(f"nuclei_scores: nuclei {nuclei.shape} and label {truth.shape} differ in size")
    fg, gt = nuclei > 0, truth > 0
    denom = int(fg.sum() + gt.sum())
    p, t = torch.as_tensor(fg)[None, None].float(), torch.as_tensor(gt)[None, None].float()
    # the value of the call, not aggregate(): aggregating syncs across DDP ranks, which score different tiles
    bf1 = BoundaryF1Metric(tolerance=2.0)(p, t)
    hd95 = HausdorffMetric(percentile=95, include_background=True)(p, t)
    row = {"nuclei_dice": 2 * float((fg & gt).sum()) / denom if denom else 1.0,
           "nuclei_bf1": float(bf1[0, 0]), "nuclei_hd95": float(hd95[0, 0])}
    if instances:
        row.update(instance_metrics(nuclei.astype(np.int64), truth.astype(np.int64)))
    else:
        row.update({name: math.nan for name in INSTANCE_METRICS})
    return row


class InstanceMetricsHandler:
    """Score the watershed nuclei of ``pred_key`` (C, H, W probability maps: 0 region, 1 boundary) against the
    label ``label_key`` (1, H, W) of every evaluated tile (:func:`native_nuclei`, :func:`nuclei_scores`).

    ``model_pixel_size``: the maps are at the model scale, the label at the tile's own size, and each item's
    ``pixel_size_key`` gives that size (um/px); the padding of tiles smaller than the window is cut off and the
    nuclei resized to the label. None: maps and label must have the same size (e.g. maps brought back with
    ``Invertd``). ``kind_key``: items whose value there is ``"binary"`` get the foreground metrics only (nan
    instance metrics, left out of the means). ``watershed``: :class:`bundle.nuclei.watershed.WatershedParams`
    fields (default parameters when None).

    The values are refreshed after every iteration. Under DDP every rank scores its own tiles and the rows are
    gathered in rank order at the end of the epoch, the order in which MONAI gathers its metric details and
    :class:`bundle.handlers.tables.MetricsTableWriter` its file names; list this handler before the writer so
    the gathered values are in place when it writes.
    """

    def __init__(self, pred_key: str = "pred_native", label_key: str = "label_native",
                 watershed: Mapping[str, Any] | None = None,
                 metrics: Sequence[str] = FOREGROUND_METRICS + INSTANCE_METRICS,
                 model_pixel_size: float | None = None, pixel_size_key: str = "pixel_size",
                 kind_key: str = "label_kind") -> None:
        known = FOREGROUND_METRICS + INSTANCE_METRICS
        unknown = sorted(set(metrics) - set(known))
        if unknown:
            raise ValueError(f"InstanceMetricsHandler: unknown metric(s) {unknown}; choose from {list(known)}")
        self.pred_key = pred_key
        self.label_key = label_key
        self.params = WatershedParams.from_dict(read_flags(watershed, WatershedParams, "--watershed"))
        self.metrics = list(metrics)
        self.model_pixel_size = model_pixel_size
        self.pixel_size_key = pixel_size_key
        self.kind_key = kind_key
        self._rows: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._gather)

    def score(self, pred: Any, label: Any, pixel_size: float | None = None, instances: bool = True) -> dict[str, float]:
        """Metrics of one tile: ``pred`` (C, h, w) maps, ``label`` (1, H, W) or (H, W) ids; ``pixel_size``: the
        tile's um/px, needed with ``model_pixel_size``."""
        gt = _numpy(label)
        gt = gt[0] if gt.ndim == 3 else gt
        size = None
        if self.model_pixel_size is not None:
            if pixel_size is None:
                raise KeyError(f"InstanceMetricsHandler: no '{self.pixel_size_key}' in the item; it is needed to bring "
                               "the model-scale maps to the label's size")
            size = model_shape(gt.shape, scale_factor(float(pixel_size), self.model_pixel_size))
        elif _numpy(pred).shape[-2:] != gt.shape:
            raise ValueError(f"InstanceMetricsHandler: prediction {_numpy(pred).shape[-2:]} and label {gt.shape} "
                             f"differ in size; bring '{self.pred_key}' to the label's size (Invertd) first, or give "
                             "model_pixel_size")
        return nuclei_scores(native_nuclei(pred, gt.shape, self.params, size), gt, instances)

    def __call__(self, engine: Engine) -> None:
        # MONAI's postprocessing leaves keys that came with the batch (the native label) in ``state.batch`` and
        # puts new ones (the inverted prediction) in ``state.output``: look in both, output first
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        for item, data in zip(outputs, batch):
            both = {**(data or {}), **item}
            for key in (self.pred_key, self.label_key):
                if key not in both:
                    raise KeyError(f"InstanceMetricsHandler: '{key}' is neither in the evaluator output nor in the "
                                   f"batch (keys {sorted(map(str, both))}); load it in the preprocessing or add it "
                                   "in the postprocessing (CopyItemsd + Invertd)")
            pixel_size = both.get(self.pixel_size_key)
            pixel_size = None if pixel_size is None else float(_numpy(pixel_size).reshape(-1)[0])
            instances = str(both.get(self.kind_key, "instance")) != "binary"
            self._rows.append(self.score(both[self.pred_key], both[self.label_key], pixel_size, instances))
        self._publish(engine, self._rows)

    def _gather(self, engine: Engine) -> None:
        parts = gather_objects(self._rows)
        if len(parts) > 1:
            self._publish(engine, [row for part in parts for row in part])

    def _publish(self, engine: Engine, rows: Sequence[Mapping[str, float]]) -> None:
        details = getattr(engine.state, "metric_details", None)
        if details is None:
            details = engine.state.metric_details = {}
        for name in self.metrics:
            values = np.array([row[name] for row in rows], dtype=np.float64)
            details[name] = values[:, None]  # (images, 1) like MONAI's save_details buffers
            finite = values[np.isfinite(values)]
            engine.state.metrics[name] = float(finite.mean()) if finite.size else math.nan
