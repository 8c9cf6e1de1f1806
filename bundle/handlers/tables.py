"""The evaluation handler that writes per-image metric tables.

Every file is written atomically (temp file + rename, :mod:`bundle.data.io`), so an interrupted run never
leaves a half-written output that a resumed run would mistake for a finished one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.core.distributed import gather_objects, is_rank0
from bundle.core.files import write_text_atomic
from bundle.data.io import tile_id

logger = logging.getLogger(__name__)


def _filename(item: dict, key: str = "image") -> str:
    meta = getattr(item.get(key), "meta", None) or item.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj")
    if name is None:
        raise KeyError(f"no 'filename_or_obj' in the metadata of '{key}': load tiles with bundle.data.transforms.LoadTiled")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


class MetricsTableWriter:
    """Write per-image metrics to ``<output_dir>/metrics_per_image.csv`` and their mean, SD and count to
    ``metrics_summary.json``.

    Reads ``engine.state.metric_details`` (filled by MONAI metric handlers with ``save_details=True``; MONAI
    gathers them across DDP ranks) and the tile file names of every iteration, gathered the same way, so one
    process or several give the same table. Images whose metric is undefined (nan, e.g. HD of an empty mask)
    are written as empty cells and left out of that metric's mean.
    """

    def __init__(self, output_dir: str, metrics: Sequence[str] | None = None, image_key: str = "image") -> None:
        self.output_dir = Path(output_dir)
        self.metrics = list(metrics) if metrics is not None else None
        self.image_key = image_key
        self._names: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._names.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def _collect(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        self._names.extend(_filename(item, self.image_key) for item in outputs)

    def table(self, engine: Engine) -> tuple[list[str], dict[str, np.ndarray]]:
        names = [name for part in gather_objects(self._names) for name in part]
        details = engine.state.metric_details
        keys = self.metrics if self.metrics is not None else list(details)
        columns = {}
        for k in keys:
            v = details[k]
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            v = v.reshape(v.shape[0], -1)[:, 0].astype(np.float64)  # (images, channels) -> first channel
            if len(v) != len(names):
                raise RuntimeError(f"metric '{k}' has {len(v)} values for {len(names)} images")
            columns[k] = v
        return names, columns

    def write(self, engine: Engine) -> None:
        names, columns = self.table(engine)
        if not is_rank0():
            return
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "filename", *columns])
        for i, name in enumerate(names):
            w.writerow([tile_id(name), name, *("" if math.isnan(c[i]) else f"{c[i]:.6g}" for c in columns.values())])
        write_text_atomic(self.output_dir / "metrics_per_image.csv", buf.getvalue())
        summary: dict[str, Any] = {"n_images": len(names)}
        for k, v in columns.items():
            ok = v[~np.isnan(v)]
            summary[k] = {
                "mean": float(ok.mean()) if ok.size else None,
                "sd": float(ok.std(ddof=1)) if ok.size > 1 else None,
                "n": int(ok.size),
            }
        write_text_atomic(self.output_dir / "metrics_summary.json", json.dumps(summary, indent=2) + "\n")
        logger.info("metrics: " + ", ".join(f"{k} {s['mean']:.4f} ± {s['sd'] or 0:.4f}" for k, s in summary.items() if isinstance(s, dict) and s["mean"] is not None))
