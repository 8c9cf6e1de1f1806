"""Handlers that write what the workflows produce: per-tile prediction files, and per-image metric tables.

Every file is written atomically (temp file + rename, :mod:`bundle.io`), so an interrupted run never
leaves a half-written output that a resumed run would mistake for a finished one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from bundle.inference import DEFAULT_PIXEL_SIZE, MODEL_PIXEL_SIZE, scale_factor, tile_id
from bundle.io import DataError, atomic_write, read_image, write_png_atomic, write_text_atomic
from bundle.postprocessing import BOUNDARY, REGION

logger = logging.getLogger(__name__)


def _filename(item: dict, key: str = "image") -> str:
    meta = getattr(item.get(key), "meta", None) or item.get(f"{key}_meta_dict") or {}
    name = meta.get("filename_or_obj")
    if name is None:
        raise KeyError(f"no 'filename_or_obj' in the metadata of '{key}': load tiles with bundle.transforms.LoadTiled")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def probability_to_uint8(prob: np.ndarray) -> np.ndarray:
    """[0, 1] probabilities -> uint8 0..255 (rounded), the form image viewers open."""
    return np.clip(np.rint(np.asarray(prob, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_nifti_atomic(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a channel-first (C, H, W) float map as NIfTI with MONAI's ``NibabelWriter`` (identity affine)."""
    from monai.data import NibabelWriter

    writer = NibabelWriter()
    writer.set_data_array(np.moveaxis(np.asarray(array, np.float32), 0, -1)[:, :, None, :], channel_dim=-1)
    writer.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
    atomic_write(path, lambda tmp: writer.write(tmp, verbose=False))


