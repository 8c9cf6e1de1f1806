"""Whole-slide images and large TIFF tiles read region by region through MONAI's WSI reader, and slide mode:
one GeoJSON (and one nucleus CSV) per slide, in level-0 slide pixels.

MONAI 1.6's ``TiffFileWSIReader`` (``WSIReader(backend="tifffile")``, the only backend without cuCIM or
OpenSlide) decodes the WHOLE level for every patch (``wsi.asarray(level=...)`` then a crop) and counts
levels as top-level IFDs, so it misses SubIFD pyramids and counts an SVS thumbnail as a level.
:class:`RegionTiffWSIReader` is that reader with two methods replaced: levels are tifffile's pyramid levels
(``series[0].levels``), and a patch decodes only the TIFF tiles (or strips) it overlaps (:func:`read_tiff_region`),
so reading a region costs memory and time proportional to the region. Vendor slides (SVS, NDPI, MRXS, SCN..., and
TIFFs OpenSlide recognises as a vendor's) go through MONAI's ``WSIReader(backend="openslide")`` (``openslide-python``
with ``openslide-bin``, pinned in requirements.txt). Either way the pixels pass :func:`bundle.data.io.to_rgb`, the
decoding rules of every front end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import WSIReader
from monai.data.wsi_reader import TiffFileWSIReader
from monai.utils import OptionalImportError

from bundle.core.errors import DataError
from bundle.core.files import write_text_atomic
from bundle.data.io import (
    TIFF_SUFFIXES,
    check_single_frame,
    read_image,
    tile_id,
    to_rgb,
)
from bundle.data.scale import DEFAULT_PIXEL_SIZE, MODEL_PIXEL_SIZE
from bundle.inference.pipeline import peak_rss_mib, segment_image
from bundle.inference.sources import ArraySource, RegionSource
from bundle.inference.timing import stage
from bundle.inference.writers import NucleusStream
from bundle.nuclei.watershed import WatershedParams

logger = logging.getLogger(__name__)

__all__ = [
    "SLIDE_SUFFIXES",
    "read_tiff_region",
    "RegionTiffWSIReader",
    "WSISource",
    "open_source",
    "is_slide",
    "slide_backend",
    "SlideOutputs",
    "segment_slide",
]

#: formats only OpenSlide reads (JPEG/JPEG2000-compressed vendor pyramids)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif")


def _region_fallback(page: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    arr = page.asarray()
    return arr[y0:y1, x0:x1]


def read_tiff_region(page: Any, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Rows ``y0:y1`` and columns ``x0:x1`` of a tifffile page as (h, w, samples), decoding only the tiles or
    strips that overlap the region (tifffile's own decoder, so every compression tifffile reads works).

    Pages with separate colour planes or depth fall back to decoding the page (rare in slides).
    """
    page = page.keyframe if hasattr(page, "keyframe") else page
    height, width = int(page.imagelength), int(page.imagewidth)
    if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width):
        raise ValueError(f"read_tiff_region: region {(y0, y1, x0, x1)} outside the page ({height}, {width})")
    samples = int(page.samplesperpixel)
    if (page.planarconfig != 1 and samples > 1) or page.imagedepth > 1:
        arr = _region_fallback(page, y0, y1, x0, x1)
        return arr if arr.ndim == 3 else arr[..., None]
    th, tw = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else (min(int(page.rowsperstrip), height), width)
    ncols = math.ceil(width / tw)
    index = [r * ncols + c for r in range(y0 // th, math.ceil(y1 / th)) for c in range(x0 // tw, math.ceil(x1 / tw))]
    out = np.zeros((y1 - y0, x1 - x0, samples), page.dtype)
    if not index:
        return out
    kwargs: dict[str, Any] = {"_fullsize": bool(page.is_tiled)}
    if page.compression in (6, 7, 34892, 33007):  # JPEG needs the shared tables
        kwargs.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
    fh = page.parent.filehandle
    offsets = [page.dataoffsets[i] for i in index]
    counts = [page.databytecounts[i] for i in index]
    for data, i in fh.read_segments(offsets, counts, indices=index, sort=True, lock=fh.lock):
        seg, (_, _, sy, sx, _), _ = page.decode(data, i, **kwargs)
        if seg is None:
            continue  # empty tile: zeros
        seg = seg.reshape(seg.shape[-3:])
        ya, yb = max(y0, sy), min(y1, sy + seg.shape[0])
        xa, xb = max(x0, sx), min(x1, sx + seg.shape[1])
        if ya < yb and xa < xb:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = seg[ya - sy : yb - sy, xa - sx : xb - sx]
    return out


class RegionTiffWSIReader(TiffFileWSIReader):
    """MONAI's tifffile WSI reader with pyramid levels from ``series[0].levels`` (SubIFD or multi-page pyramids,
    SVS thumbnails left out) and region decoding (:func:`read_tiff_region`); see the module docstring.
    Use like any MONAI ``WSIReader``: ``get_data(wsi, location=(y0, x0) at level 0, size=(h, w), level=k)``."""

    @staticmethod
    def _level(wsi: Any, level: int) -> Any:
        levels = wsi.series[0].levels
        if not 0 <= level < len(levels):
            raise ValueError(f"level {level} requested; {wsi.filehandle.path} has levels 0..{len(levels) - 1}")
        return levels[level].keyframe

    @staticmethod
    def get_level_count(wsi: Any) -> int:
        return len(wsi.series[0].levels)

    def get_size(self, wsi: Any, level: int) -> tuple[int, int]:
        page = self._level(wsi, level)
        return int(page.imagelength), int(page.imagewidth)

    def get_downsample_ratio(self, wsi: Any, level: int) -> float:
        return float(self._level(wsi, 0).imagelength) / float(self._level(wsi, level).imagelength)

    def get_mpp(self, wsi: Any, level: int) -> tuple[float, float]:
        """Micrometres per pixel from the level's resolution tags, else the SVS description's ``MPP`` times the
        downsample; ValueError when neither is there (as MONAI's readers)."""
        page = self._level(wsi, level)
        tags = page.tags
        x, y = tags.get("XResolution"), tags.get("YResolution")
        unit = tags.get("ResolutionUnit")
        per = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit is not None else 2)  # inch (TIFF default), cm
        if x is not None and y is not None and per and x.value[0] and y.value[0]:
            mpp = (per * y.value[1] / y.value[0], per * x.value[1] / x.value[0])
            if all(1e-3 < m < 1e3 for m in mpp):  # 1 px/inch etc. is a placeholder, not a scan resolution
                return mpp
        match = re.search(r"MPP\s*=\s*([0-9.]+)", str(self._level(wsi, 0).description or ""))
        if match:
            mpp0 = float(match.group(1)) * self.get_downsample_ratio(wsi, level)
            return mpp0, mpp0
        raise ValueError("`mpp` cannot be obtained for this file. Please use `level` instead.")

    def _get_patch(self, wsi: Any, location: tuple[int, int], size: tuple[int, int], level: int, dtype: Any, mode: str) -> np.ndarray:
        ratio = self.get_downsample_ratio(wsi, level)
        y0, x0 = (round(location[0] / ratio), round(location[1] / ratio))
        page = self._level(wsi, level)
        y1, x1 = min(int(page.imagelength), y0 + size[0]), min(int(page.imagewidth), x0 + size[1])
        patch = read_tiff_region(page, y0, y1, x0, x1).astype(dtype, copy=False)
        if mode == "RGB" and patch.shape[-1] not in (3, 4):
            raise ValueError(f"The image is expected to have three or four color channels in '{mode}' mode but has {patch.shape[-1]}.")
        if mode == "RGB":
            patch = patch[..., :3]
        return np.moveaxis(patch, -1, self.channel_dim)


def openslide_vendor(path: str | os.PathLike) -> str | None:
    """OpenSlide's name for the format of ``path`` ("aperio", "hamamatsu", "generic-tiff"...), or None when
    OpenSlide (``openslide-python`` + ``openslide-bin``) is not importable or does not know the file."""
    try:
        import openslide
    except Exception:  # not installed, or its shared library missing
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def slide_backend(path: str | os.PathLike) -> str:
    """MONAI WSI backend for ``path``: ``"openslide"`` for vendor formats (SVS, NDPI, MRXS, SCN... by suffix, and
    TIFFs that OpenSlide recognises as a vendor's, e.g. Aperio or Philips TIFF); ``"tifffile"``
    (:class:`RegionTiffWSIReader`) for other TIFFs."""
    path = str(path)
    if path.lower().endswith(SLIDE_SUFFIXES):
        return "openslide"
    vendor = openslide_vendor(path) if path.lower().endswith(TIFF_SUFFIXES) else None
    return "openslide" if vendor not in (None, "generic-tiff") else "tifffile"


class WSISource:
    """One level of a slide (or a large TIFF tile) as a :class:`bundle.inference.sources.RegionSource`, read through a MONAI
    WSI reader: :class:`RegionTiffWSIReader` for TIFF, ``WSIReader(backend="openslide")`` for vendor formats.

    ``downsample`` = level-0 pixels per pixel of this level; ``mpp`` = um/px of this level or None if unknown.
    """

    def __init__(self, path: str | os.PathLike, level: int = 0, backend: str | None = None) -> None:
        self.path = str(path)
        if not Path(self.path).is_file():
            raise DataError(f"{self.path}: slide not found. Check the path")
        backend = backend or slide_backend(self.path)
        self.backend = backend
        try:
            if backend == "tifffile":
                # mode "stored": every sample as stored (gray, RGB, RGBA) in the file's own dtype; bundle.data.io.to_rgb
                # then applies the decoding rules every front end shares (bit depth, float range, alpha on white)
                self.reader = RegionTiffWSIReader(channel_dim=-1, mode="stored")
            else:
                # RGBA: OpenSlide marks areas without scanned data transparent; on white they read as glass
                self.reader = WSIReader(backend=backend, channel_dim=-1, mode="RGBA")
            self.wsi = self.reader.read(self.path)
        except (ImportError, OptionalImportError) as exc:
            raise DataError(f"{self.path}: the '{backend}' backend is not installed ({exc}). "
                            "Install openslide-python and openslide-bin (pip install -r requirements.txt) for "
                            "SVS/NDPI/MRXS/SCN slides") from exc
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{self.path}: cannot be opened as a slide ({type(exc).__name__}: {exc}). "
                            "Check that the file is a complete (pyramidal) TIFF/SVS") from exc
        self.bits: int | None = None
        self.value_range: tuple[float, float] | None = None
        try:
            if backend == "tifffile":
                if not self.wsi.series or not len(self.wsi.pages):
                    raise ValueError("no image in the file")
                check_single_frame(self.wsi, self.path)
            n_levels = self.reader.get_level_count(self.wsi)
            if not 0 <= level < n_levels:
                raise DataError(f"{self.path}: level {level} requested, the slide has levels 0..{n_levels - 1}. "
                                "Pick --level accordingly")
            self.level = level
            self.shape = tuple(int(v) for v in self.reader.get_size(self.wsi, level))
            self.level0_shape = tuple(int(v) for v in self.reader.get_size(self.wsi, 0))
            if min(self.shape) < 1 or min(self.level0_shape) < 1:
                raise ValueError(f"image size {self.shape}")
            self.downsample = self.level0_shape[0] / self.shape[0]
            if backend == "tifffile":
                page = RegionTiffWSIReader._level(self.wsi, level)
                self.reader.dtype = page.dtype  # read as stored; converted by bundle.data.io.to_rgb
                bits, container = int(getattr(page, "bitspersample", 0) or 0), page.dtype.itemsize * 8
                self.bits = bits if page.dtype.kind in "ui" and 0 < bits < container else None
        except DataError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise DataError(f"{self.path}: holds no readable image ({type(exc).__name__}: {exc}). "
                            "The file is empty, truncated or not an image; re-export it") from exc
        if backend == "tifffile" and self.reader.dtype.kind == "f":
            self.value_range = self._float_range()
        try:
            self.mpp: float | None = float(np.mean(self.reader.get_mpp(self.wsi, level)))
        except Exception:
            self.mpp = None

    def _float_range(self, block: int = 2048) -> tuple[float, float]:
        """(min, max) of a floating-point level, read block by block: [0, 1] or [0, 255] data is decided on the
        whole image (:func:`bundle.data.io.to_uint8`), so every region is scaled alike."""
        lo, hi = np.inf, -np.inf
        h, w = self.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                raw = self._read_raw(y, min(h, y + block), x, min(w, x + block))
                if not np.isfinite(raw).all():
                    raise DataError(f"{self.path}: is a floating-point image with NaN or infinite values. "
                                    "Export it as 8-bit RGB (uint8) TIFF")
                lo, hi = min(lo, float(raw.min())), max(hi, float(raw.max()))
        return lo, hi

    @property
    def n_levels(self) -> int:
        return int(self.reader.get_level_count(self.wsi))

    def _read_raw(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        location = (round(y0 * self.downsample), round(x0 * self.downsample))
        try:
            patch, _ = self.reader.get_data(self.wsi, location=location, size=(y1 - y0, x1 - x0), level=self.level)
        except Exception as exc:
            raise DataError(f"{self.path}: region {(y0, y1, x0, x1)} of level {self.level} cannot be read "
                            f"({type(exc).__name__}: {exc}). The file may be truncated, or need imagecodecs for its compression") from exc
        return np.asarray(patch)

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """(y1-y0, x1-x0, 3) uint8 RGB by the decoding rules of :func:`bundle.data.io.to_rgb` (the same as whole tiles)."""
        return to_rgb(self._read_raw(y0, y1, x0, x1), self.path, self.bits, self.value_range)

    def close(self) -> None:
        close = getattr(getattr(self, "wsi", None), "close", None)
        if close is not None:
            close()


def is_slide(path: str | os.PathLike) -> bool:
    """A vendor slide format, or a TIFF with more than one pyramid level."""
    path = str(path)
    if path.lower().endswith(SLIDE_SUFFIXES):
        return True
    if not path.lower().endswith(TIFF_SUFFIXES):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return len(tif.series[0].levels) > 1
    except Exception:
        return False


def open_source(path: str | os.PathLike, level: int = 0) -> RegionSource:
    """A :class:`bundle.inference.sources.RegionSource` for ``path``: TIFF and slides region by region (:class:`WSISource`),
    PNG/JPEG (and TIFFs tifffile cannot decode without imagecodecs, e.g. LZW) decoded whole by
    :func:`bundle.data.io.read_image`."""
    path = str(path)
    if path.lower().endswith(SLIDE_SUFFIXES) or (path.lower().endswith(TIFF_SUFFIXES) and level > 0):
        return WSISource(path, level)
    if path.lower().endswith(TIFF_SUFFIXES):
        try:
            source = WSISource(path, 0)
            source.read(0, min(1, source.shape[0]), 0, min(1, source.shape[1]))  # decodable without imagecodecs?
            return source
        except DataError as exc:
            logger.info(f"{path}: region reading unavailable ({exc}); decoding the whole image instead")
    return ArraySource(read_image(path), path)


class SlideOutputs(NucleusStream):
    """The slide's ``<stem>.geojson`` and ``<stem>_nuclei.csv``, streamed, in level-0 pixels (``scale`` =
    the level's downsample). Nothing image-sized is kept."""

    conflicts = 0


def segment_slide(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    predictor: Callable[[np.ndarray], np.ndarray],
    reference: Mapping[str, Sequence[float]],
    level: int = 0,
    pixel_size: float | None = None,
    model_pixel_size: float = MODEL_PIXEL_SIZE,
    params: WatershedParams | None = None,
    formats: Sequence[str] = ("geojson", "csv"),
    tissue_only: bool = True,
    progress: bool = False,
    **chunking: Any,
) -> dict[str, Any]:
    """Segment one level of a slide into ONE GeoJSON FeatureCollection (and CSV) in level-0 coordinates, nuclei
    de-duplicated across chunk borders (:func:`bundle.inference.pipeline.segment_image`); writes ``<stem>_summary.json``.

    ``pixel_size`` of level 0 in um/px: given, else the slide's own resolution tags, else
    :data:`bundle.data.scale.DEFAULT_PIXEL_SIZE`. ``chunking``: ``chunk``, ``halo``, ``roi``, ``post_chunk`` ...
    """
    source = WSISource(path, level)
    stem = tile_id(path)
    try:
        if pixel_size is not None:
            level_pixel_size = pixel_size * source.downsample
        elif source.mpp is not None:
            level_pixel_size = source.mpp
        else:
            level_pixel_size = DEFAULT_PIXEL_SIZE * source.downsample
            logger.warning(f"{path}: no resolution in the file; assuming {DEFAULT_PIXEL_SIZE} um/px at level 0 (set --pixel_size)")
        sink = SlideOutputs(out_dir, stem, formats, offset=(0.0, 0.0), scale=source.downsample)
        try:
            summary = segment_image(source, predictor, sink, reference, level_pixel_size, model_pixel_size, params,
                                    tissue_only=tissue_only, progress=progress, **chunking)
        except BaseException:
            sink.abort()
            raise
        with stage("geojson"):
            paths = sink.close()
    finally:
        source.close()
    summary.update(
        input=str(path), level=level, level_shape=list(source.shape), level0_shape=list(source.level0_shape),
        downsample=source.downsample, pixel_size=level_pixel_size, outputs={k: str(v) for k, v in paths.items()},
        peak_rss_mib=round(peak_rss_mib(), 1),
    )
    write_text_atomic(Path(out_dir) / f"{stem}_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
