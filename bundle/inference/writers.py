"""Per-image output files of the engine, filled block by block so that only a tile's label map is image-sized:
streamed CSV and GeoJSON (:class:`NucleusStream`), label map, overlay and probability maps (:class:`TileOutputs`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from skimage.segmentation import find_boundaries

from bundle.core.errors import DataError
from bundle.core.files import atomic_write, write_png_atomic
from bundle.inference.blocks import NucleusBlock
from bundle.inference.overlap import Writer
from bundle.inference.sources import RegionSource
from bundle.inference.timing import stage
from bundle.nuclei.exports import (
    FORMATS,
    instances_geojson,
    nucleus_table,
    table_csv,
    write_instance_map,
)
from bundle.nuclei.overlays import PRED_RGB

logger = logging.getLogger(__name__)

#: every output format of the engine: the nucleus formats of :data:`bundle.nuclei.exports.FORMATS`, plus per-pixel maps
#: for tiles: ``mask`` (region probability > threshold, 0/255 PNG), ``prob`` (region and boundary probability x 255
#: PNGs) and ``nifti`` (both maps, float32 NIfTI)
OUTPUT_FORMATS = (*FORMATS, "mask", "prob", "nifti")
MAP_FORMATS = ("mask", "prob", "nifti")


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


class NucleusStream:
    """Streams per-nucleus CSV rows and GeoJSON features of successive :class:`NucleusBlock` s into temp files
    beside ``<stem>_nuclei.csv`` / ``<stem>.geojson``; :meth:`close` renames them into place (atomic).

    Coordinates: ``offset + scale * native`` (``bundle.nuclei.exports`` frame), e.g. level-0 slide pixels.
    Every nucleus gets the next global id, shared by the CSV ``id``, the GeoJSON ``instance_id`` and the label map.
    """

    def __init__(
        self, out_dir: str | os.PathLike, stem: str, formats: Sequence[str] = ("geojson", "csv"),
        offset: Sequence[float] = (0.0, 0.0), scale: float = 1.0, tolerance: float = 0.0,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stem, self.offset, self.scale, self.tolerance = stem, (float(offset[0]), float(offset[1])), float(scale), tolerance
        self.paths = {}
        if "geojson" in formats:
            self.paths["geojson"] = self.out_dir / f"{stem}.geojson"
        if "csv" in formats:
            self.paths["csv"] = self.out_dir / f"{stem}_nuclei.csv"
        self._tmp = {k: p.with_name(f".{p.name}.{os.getpid()}.partial") for k, p in self.paths.items()}
        self._files = {k: open(t, "w", encoding="utf-8", newline="") for k, t in self._tmp.items()}
        if "geojson" in self._files:
            self._files["geojson"].write('{"type":"FeatureCollection","features":[\n')
        self.count = 0
        self._first_feature = True
        self._header = True

    def add(self, block: NucleusBlock) -> np.ndarray:
        """Write ``block``'s nuclei; returns its local -> global id table (index 0 -> 0)."""
        n = block.count
        lut = np.zeros(n + 1, np.int64)
        lut[1:] = np.arange(self.count + 1, self.count + n + 1)
        if n == 0 or not self._files:
            self.count += n
            return lut
        oy, ox = block.origin
        offset = (self.offset[0] + self.scale * ox, self.offset[1] + self.scale * oy)
        with stage("measurements"):
            table = nucleus_table(block.rgb, block.instances, block.region, block.boundary, offset, self.scale)
        if "geojson" in self._files:
            with stage("geojson"):
                collection = instances_geojson(
                    block.instances, block.region, block.rgb, block.boundary, offset=offset, scale=self.scale,
                    tolerance=self.tolerance, tile_id=f"{self.stem}@{oy},{ox}", table=table,
                )
                f = self._files["geojson"]
                for feature, gid in zip(collection["features"], lut[table["id"]].tolist()):
                    feature["properties"]["instance_id"] = gid
                    feature["properties"]["measurements"]["instance_id"] = gid
                    f.write(("" if self._first_feature else ",\n") + json.dumps(feature, separators=(",", ":"), allow_nan=False))
                    self._first_feature = False
        if "csv" in self._files:
            with stage("csv"):
                table["id"] = lut[table["id"]]
                text = table_csv(table)
                self._files["csv"].write(text if self._header else text.split("\n", 1)[1])
                self._header = False
        self.count += n
        return lut

    def close(self) -> dict[str, Path]:
        """Finish and rename the files into place; the GeoJSON last (its presence marks a finished image)."""
        if "geojson" in self._files:
            self._files["geojson"].write("\n]}\n")
        if "csv" in self._files and self._header:  # no nucleus at all: still a valid CSV with its header
            self._files["csv"].write(table_csv(nucleus_table(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.int32), np.zeros((1, 1)), np.zeros((1, 1)))))
        for f in self._files.values():
            f.close()
        for key in sorted(self._tmp, key=lambda k: k == "geojson"):
            os.replace(self._tmp[key], self.paths[key])
        self._files = {}
        return dict(self.paths)

    def abort(self) -> None:
        """Drop the partial files (after an error)."""
        for f in self._files.values():
            f.close()
        for t in self._tmp.values():
            if t.exists():
                t.unlink()
        self._files = {}


