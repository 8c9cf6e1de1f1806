"""Per-tile outputs a pathologist opens: instance label map, QuPath GeoJSON, per-nucleus CSV and a contour overlay.

Coordinate frame (shared by the GeoJSON and the CSV, QuPath's convention): x = column, y = row, origin at the
top-left CORNER of the tile, pixel (r, c) covers [c, c+1] x [r, r+1]; output = ``offset + scale * tile``,
``offset = (x, y)`` of the tile's top-left corner in slide pixels and ``scale`` = slide pixels per tile pixel
(the tile's downsample). So a pixel centre is at ``+ 0.5`` and the CSV centroid is regionprops' centroid + 0.5.

Polygons are traced along pixel EDGES (:func:`pixel_edge_rings`), not through pixel centres: the polygon's area
equals the nucleus pixel count exactly and rasterising it back (``skimage.draw.polygon`` at pixel centres) gives
the same pixels. ``skimage.measure.find_contours`` (marching squares at level 0.5) cuts every corner and loses
about half a pixel per boundary pixel (a 1-pixel nucleus becomes a 0.5-area diamond), too much for small nuclei.

Every file is written atomically (temp file in the same folder, then ``os.replace``) via :mod:`bundle.io`.
"""

from __future__ import annotations

import csv
import io as _io
import json
import math
import os
import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.measure import approximate_polygon, regionprops_table
from skimage.segmentation import find_boundaries

from bundle.io import atomic_write, write_png_atomic, write_text_atomic
from bundle.visualize import PRED_RGB

__all__ = [
    "FORMATS",
    "GRAY_WEIGHTS",
    "NUCLEUS_CLASS",
    "pixel_edge_rings",
    "ring_area",
    "instance_polygons",
    "nucleus_table",
    "instances_geojson",
    "instance_overlay",
    "write_instance_map",
    "write_tile_outputs",
]

FORMATS = ("png", "tiff", "geojson", "csv", "overlay")
#: ITU-R BT.601 luma, the grayscale the network sees (bundle.transforms ``weights="bt601"``)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
#: QuPath classification written on every feature
NUCLEUS_CLASS = {"name": "Nucleus", "color": list(PRED_RGB)}
# fixed namespace so the same tile and nucleus always get the same feature UUID (QuPath reads "id" as a UUID)
_UUID_NAMESPACE = uuid.UUID("5f0c7a8e-6a52-4d0e-9b1d-0d5e4a1c2b77")