class TileWriter:
    """Write, per tile, ``<id>_mask.png`` (0/255), ``<id>_region.png`` and ``<id>_boundary.png`` (probability
    x 255), with ``nifti=True`` ``<id>_pred.nii.gz`` (every output channel, float32) and, for the ``formats``
    asked (:data:`bundle.exports.FORMATS`), the nucleus outputs of :func:`bundle.exports.write_tile_outputs`:
    ``png``/``tiff`` uint16 instance map ``<id>_instances.*``, ``geojson`` QuPath detections ``<id>.geojson``,
    ``csv`` per-nucleus measurements ``<id>_nuclei.csv``, ``overlay`` contours ``<id>_overlay.png``; nuclei
    from :func:`bundle.instances.instances_from_output` with the ``watershed`` parameters (a
    :class:`bundle.instances.WatershedParams` or its dict, as stored in the config).

    Attach to the inference evaluator; reads the decollated ``engine.state.output`` items, whose ``pred`` is
    DS-HFN's eval output (region, boundary, refined) already mapped back to the tile's size, and the tile's RGB
    from the batch key ``rgb`` (a copy made right after loading; re-read from the file if absent). The mask is
    written last: its presence marks a finished tile (see :func:`bundle.inference.tile_datalist`).

    ``post_scale="model"`` (default, as ``scripts/segment.py``): the watershed runs on the network's model-scale
    output, the item's ``pred_model`` (a copy of ``pred`` made before ``Invertd``; centre-cropped here to the
    tile's model size, undoing ``SpatialPadd``), and the labels are resized to the tile by nearest-exact;
    ``"native"``: on ``pred`` itself. The ``watershed`` sizes are pixels of that grid.

    Items marked ``{"image": path, "error": message}`` (:class:`bundle.tiling.GuardedDataset`: a tile that
    could not be read) are logged and counted as failed, and so is a tile whose outputs cannot be written; the
    rest of the run goes on. At the end of the run the counts of every rank are gathered and rank 0 logs them and
    writes ``<output_dir>/inference_summary.json``: tiles done / skipped (outputs already there, ``skipped``) /
    failed (with the reasons), nuclei found; when every tile failed it then raises a :class:`bundle.io.DataError`
    (one line, non-zero exit).
    """

    def __init__(
        self,
        output_dir: str,
        threshold: float = 0.5,
        nifti: bool = False,
        mask_channel: int = REGION,
        formats: Sequence[str] = (),
        watershed: Any = None,
        tolerance: float = 0.0,
        skipped: int = 0,
        summary_file: str | None = "inference_summary.json",
        post_scale: str = "model",
        pixel_size: float = DEFAULT_PIXEL_SIZE,
        model_pixel_size: float = MODEL_PIXEL_SIZE,
    ) -> None:
        from bundle.exports import FORMATS
        from bundle.instances import WatershedParams

        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.nifti = nifti
        self.mask_channel = mask_channel
        self.formats = tuple(formats or ())
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ValueError(f"TileWriter: unknown format(s) {unknown}; choose from {FORMATS}")
        if watershed is None or isinstance(watershed, WatershedParams):
            self.watershed = watershed or WatershedParams()
        else:
            self.watershed = WatershedParams.from_dict(watershed)
        if post_scale not in ("model", "native"):
            raise ValueError(f"TileWriter: post_scale must be 'model' or 'native', got {post_scale!r}")
        self.post_scale = post_scale
        self.factor = scale_factor(pixel_size, model_pixel_size)
        self.tolerance = tolerance
        self.skipped = int(skipped)
        self.summary_file = summary_file
        self.written = 0
        self.done: list[str] = []
        self.failed: list[dict[str, str]] = []
        self.nuclei = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.summary)

    def __call__(self, engine: Engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [None] * len(outputs)
        for item, data in zip(outputs, batch):
            self.write(item, data)

    def write(self, item: dict, data: dict | None = None) -> dict[str, Path]:
        if "error" in item:
            self._fail(str(item.get("image")), str(item["error"]))
            return {}
        name = _filename(item)
        stem = tile_id(name)
        pred = item["pred"]
        pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
        paths = {
            "region": self.output_dir / f"{stem}_region.png",
            "boundary": self.output_dir / f"{stem}_boundary.png",
            "mask": self.output_dir / f"{stem}_mask.png",
        }
        try:
            write_png_atomic(paths["region"], probability_to_uint8(pred[REGION]))
            write_png_atomic(paths["boundary"], probability_to_uint8(pred[BOUNDARY]))
            if self.nifti:
                paths["nifti"] = self.output_dir / f"{stem}_pred.nii.gz"
                write_nifti_atomic(paths["nifti"], pred)
            if self.formats:
                paths.update(self.write_nuclei(stem, name, pred, data, item.get("pred_model")))
        except (DataError, ValueError) as exc:
            self._fail(name, f"{type(exc).__name__}: {exc}")
            return {}
        write_png_atomic(paths["mask"], ((pred[self.mask_channel] > self.threshold) * 255).astype(np.uint8))
        self.written += 1
        self.done.append(stem)
        return paths

    def instances(self, pred: np.ndarray, pred_model: Any = None) -> np.ndarray:
        """Nucleus instances of one tile at its native size (class docstring: ``post_scale``)."""
        from bundle.instances import instances_from_output, upsample_labels
        from bundle.tiling import model_size

        if self.post_scale == "native":
            return instances_from_output(pred, self.watershed)
        if pred_model is None:
            raise ValueError("post_scale='model' needs the model-scale prediction 'pred_model' (configs/inference.json "
                             "copies it before Invertd); set post_scale to 'native' otherwise")
        pm = pred_model.detach().cpu().numpy() if isinstance(pred_model, torch.Tensor) else np.asarray(pred_model)
        h, w = pred.shape[1:]
        hm, wm = model_size(h, self.factor), model_size(w, self.factor)
        top, left = (pm.shape[1] - hm) // 2, (pm.shape[2] - wm) // 2  # SpatialPadd "symmetric": half before
        if top < 0 or left < 0:
            raise ValueError(f"model-scale prediction {pm.shape[1:]} is smaller than the tile's model size {(hm, wm)}")
        return upsample_labels(instances_from_output(pm[:, top : top + hm, left : left + wm], self.watershed), (h, w))

    def write_nuclei(self, stem: str, name: str, pred: np.ndarray, data: dict | None, pred_model: Any = None) -> dict[str, Path]:
        """Instances by watershed on the region/boundary maps, then the ``formats`` outputs of the tile."""
        from bundle.exports import write_tile_outputs

        rgb = None if data is None else data.get("rgb")
        if rgb is None:
            rgb = read_image(name)
        else:
            rgb = rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
            rgb = np.clip(np.rint(np.moveaxis(rgb, 0, -1)), 0, 255).astype(np.uint8)
        if rgb.shape[:2] != pred.shape[1:]:
            raise ValueError(f"tile RGB {rgb.shape[:2]} and prediction {pred.shape[1:]} differ in size")
        instances = self.instances(pred, pred_model)
        self.nuclei += int(instances.max(initial=0))
        boundary = pred[BOUNDARY] if pred.shape[0] > BOUNDARY else None
        out = write_tile_outputs(self.output_dir, stem, rgb, instances, pred[REGION], boundary, self.formats,
                                 tolerance=self.tolerance)
        return {f"nuclei_{k}": v for k, v in out.items()}

    def _fail(self, name: str, message: str) -> None:
        logger.error(f"{name}: skipped, {message}")
        self.failed.append({"tile": name, "error": message})

    def summary(self, engine: Engine) -> dict[str, Any] | None:
        """Gather every rank's counts; rank 0 logs them and writes the summary JSON (returned on rank 0)."""
        logger.info(f"wrote outputs of {self.written} tiles to {self.output_dir}")
        parts = _gather_objects({"done": self.done, "failed": self.failed, "nuclei": self.nuclei})
        if not _is_rank0():
            return None
        done = [d for p in parts for d in p["done"]]
        failed = [f for p in parts for f in p["failed"]]
        summary = {
            "tiles_done": len(done),
            "tiles_skipped": self.skipped,
            "tiles_failed": len(failed),
            "nuclei": sum(p["nuclei"] for p in parts) if self.formats else None,
            "done": sorted(done),
            "done_per_rank": [len(p["done"]) for p in parts],
            "failed": failed,
        }
        logger.info(
            f"inference summary: {summary['tiles_done']} tiles done, {summary['tiles_skipped']} skipped (outputs "
            f"existed), {summary['tiles_failed']} failed" + (f", {summary['nuclei']} nuclei" if self.formats else "")
        )
        if self.summary_file:
            write_text_atomic(self.output_dir / self.summary_file, json.dumps(summary, indent=2) + "\n")
        if failed and not done and not self.skipped:  # nothing useful produced: the run must not exit 0
            raise DataError(f"{failed[0]['tile']}: every tile failed ({len(failed)}; first: {failed[0]['error']}). "
                            f"See {self.output_dir / (self.summary_file or '')} and fix the inputs")
        return summary


def _gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order (``[value]`` without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _gather_strings(values: list[str]) -> list[str]:
    """All ranks' strings in rank order (identity without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    return [v for part in gathered for v in (part or [])]


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
        names = _gather_strings(self._names)
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
        if not _is_rank0():
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
