"""
Nuclei from the network's maps, block by block: the chunk's native core is cut into post-processing blocks (``post_chunk`` native px); each block runs
the watershed (:func:`bundle.nuclei.watershed.instances_from_maps`) on the block plus ``post_halo`` pixels of the exact
maps and keeps only the nuclei whose centroid lies in the block. The blocks partition the image, so every
nucleus is kept exactly once; a nucleus crossing a block border is segmented whole inside the halo (the halo is
much wider than a nucleus), so none is cut. The nucleus table, GeoJSON features and the instance label map are
filled block by block (:class:`TileOutputs`, :class:`bundle.inference.slide.SlideOutputs`), the GeoJSON and CSV streamed
to disk, the overlay and TIFF label map written tile by tile, so memory stays bounded by the chunk size; only a
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from bundle.inference.chunks import ChunkMaps, maps_to_native
from bundle.inference.timing import stage
from bundle.nuclei.watershed import (
    WatershedParams,
    instances_from_maps,
    nearest_index,
    relabel_consecutive,
)

logger = logging.getLogger(__name__)


@dataclass
class NucleusBlock:
    """The nuclei OWNED by one post-processing block (centroid inside its core), cropped to the block's window.

    ``origin`` = native (y, x) of the window; ``instances`` (h, w) int32 with local ids 1..n (non-owned nuclei
    erased); ``region``/``boundary`` native probability maps and ``rgb`` over the same window; ``truncated``:
    owned nuclei touching the window edge inside the image (their shape may be cut; should be 0).
    """

    origin: tuple[int, int]
    instances: np.ndarray
    region: np.ndarray
    boundary: np.ndarray
    rgb: np.ndarray
    truncated: int = 0

    @property
    def count(self) -> int:
        return int(self.instances.max(initial=0))


def _centroids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column centroids (pixel index coordinates) of ids 1..max, via bincount over the foreground pixels
    (ndimage is per label)."""
    flat = instances.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    n = int(flat.max(initial=0)) + 1
    rows, cols = np.divmod(fg, instances.shape[1])
    area = np.bincount(lab, minlength=n).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(lab, rows, n) / area, np.bincount(lab, cols, n) / area


def _split(interval: tuple[int, int], size: int) -> list[tuple[int, int]]:
    a, b = interval
    n = max(1, math.ceil((b - a) / size))
    edges = [a + round(i * (b - a) / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n) if edges[i + 1] > edges[i]]


#: where the watershed runs: on the network's model-scale maps, or on the maps upsampled to the native grid
POST_SCALES = ("model", "native")


def segment_blocks(
    maps: ChunkMaps,
    native_shape: tuple[int, int],
    model_shape: tuple[int, int],
    params: WatershedParams,
    post_chunk: int = 1024,
    post_halo: int = 96,
    post_scale: str = "model",
) -> Iterator[NucleusBlock]:
    """Cut ``maps``' native core into blocks of at most ``post_chunk`` pixels; per block (plus ``post_halo``
    pixels), run the watershed and keep the nuclei whose centroid lies in the block.

    ``post_scale="model"`` (default): the watershed runs on the network's own maps at model scale and the labels
    are brought to the native grid by nearest-exact resizing (:func:`bundle.nuclei.watershed.upsample_labels`), 4x
    fewer pixels for 40x tiles; ``"native"``: on the maps upsampled to native size (bilinear). Either way the
    block carries the bilinear native maps for the per-nucleus measurements.
    """
    if post_scale not in POST_SCALES:
        raise ValueError(f"post_scale must be one of {POST_SCALES}, got {post_scale!r}")
    gy, gx = maps.y, maps.x
    if maps.skipped:
        return
    for by in _split(gy.native_core, post_chunk):
        for bx in _split(gx.native_core, post_chunk):
            wy = (max(gy.native_exact[0], by[0] - post_halo), min(gy.native_exact[1], by[1] + post_halo))
            wx = (max(gx.native_exact[0], bx[0] - post_halo), min(gx.native_exact[1], bx[1] + post_halo))
            with stage("maps to native"):
                up = maps_to_native([maps.region, maps.boundary], wy, wx, gy.exact, gx.exact, native_shape, model_shape)
            with stage("watershed"):
                inst, truncated = _block_instances(maps, up, wy, wx, by, bx, native_shape, model_shape, params, post_scale)
            ry0, rx0 = gy.native_read[0], gx.native_read[0]
            rgb = maps.rgb[wy[0] - ry0 : wy[1] - ry0, wx[0] - rx0 : wx[1] - rx0]
            yield NucleusBlock((wy[0], wx[0]), inst, up[0], up[1], rgb, truncated)


def _block_instances(maps, up, wy, wx, by, bx, native_shape, model_shape, params, post_scale):
    """The watershed of one block's window and the nuclei it owns (:func:`segment_blocks`): (instances, truncated)."""
    gy, gx = maps.y, maps.x
    if post_scale == "native":
        inst = instances_from_maps(up[0], up[1], params)
        cy, cx = _centroids(inst)
        cy, cx = cy + wy[0], cx + wx[0]
    else:
        # model pixels nearest to the window's native pixels: among its bilinear taps, so inside ``exact``
        iy = nearest_index(native_shape[0], model_shape[0], *wy) - gy.exact[0]
        ix = nearest_index(native_shape[1], model_shape[1], *wx) - gx.exact[0]
        sy, sx = slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1)
        inst = instances_from_maps(maps.region[sy, sx], maps.boundary[sy, sx], params)
        # ownership from the model-scale centroid mapped to native pixels (a model pixel's native pixels
        # are centred there): the same in every block that holds the nucleus, 4x fewer pixels to sum
        cy, cx = _centroids(inst)
        cy = (cy + sy.start + gy.exact[0] + 0.5) * (native_shape[0] / model_shape[0]) - 0.5
        cx = (cx + sx.start + gx.exact[0] + 0.5) * (native_shape[1] / model_shape[1]) - 0.5
    owned = (cy >= by[0]) & (cy < by[1]) & (cx >= bx[0]) & (cx < bx[1])
    owned[0] = False
    inst = relabel_consecutive(np.where(owned[inst], inst, 0))
    if post_scale == "model":
        inst = inst[iy - iy[0]][:, ix - ix[0]]
    truncated = 0
    if inst.any():
        edges = []
        if wy[0] > 0:
            edges.append(inst[0])
        if wy[1] < native_shape[0]:
            edges.append(inst[-1])
        if wx[0] > 0:
            edges.append(inst[:, 0])
        if wx[1] < native_shape[1]:
            edges.append(inst[:, -1])
        truncated = len(np.unique(np.concatenate(edges))[1:]) if edges else 0
    return inst, truncated