# ----------------------------------------------------------------------------------------------------------------
# polygons
# ----------------------------------------------------------------------------------------------------------------
def ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a closed ring (K+1, 2) of (x, y); > 0 = counter-clockwise in these coordinates."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _boundary_edges(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed unit edges between mask and non-mask pixels, interior on the LEFT: (start, end) (E, 2) (x, y).

    With the interior on the left of every edge, each outer ring has a positive shoelace area (counter-clockwise
    in x/y values as RFC 7946 asks; it looks clockwise on screen because image y points down).
    """
    p = np.pad(mask, 1)
    # horizontal edges on the line y = r between padded rows r-1 (a) and r (b)
    a, b = p[:-1, :], p[1:, :]
    r, c = np.nonzero(b & ~a)  # interior below: walk +x
    s1, e1 = np.stack([c, r + 1], 1), np.stack([c + 1, r + 1], 1)
    r, c = np.nonzero(a & ~b)  # interior above: walk -x
    s2, e2 = np.stack([c + 1, r + 1], 1), np.stack([c, r + 1], 1)
    # vertical edges on the line x = c between padded columns c-1 (left) and c (right)
    left, right = p[:, :-1], p[:, 1:]
    r, c = np.nonzero(left & ~right)  # interior on the left (smaller x): walk +y
    s3, e3 = np.stack([c + 1, r], 1), np.stack([c + 1, r + 1], 1)
    r, c = np.nonzero(right & ~left)  # interior on the right: walk -y
    s4, e4 = np.stack([c + 1, r + 1], 1), np.stack([c + 1, r], 1)
    # padded -> unpadded coordinates
    return np.concatenate([s1, s2, s3, s4]) - 1, np.concatenate([e1, e2, e3, e4]) - 1


def pixel_edge_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outer rings along the pixel edges of each 4-connected component of ``mask`` (holes filled first).

    Returns a list of (K+1, 2) int arrays of (x, y) pixel-corner vertices, first == last, counter-clockwise
    (positive :func:`ring_area`), one vertex per corner (collinear vertices dropped). ``ring_area`` of each ring
    equals the pixel count of its component after hole filling.

    Hand-written because scikit-image has no pixel-edge tracer (``find_contours`` goes through edge midpoints).
    Where two pixels touch only diagonally the tracer turns left, i.e. keeps them apart (4-connectivity); holes
    are filled with 8-connected background, the dual choice, so every remaining ring is an outer boundary.
    """
    mask = ndimage.binary_fill_holes(np.asarray(mask, bool), structure=np.ones((3, 3), bool))
    if not mask.any():
        return []
    starts, ends = _boundary_edges(mask)
    width = int(max(starts[:, 0].max(), ends[:, 0].max())) + 2
    key = lambda x, y: (int(y) + 1) * width + int(x) + 1  # noqa: E731  vertex -> int, x >= -1
    out: dict[int, list[int]] = {}
    for i, (x, y) in enumerate(starts):
        out.setdefault(key(x, y), []).append(i)
    direction = ends - starts

    def successor(edge: int) -> int:
        candidates = out[key(*ends[edge])]
        if len(candidates) == 1:
            return candidates[0]
        # pinch vertex (two pixels touching diagonally): the left turn, cross(d_in, d_out) > 0, keeps them apart;
        # this makes "successor" a permutation of the edges whose cycles are the rings
        d = direction[edge]
        return max(candidates, key=lambda j: d[0] * direction[j][1] - d[1] * direction[j][0])

    used = np.zeros(len(starts), bool)
    rings = []
    for first in range(len(starts)):
        if used[first]:
            continue
        ring = [starts[first]]
        edge = first
        while not used[edge]:
            used[edge] = True
            ring.append(ends[edge])
            edge = successor(edge)
        rings.append(_drop_collinear(np.asarray(ring, dtype=np.int64)))
    return [r for r in rings if ring_area(r) > 0]