def _write_png(path: Path, image: np.ndarray) -> Path:
    write_png_atomic(path, image)
    return path


def _timed(name: str, fn):
    """``fn`` timed as stage ``name`` on whichever thread runs it."""
    def run(*args):
        with stage(name):
            return fn(*args)
    return run


#: images with more pixels than this get their label map and overlay as tiled TIFFs written tile by tile:
#: PNG cannot be written piecewise, and encoding an 8000 x 8000 RGB PNG costs twice the image in copies
PNG_MAX_PIXELS = 4096 * 4096


def _write_tiled_tiff(path: Path, tiles: Iterator[np.ndarray], shape: tuple[int, ...], dtype: Any, tile: int) -> Path:
    import tifffile

    photometric = "rgb" if len(shape) == 3 else "minisblack"
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, tiles, shape=shape, dtype=dtype, tile=(tile, tile),
                                                     compression="zlib", photometric=photometric))
    return path


class TileOutputs:
    """Outputs of one large tile in the :func:`bundle.nuclei.exports.write_tile_outputs` layout, filled block by block:
    ``<stem>.geojson`` and ``<stem>_nuclei.csv`` (streamed), ``<stem>_instances.png`` (uint16 label map) and
    ``<stem>_overlay.png`` (contours drawn from the final label map); for tiles also the per-pixel maps of
    :data:`MAP_FORMATS` (``<stem>_mask.png`` 0/255 at ``threshold``, ``<stem>_region.png`` / ``_boundary.png``
    probabilities x 255, ``<stem>_pred.nii.gz``). Beyond :data:`PNG_MAX_PIXELS` pixels or
    65535 nuclei the label map and overlay are tiled zlib TIFFs (``_instances.tif``, uint32 if needed;
    ``_overlay.tif``) written tile by tile. Only the label map is image-sized in memory."""

    def __init__(self, out_dir: str | os.PathLike, stem: str, shape: tuple[int, int],
                 formats: Sequence[str] = ("png", "geojson", "csv", "overlay"), tolerance: float = 0.0,
                 threshold: float = 0.5, writer_thread: bool = True) -> None:
        unknown = sorted(set(formats) - set(OUTPUT_FORMATS))
        if unknown:
            raise ValueError(f"unknown output format(s) {unknown}; choose from {OUTPUT_FORMATS}")
        maps = [f for f in formats if f in MAP_FORMATS]
        if maps and shape[0] * shape[1] > PNG_MAX_PIXELS:
            raise DataError(f"{stem}: {shape[0]} x {shape[1]} px is too large for the per-pixel outputs {maps} "
                            f"(tiles up to {PNG_MAX_PIXELS} px). Leave them out of the formats for this image")
        self.out_dir, self.stem, self.formats, self.threshold = Path(out_dir), stem, tuple(formats), float(threshold)
        self.stream = NucleusStream(out_dir, stem, formats, tolerance=tolerance)
        need_labels = {"png", "tiff", "overlay"} & set(formats)
        self.labels = np.zeros(shape, np.uint16) if need_labels else None
        self.maps = np.zeros((2, *shape), np.float32) if maps else None
        self.conflicts = 0
        #: encode the label map and overlay PNGs on a writer thread (zlib releases the GIL) while the overlay is drawn
        self.writer_thread = bool(writer_thread)

    def add(self, block: NucleusBlock) -> None:
        lut = self.stream.add(block)
        with stage("label map"):
            self._add_labels(block, lut)

    def _add_labels(self, block: NucleusBlock, lut: np.ndarray) -> None:
        oy, ox = block.origin
        h, w = block.instances.shape
        if self.maps is not None:  # block windows overlap by their halo, where both hold the same chunk maps
            self.maps[0, oy : oy + h, ox : ox + w] = block.region
            self.maps[1, oy : oy + h, ox : ox + w] = block.boundary
        if self.labels is None or block.count == 0:
            return
        if self.stream.count > np.iinfo(self.labels.dtype).max:
            self.labels = self.labels.astype(np.uint32)
        view = self.labels[oy : oy + h, ox : ox + w]
        inside = block.instances > 0
        # a pixel claimed by a nucleus of another block keeps its first owner (both segment the same maps,
        # so this only happens where two watersheds disagree on a 1-pixel border)
        free = inside & (view == 0)
        self.conflicts += int(inside.sum() - free.sum())
        view[free] = lut[block.instances[free]].astype(view.dtype)

    def close(self, source: RegionSource, tile: int = 512) -> dict[str, Path]:
        """Write the label map and overlay, then finish the streamed files; returns ``{format: path}``."""
        paths: dict[str, Path] = {}
        if self.maps is not None:
            with stage("maps"):
                paths.update(self._write_maps())
        if self.labels is not None:
            with Writer(self.writer_thread) as writer:
                self._write_labels(source, tile, writer, paths)
                paths.update(writer.wait())
        with stage("geojson"):
            paths.update(self.stream.close())
        return paths

    def _write_labels(self, source: RegionSource, tile: int, writer: Writer, paths: dict[str, Path]) -> None:
        """Label map (PNG, or tiled TIFF) and overlay; the PNG encodings go to ``writer`` (the label map's while the
        overlay is drawn), the tiled TIFFs are written here, tile by tile."""
        small = self.labels.size <= PNG_MAX_PIXELS and self.labels.dtype == np.uint16
        if "png" in self.formats and small:
            writer.submit("png", _timed("png", write_instance_map), self.out_dir / f"{self.stem}_instances.png",
                          self.labels)
        elif "png" in self.formats:
            logger.info(f"{self.stem}: {self.labels.shape} px / {self.stream.count} nuclei: label map as tiled TIFF")
        if "tiff" in self.formats or ("png" in self.formats and not small):
            with stage("tiff"):
                paths["tiff"] = _write_tiled_tiff(self.out_dir / f"{self.stem}_instances.tif", self._label_tiles(tile),
                                                  self.labels.shape, self.labels.dtype, tile)
        if "overlay" in self.formats and self.labels.size <= PNG_MAX_PIXELS:
            with stage("overlay"):
                path = self.out_dir / f"{self.stem}_overlay.png"
                overlay = np.empty((*self.labels.shape, 3), np.uint8)
                for (y, x), part in self.overlay_blocks(source, 2048):
                    overlay[y : y + part.shape[0], x : x + part.shape[1]] = part
            writer.submit("overlay", _timed("overlay png", _write_png), path, overlay)
        elif "overlay" in self.formats:
            with stage("overlay"):
                tiles = (np.pad(p, ((0, tile - p.shape[0]), (0, tile - p.shape[1]), (0, 0))) for _, p in self.overlay_blocks(source, tile))
                paths["overlay"] = _write_tiled_tiff(self.out_dir / f"{self.stem}_overlay.tif", tiles,
                                                     (*self.labels.shape, 3), np.uint8, tile)

    def _write_maps(self) -> dict[str, Path]:
        images = {}
        if "prob" in self.formats:
            images["prob"] = (f"{self.stem}_region.png", probability_to_uint8(self.maps[0]))
            images["boundary"] = (f"{self.stem}_boundary.png", probability_to_uint8(self.maps[1]))
        if "mask" in self.formats:
            images["mask"] = (f"{self.stem}_mask.png", ((self.maps[0] > self.threshold) * 255).astype(np.uint8))
        paths = {}
        for key, (name, image) in images.items():
            paths[key] = self.out_dir / name
            write_png_atomic(paths[key], image)
        if "nifti" in self.formats:
            paths["nifti"] = self.out_dir / f"{self.stem}_pred.nii.gz"
            write_nifti_atomic(paths["nifti"], self.maps)
        return paths

    def _label_tiles(self, tile: int) -> Iterator[np.ndarray]:
        h, w = self.labels.shape
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                part = self.labels[y : y + tile, x : x + tile]
                yield part if part.shape == (tile, tile) else np.pad(part, ((0, tile - part.shape[0]), (0, tile - part.shape[1])))

    def overlay_blocks(self, source: RegionSource, block: int = 2048) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """Row-major ``((y, x), rgb)`` blocks of the tile with each nucleus' inner contour drawn (as
        :func:`bundle.nuclei.exports.instance_overlay`), each computed with a 1-pixel margin so contours across block
        borders are exact."""
        h, w = self.labels.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                y1, x1 = min(h, y + block), min(w, x + block)
                my0, mx0 = max(0, y - 1), max(0, x - 1)
                lab = self.labels[my0 : min(h, y1 + 1), mx0 : min(w, x1 + 1)]
                edge = find_boundaries(lab, mode="inner", connectivity=1, background=0)[y - my0 : y1 - my0, x - mx0 : x1 - mx0]
                part = np.array(source.read(y, y1, x, x1), dtype=np.uint8, copy=True)
                part[edge] = np.asarray(PRED_RGB, np.uint8)
                yield (y, x), part

    def abort(self) -> None:
        self.stream.abort()
