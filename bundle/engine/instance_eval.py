"""Per-image nucleus instance metrics inside a MONAI evaluator.

:class:`InstanceMetricsHandler` turns each evaluated tile's region and boundary maps into nuclei
(:func:`bundle.nuclei.watershed.instances_from_output`, marker watershed) and scores them against the true instance map
with :func:`bundle.evaluation.instance.instance_metrics` (AJI, AJI+, DQ, SQ, PQ, detection F1). The per-image values
go into ``engine.state.metric_details`` and their means into ``engine.state.metrics``, where
:class:`bundle.engine.tables.MetricsTableWriter` and MONAI's ``StatsHandler`` find them beside the pixel metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ignite.engine import Engine, Events

from bundle.evaluation.instance import instance_metrics
from bundle.nuclei.watershed import WatershedParams, instances_from_output

__all__ = ["INSTANCE_METRICS", "InstanceMetricsHandler"]

#: the per-image columns written (keys of :func:`bundle.evaluation.instance.instance_metrics`)
INSTANCE_METRICS = ("aji", "aji_plus", "dq", "sq", "pq", "f1_iou", "f1_centroid")


class InstanceMetricsHandler:
    """Score the watershed nuclei of ``pred_key`` (C, H, W probability maps: 0 region, 1 boundary) against the
    instance map ``label_key`` (1, H, W) of every evaluated tile; both must have the same size (e.g. the
    prediction brought back to the native tile size by ``Invertd`` and the native label).

    ``watershed``: :class:`bundle.nuclei.watershed.WatershedParams` fields (default parameters when None). The values are
    refreshed after every iteration, so the order of this handler among the ``EPOCH_COMPLETED`` writers does
    not matter. One process only: under DDP each rank would hold only its own tiles.
    """

    def __init__(self, pred_key: str = "pred_native", label_key: str = "label_native",
                 watershed: Mapping[str, Any] | None = None, metrics: Sequence[str] = INSTANCE_METRICS) -> None:
        unknown = sorted(set(metrics) - set(INSTANCE_METRICS))
        if unknown:
            raise ValueError(f"InstanceMetricsHandler: unknown metric(s) {unknown}; choose from {list(INSTANCE_METRICS)}")
        self.pred_key = pred_key
        self.label_key = label_key
        self.params = WatershedParams.from_dict(watershed or {})
        self.metrics = list(metrics)
        self._rows: list[dict[str, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def score(self, pred: Any, label: Any) -> dict[str, float]:
        """Instance metrics of one tile: ``pred`` (C, H, W) maps, ``label`` (1, H, W) or (H, W) instance ids."""
        gt = np.asarray(label.detach().cpu() if hasattr(label, "detach") else label)
        gt = gt[0] if gt.ndim == 3 else gt
        instances = instances_from_output(pred, self.params)
        if instances.shape != gt.shape:
            raise ValueError(f"InstanceMetricsHandler: prediction {instances.shape} and label {gt.shape} differ in "
                             f"size; bring '{self.pred_key}' to the label's size (Invertd) first")
        return instance_metrics(instances, gt.astype(np.int64))

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
            self._rows.append(self.score(both[self.pred_key], both[self.label_key]))
        details = getattr(engine.state, "metric_details", None)
        if details is None:
            details = engine.state.metric_details = {}
        for name in self.metrics:
            values = np.array([row[name] for row in self._rows], dtype=np.float64)
            details[name] = values[:, None]  # (images, 1) like MONAI's save_details buffers
            finite = values[np.isfinite(values)]
            engine.state.metrics[name] = float(finite.mean()) if finite.size else math.nan