def _drop_collinear(ring: np.ndarray) -> np.ndarray:
    """Keep only the vertices where the direction changes; the ring stays closed."""
    pts = ring[:-1]
    d_in = pts - np.roll(pts, 1, axis=0)
    d_out = np.roll(pts, -1, axis=0) - pts
    corner = (d_in != d_out).any(axis=1)
    pts = pts[corner]
    return np.concatenate([pts, pts[:1]])


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker (``skimage.measure.approximate_polygon``); the exact ring if simplifying degenerates it."""
    if tolerance <= 0:
        return ring
    simple = approximate_polygon(ring.astype(np.float64), tolerance)
    if len(simple) < 4 or ring_area(simple) <= 0:
        return ring
    return simple


def instance_polygons(instances: np.ndarray, tolerance: float = 0.0) -> dict[int, list[np.ndarray]]:
    """``{instance id: [ring, ...]}`` of :func:`pixel_edge_rings` in TILE coordinates, one ring per 4-connected part.

    ``tolerance`` > 0 simplifies every ring with Douglas-Peucker (max deviation in pixels; 0 = exact).
    """
    instances = np.asarray(instances)
    polys: dict[int, list[np.ndarray]] = {}
    for idx, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        origin = np.array([box[1].start, box[0].start])  # (x, y) of the crop
        rings = pixel_edge_rings(instances[box] == idx)
        polys[idx] = [_simplify(r + origin, tolerance) for r in rings]
    return polys


# ----------------------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------------------
def _check_inputs(image_rgb, instances, region_prob, boundary_prob) -> tuple[np.ndarray, ...]:
    inst = np.asarray(instances)
    if inst.ndim != 2 or inst.dtype.kind not in "ui":
        raise ValueError(f"exports: instances must be a 2D integer (H, W) map, got {inst.dtype} {inst.shape}")
    if inst.size and inst.min() < 0:
        raise ValueError("exports: instances has negative ids; use 0 for background and 1..N for nuclei")
    shape = inst.shape
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.shape != (*shape, 3) or img.dtype != np.uint8:
        raise ValueError(
            f"exports: image_rgb must be uint8 (H, W, 3) matching instances {shape}, got {img.dtype} {img.shape}"
        )
    maps = []
    for name, m in (("region_prob", region_prob), ("boundary_prob", boundary_prob)):
        if m is None:
            maps.append(None)
            continue
        m = np.asarray(m, dtype=np.float64)
        if m.shape != shape:
            raise ValueError(f"exports: {name} has shape {m.shape}, instances has {shape}")
        if not np.isfinite(m).all():
            raise ValueError(f"exports: {name} contains NaN or infinite values")
        maps.append(m)
    return inst.astype(np.int64, copy=False), img, maps[0], maps[1]


def _check_frame(offset: Sequence[float], scale: float) -> tuple[float, float, float]:
    if len(offset) != 2 or not all(math.isfinite(float(v)) for v in offset):
        raise ValueError(f"exports: offset must be a finite (x, y) pair, got {offset!r}")
    if not (math.isfinite(float(scale)) and scale > 0):
        raise ValueError(f"exports: scale must be a positive number, got {scale!r}")
    return float(offset[0]), float(offset[1]), float(scale)


def nucleus_table(
    image_rgb: np.ndarray,
    instances: np.ndarray,
    region_prob: np.ndarray,
    boundary_prob: np.ndarray | None = None,
    offset: Sequence[float] = (0, 0),
    scale: float = 1.0,
) -> dict[str, np.ndarray]:
    """Per-nucleus measurements (``skimage.measure.regionprops_table``), one row per instance id, ordered by id.

    Columns: ``id``; ``centroid_x``, ``centroid_y`` in the output frame (module docstring: offset + scale *
    (regionprops centroid + 0.5)); ``area_px``, ``perimeter_px`` (tile pixels, regionprops ``area`` and
    ``perimeter``); ``eccentricity``; ``solidity``; ``mean_r``, ``mean_g``, ``mean_b`` (each RGB channel,
    0..255) and ``mean_gray`` (BT.601 luma of the RGB tile, 0..255); ``mean_region_prob``; and
    ``mean_boundary_prob`` when ``boundary_prob`` is given.
    """
    inst, img, region, boundary = _check_inputs(image_rgb, instances, region_prob, boundary_prob)
    ox, oy, s = _check_frame(offset, scale)
    gray = img.astype(np.float64) @ np.asarray(GRAY_WEIGHTS)
    planes = [img[..., 0], img[..., 1], img[..., 2], gray, region] + ([boundary] if boundary is not None else [])
    stack = np.stack([np.asarray(p, np.float64) for p in planes], axis=-1)
    props = regionprops_table(
        inst,
        intensity_image=stack,
        properties=("label", "centroid", "area", "perimeter", "eccentricity", "solidity", "intensity_mean"),
    )
    table = {
        "id": props["label"].astype(np.int64),
        "centroid_x": ox + s * (props["centroid-1"] + 0.5),
        "centroid_y": oy + s * (props["centroid-0"] + 0.5),
        "area_px": props["area"].astype(np.int64),
        "perimeter_px": props["perimeter"],
        "eccentricity": props["eccentricity"],
        "solidity": props["solidity"],
        "mean_r": props["intensity_mean-0"],
        "mean_g": props["intensity_mean-1"],
        "mean_b": props["intensity_mean-2"],
        "mean_gray": props["intensity_mean-3"],
        "mean_region_prob": props["intensity_mean-4"],
    }
    if boundary is not None:
        table["mean_boundary_prob"] = props["intensity_mean-5"]
    return table


def _table_csv(table: dict[str, np.ndarray]) -> str:
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(table))
    for row in zip(*table.values()):
        # repr() of a Python float round-trips exactly
        writer.writerow([int(v) if isinstance(v, (np.integer, int)) else repr(float(v)) for v in row])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# GeoJSON
# ----------------------------------------------------------------------------------------------------------------
def _coord(v: float) -> int | float:
    return int(v) if float(v).is_integer() else round(float(v), 4)


def instances_geojson(
    instances: np.ndarray,
    region_prob: np.ndarray,
    image_rgb: np.ndarray | None = None,
    boundary_prob: np.ndarray | None = None,
    *,
    offset: Sequence[float] = (0, 0),
    scale: float = 1.0,
    tolerance: float = 0.0,
    tile_id: str = "tile",
    table: dict[str, np.ndarray] | None = None,
) -> dict:
    """A GeoJSON FeatureCollection with one QuPath detection per nucleus (File > Import objects in QuPath >= 0.4).

    Each Feature: ``id`` = a UUID derived from ``tile_id`` and the instance id (QuPath keeps it as the object ID);
    ``geometry`` = Polygon (MultiPolygon when a nucleus has diagonally-touching parts) traced along pixel edges, in
    the output frame ``offset + scale * tile`` (module docstring), optionally simplified (``tolerance`` in tile
    pixels, 0 = exact); ``properties`` = ``objectType: "detection"``, ``classification`` :data:`NUCLEUS_CLASS`,
    ``instance_id`` and ``measurements`` {instance_id, area_px, centroid_x, centroid_y, mean_region_prob[,
    mean_boundary_prob]} (QuPath reads ``measurements`` as a name -> number map).
    """
    inst = np.asarray(instances)
    if image_rgb is None:
        image_rgb = np.zeros((*inst.shape, 3), np.uint8)
    if table is None:
        table = nucleus_table(image_rgb, inst, region_prob, boundary_prob, offset, scale)
    ox, oy, s = _check_frame(offset, scale)
    polys = instance_polygons(inst, tolerance)
    keys = [k for k in ("area_px", "centroid_x", "centroid_y", "mean_region_prob", "mean_boundary_prob") if k in table]
    features = []
    for row, idx in enumerate(table["id"].tolist()):
        rings = [[[_coord(ox + s * x), _coord(oy + s * y)] for x, y in ring] for ring in polys[idx]]
        geometry = (
            {"type": "Polygon", "coordinates": [rings[0]]}
            if len(rings) == 1
            else {"type": "MultiPolygon", "coordinates": [[r] for r in rings]}
        )
        measurements = {"instance_id": int(idx), **{k: float(table[k][row]) for k in keys}}
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{tile_id}/{idx}")),
                "geometry": geometry,
                "properties": {
                    "objectType": "detection",
                    "classification": dict(NUCLEUS_CLASS),
                    "instance_id": int(idx),
                    "measurements": measurements,
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


# ----------------------------------------------------------------------------------------------------------------
# images
# ----------------------------------------------------------------------------------------------------------------
def instance_overlay(image_rgb: np.ndarray, instances: np.ndarray, color: Sequence[int] = PRED_RGB) -> np.ndarray:
    """The RGB tile (unchanged, no contrast stretch) with each nucleus' inner contour in ``color``; (H, W, 3) uint8.

    Drawn from the instance map (``find_boundaries(mode="inner")``), not a binary mask, so the line between two
    touching nuclei shows (``bundle.visualize.contour_overlay`` takes binary masks and would hide it).
    """
    img = np.asarray(image_rgb)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    inst = np.asarray(instances)
    if img.shape[:2] != inst.shape or img.dtype != np.uint8:
        raise ValueError(f"instance_overlay: image {img.dtype} {img.shape} does not match instances {inst.shape}")
    out = img.copy()
    out[find_boundaries(inst, mode="inner", connectivity=1, background=0)] = np.asarray(color, np.uint8)
    return out


def write_instance_map(path: str | os.PathLike, instances: np.ndarray) -> Path:
    """Write the instance map atomically: ``.png`` -> uint16 PNG (ids must be <= 65535); ``.tif``/``.tiff`` ->
    zlib-compressed TIFF, uint16 (uint32 when an id exceeds 65535)."""
    path = Path(path)
    inst = np.asarray(instances)
    if inst.ndim != 2 or inst.dtype.kind not in "ui" or (inst.size and inst.min() < 0):
        raise ValueError(
            f"write_instance_map({path}): expected a 2D non-negative integer map, got {inst.dtype} {inst.shape}"
        )
    top = int(inst.max()) if inst.size else 0
    suffix = path.suffix.lower()
    if suffix == ".png":
        if top > np.iinfo(np.uint16).max:
            raise ValueError(f"write_instance_map({path}): {top} nuclei do not fit a 16-bit PNG; write a .tif instead")
        write_png_atomic(path, inst.astype(np.uint16))
    elif suffix in (".tif", ".tiff"):
        import tifffile

        arr = inst.astype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32)
        atomic_write(path, lambda tmp: tifffile.imwrite(tmp, arr, compression="zlib"))
    else:
        raise ValueError(f"write_instance_map({path}): use a .png, .tif or .tiff file name")
    return path


_TILE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def write_tile_outputs(
    out_dir: str | os.PathLike,
    tile_id: str,
    image_rgb: np.ndarray,
    instances: np.ndarray,
    region_prob: np.ndarray,
    boundary_prob: np.ndarray | None = None,
    formats: Sequence[str] = ("png", "geojson", "csv", "overlay"),
    offset: Sequence[float] = (0, 0),
    scale: float = 1.0,
    tolerance: float = 0.0,
) -> dict[str, Path]:
    """Write the chosen per-tile outputs into ``out_dir`` atomically and return ``{format: path}``.

    Files: ``png`` -> ``<tile_id>_instances.png`` (uint16 label map), ``tiff`` -> ``<tile_id>_instances.tif``,
    ``geojson`` -> ``<tile_id>.geojson`` (:func:`instances_geojson`), ``csv`` -> ``<tile_id>_nuclei.csv``
    (:func:`nucleus_table`), ``overlay`` -> ``<tile_id>_overlay.png`` (:func:`instance_overlay`).
    ``offset`` = (x, y) of the tile's top-left corner in slide pixels and ``scale`` = slide pixels per tile pixel,
    applied to GeoJSON coordinates and CSV centroids; the label map and overlay stay in tile pixels.
    """
    if not isinstance(tile_id, str) or not _TILE_ID.match(tile_id):
        raise ValueError(
            f"write_tile_outputs: tile_id {tile_id!r} must be a plain file name stem "
            "(letters, digits, '.', '_', '+', '-')"
        )
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"write_tile_outputs: unknown format(s) {unknown}; choose from {FORMATS}")
    inst, img, region, boundary = _check_inputs(image_rgb, instances, region_prob, boundary_prob)
    _check_frame(offset, scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths: dict[str, Path] = {}
    table = None
    if "csv" in formats or "geojson" in formats:
        table = nucleus_table(img, inst, region, boundary, offset, scale)
    if "png" in formats:
        paths["png"] = write_instance_map(out_dir / f"{tile_id}_instances.png", inst)
    if "tiff" in formats:
        paths["tiff"] = write_instance_map(out_dir / f"{tile_id}_instances.tif", inst)
    if "geojson" in formats:
        collection = instances_geojson(
            inst, region, img, boundary, offset=offset, scale=scale, tolerance=tolerance, tile_id=tile_id, table=table
        )
        paths["geojson"] = out_dir / f"{tile_id}.geojson"
        write_text_atomic(paths["geojson"], json.dumps(collection, separators=(",", ":"), allow_nan=False))
    if "csv" in formats:
        paths["csv"] = out_dir / f"{tile_id}_nuclei.csv"
        write_text_atomic(paths["csv"], _table_csv(table))
    if "overlay" in formats:
        paths["overlay"] = out_dir / f"{tile_id}_overlay.png"
        write_png_atomic(paths["overlay"], instance_overlay(img, inst))
    return paths
