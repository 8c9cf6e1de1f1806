"""Exports: pixel-edge polygons, QuPath GeoJSON, per-nucleus CSV, label maps and overlay, all written atomically."""

from __future__ import annotations

import csv
import json
import uuid

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff
from skimage.draw import polygon as draw_polygon
from skimage.measure import find_contours, regionprops_table
from skimage.segmentation import find_boundaries

from bundle.data.io import read_image, read_label
from bundle.inference.blocks import NucleusBlock
from bundle.inference.sources import ArraySource
from bundle.inference.writers import TileOutputs
from bundle.nuclei import exports
from bundle.nuclei.exports import (
    instance_overlay,
    instance_polygons,
    instances_geojson,
    label_edge_rings,
    ring_area,
    write_instance_map,
)


def rasterise(rings, shape) -> np.ndarray:
    """Pixels whose CENTRE (c + 0.5, r + 0.5) lies inside the rings (skimage.draw.polygon samples integer points)."""
    out = np.zeros(shape, bool)
    for ring in rings:
        rr, cc = draw_polygon(np.asarray(ring)[:, 1] - 0.5, np.asarray(ring)[:, 0] - 0.5, shape)
        out[rr, cc] = True
    return out


def densify(ring: np.ndarray, step: float = 0.25) -> np.ndarray:
    ring = np.asarray(ring, float)
    parts = [np.linspace(a, b, int(np.ceil(np.linalg.norm(b - a) / step)) + 1) for a, b in zip(ring[:-1], ring[1:])]
    return np.concatenate(parts)


# --- the pixel-edge tracer -------------------------------------------------------------------------------------
def test_single_pixel_and_l_shape_by_hand():
    m = np.zeros((3, 3), bool)
    m[1, 1] = True
    (ring,) = mask_rings(m)
    # pixel (1, 1) is the unit square [1, 2] x [1, 2]; interior on the left -> (1,1) (2,1) (2,2) (1,2) (1,1)
    np.testing.assert_array_equal(ring, [[1, 1], [2, 1], [2, 2], [1, 2], [1, 1]])
    assert ring_area(ring) == 1.0
    m = np.zeros((4, 4), bool)
    m[0:3, 0] = True
    m[2, 1] = True  # an L of 4 pixels: 6 corners, area 4
    (ring,) = mask_rings(m)
    assert len(ring) == 7 and ring_area(ring) == 4.0 and (ring[0] == ring[-1]).all()


def test_diagonal_touch_gives_separate_rings_and_holes_are_filled():
    m = np.zeros((4, 4), bool)
    m[0, 0] = m[1, 1] = True
    rings = mask_rings(m)
    assert sorted(ring_area(r) for r in rings) == [1.0, 1.0]
    donut = np.ones((5, 5), bool)
    donut[2, 2] = False
    (ring,) = mask_rings(donut)
    assert ring_area(ring) == 25.0  # exterior only, hole filled (nuclei have no holes)


def mask_rings(mask: np.ndarray) -> list[np.ndarray]:
    """The outer rings of a binary mask's 4-connected components (:func:`label_edge_rings` of the mask as one label)."""
    return label_edge_rings(np.asarray(mask, bool).astype(np.uint8)).get(1, [])


def write_tile(out_dir, stem, image, labels, region, boundary, formats):
    """The engine's writer (bundle.inference.writers.TileOutputs) on one block that is the whole tile."""
    outputs = TileOutputs(out_dir, stem, labels.shape, formats)
    outputs.add(NucleusBlock((0, 0), labels.astype(np.int32), region.astype(np.float32),
                             boundary.astype(np.float32), image))
    return outputs.close(ArraySource(image))


@pytest.fixture(scope="module")
def monuseg_tile(monuseg_dir):
    tile_id = sorted(p.stem for p in (monuseg_dir / "labels").glob("*.png"))[0]
    image = read_image(monuseg_dir / "images" / f"{tile_id}.png")[:256, :256]
    labels = read_label(monuseg_dir / "labels" / f"{tile_id}.png", kind="instance")[:256, :256]
    rng = np.random.default_rng(0)
    region = np.clip((labels > 0) * 0.8 + rng.random(labels.shape) * 0.2, 0, 1)
    boundary = find_boundaries(labels, mode="inner").astype(np.float64) * 0.7
    return image, labels, region, boundary


def test_polygons_match_pixels_exactly_on_monuseg(monuseg_tile):
    _, labels, _, _ = monuseg_tile
    polys = instance_polygons(labels)
    assert sorted(polys) == sorted(np.unique(labels[labels > 0]).tolist())
    for idx, rings in polys.items():
        filled = ndimage.binary_fill_holes(labels == idx, structure=np.ones((3, 3)))
        for ring in rings:
            assert (ring[0] == ring[-1]).all() and ring_area(ring) > 0  # closed, counter-clockwise
        assert sum(ring_area(r) for r in rings) == filled.sum()  # shoelace area == pixel count, exactly
        np.testing.assert_array_equal(rasterise(rings, labels.shape), filled)  # IoU 1


@pytest.mark.parametrize("shape", [(256, 256), (255, 253)])
def test_polygons_of_2x2_block_maps_match_pixels_exactly(monuseg_tile, shape):
    # model-scale labels resized x2 (what the engine exports) take the half-size tracing path; odd sizes end in a
    # half block
    from bundle.nuclei.watershed import upsample_labels

    _, labels, _, _ = monuseg_tile
    blocks = upsample_labels(labels[::2, ::2], shape)
    polys = instance_polygons(blocks)
    assert sorted(polys) == sorted(np.unique(blocks[blocks > 0]).tolist())
    for idx, rings in polys.items():
        filled = ndimage.binary_fill_holes(blocks == idx, structure=np.ones((3, 3)))
        assert sum(ring_area(r) for r in rings) == filled.sum()
        np.testing.assert_array_equal(rasterise(rings, shape), filled)


def test_polygons_lie_within_half_a_pixel_diagonal_of_marching_squares(monuseg_tile):
    # skimage's find_contours (level 0.5, through edge midpoints) as the library reference: same outline, corners cut
    _, labels, _, _ = monuseg_tile
    for idx, rings in instance_polygons(labels).items():
        if len(rings) != 1:
            continue
        contours = find_contours(np.pad(labels == idx, 1).astype(float), 0.5)
        ref = max(contours, key=len)[:, ::-1] - 1 + 0.5  # (row, col) of padded centres -> (x, y) corner frame
        a, b = densify(rings[0]), densify(ref)
        assert max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0]) <= np.sqrt(0.5) / 2 + 0.2


def test_simplified_polygons_stay_close(monuseg_tile):
    _, labels, _, _ = monuseg_tile
    exact = instance_polygons(labels)
    simple = instance_polygons(labels, tolerance=1.0)
    cut = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    checked = 0
    for idx, rings in simple.items():
        mask = labels == idx
        if mask.sum() < 30 or idx in cut:  # 1 px is a large fraction of a tiny nucleus or of a sliver cut by the crop
            continue
        checked += 1
        assert sum(len(r) for r in rings) <= sum(len(r) for r in exact[idx])
        ras = rasterise(rings, labels.shape)
        assert (ras & mask).sum() / (ras | mask).sum() >= 0.9
        assert abs(sum(ring_area(r) for r in rings) - mask.sum()) <= 0.15 * mask.sum()
    assert checked >= 15


# --- GeoJSON and CSV --------------------------------------------------------------------------------------------
def test_geojson_structure_offset_and_scale(monuseg_tile):
    image, labels, region, boundary = monuseg_tile
    base = instances_geojson(labels, region, image, boundary, tile_id="t")
    moved = instances_geojson(labels, region, image, boundary, offset=(1000, 2000), scale=2.0, tile_id="t")
    moved = json.loads(json.dumps(moved, allow_nan=False))  # strict JSON round trip
    assert moved["type"] == "FeatureCollection"
    n = len(np.unique(labels)) - 1
    assert len(moved["features"]) == n
    assert len({f["id"] for f in moved["features"]}) == n
    for f0, f in zip(base["features"], moved["features"]):
        uuid.UUID(f["id"])  # QuPath reads the feature id as a UUID
        assert f["type"] == "Feature"
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus" and len(props["classification"]["color"]) == 3
        m = props["measurements"]
        assert m["instance_id"] == props["instance_id"]
        assert m["area_px"] == (labels == props["instance_id"]).sum()
        assert 0 <= m["mean_region_prob"] <= 1 and 0 <= m["mean_boundary_prob"] <= 1
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        polys = [f["geometry"]["coordinates"]] if f["geometry"]["type"] == "Polygon" else f["geometry"]["coordinates"]
        polys0 = (
            [f0["geometry"]["coordinates"]] if f0["geometry"]["type"] == "Polygon" else f0["geometry"]["coordinates"]
        )
        for poly, poly0 in zip(polys, polys0):
            ring, ring0 = np.asarray(poly[0], float), np.asarray(poly0[0], float)
            assert (ring[0] == ring[-1]).all()
            np.testing.assert_allclose(ring, np.array([1000.0, 2000.0]) + 2.0 * ring0)
        assert m["centroid_x"] == pytest.approx(1000 + 2 * f0["properties"]["measurements"]["centroid_x"])


def test_csv_matches_regionprops(monuseg_tile, tmp_path):
    image, labels, region, boundary = monuseg_tile
    paths = write_tile(tmp_path, "tile-1", image, labels, region, boundary, formats=("csv",))
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    ref = regionprops_table(
        labels,
        intensity_image=np.dstack([image.astype(float), region.astype(np.float32)]),  # the engine keeps float32 maps
        properties=("label", "centroid", "area", "perimeter", "eccentricity", "solidity", "intensity_mean"),
    )
    assert [int(r["id"]) for r in rows] == ref["label"].tolist()
    gray_ref = regionprops_table(labels, intensity_image=image.astype(float) @ [0.299, 0.587, 0.114],
                                 properties=("intensity_mean",))["intensity_mean"]
    col = lambda name: np.array([float(r[name]) for r in rows])  # noqa: E731
    np.testing.assert_allclose(col("centroid_x"), ref["centroid-1"] + 0.5)
    np.testing.assert_allclose(col("centroid_y"), ref["centroid-0"] + 0.5)
    np.testing.assert_array_equal(col("area_px"), ref["area"])
    for name, key in [("perimeter_px", "perimeter"), ("eccentricity", "eccentricity"), ("solidity", "solidity"),
                      ("mean_r", "intensity_mean-0"), ("mean_g", "intensity_mean-1"), ("mean_b", "intensity_mean-2"),
                      ("mean_region_prob", "intensity_mean-3")]:
        np.testing.assert_allclose(col(name), ref[key], rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(col("mean_gray"), gray_ref, rtol=1e-12)
    assert "mean_boundary_prob" in rows[0]


# --- files ------------------------------------------------------------------------------------------------------
def test_tile_outputs_all_formats(monuseg_tile, tmp_path):
    image, labels, region, boundary = monuseg_tile
    paths = write_tile(tmp_path, "TCGA-crop_1", image, labels, region, boundary, formats=exports.FORMATS)
    assert set(paths) == set(exports.FORMATS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files left
    with Image.open(paths["png"]) as im:
        png = np.asarray(im)
    np.testing.assert_array_equal(png, labels)
    tif = tifffile.imread(paths["tiff"])
    assert tif.dtype == np.uint16
    np.testing.assert_array_equal(tif, labels)
    geo = json.loads(paths["geojson"].read_text())
    assert len(geo["features"]) == len(np.unique(labels)) - 1
    with Image.open(paths["overlay"]) as im:
        overlay = np.asarray(im.convert("RGB"))
    edge = find_boundaries(labels, mode="inner")
    assert (overlay[edge] == exports.PRED_RGB).all()
    np.testing.assert_array_equal(overlay[~edge], image[~edge])  # the tile itself is not stretched


def test_instance_overlay_shows_the_line_between_touching_nuclei():
    labels = np.zeros((6, 8), np.int32)
    labels[1:5, 1:4], labels[1:5, 4:7] = 1, 2
    out = instance_overlay(np.full((6, 8, 3), 200, np.uint8), labels)
    assert (out[2, 3] == exports.PRED_RGB).all() and (out[2, 4] == exports.PRED_RGB).all()


def test_label_map_bit_depth(tmp_path):
    many = np.arange(70000, dtype=np.int64).reshape(280, 250)
    with pytest.raises(ValueError, match="16-bit PNG"):
        write_instance_map(tmp_path / "x.png", many)
    tif = tifffile.imread(write_instance_map(tmp_path / "x.tif", many))
    assert tif.dtype == np.uint32 and (tif == many).all()
    with pytest.raises(ValueError, match=".png, .tif"):
        write_instance_map(tmp_path / "x.jpg", many[:4, :4])


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError, match="disk full"):
        write_instance_map(tmp_path / "x.tif", np.ones((4, 4), np.int32))
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_one_clear_error(monuseg_tile, tmp_path):
    image, labels, region, boundary = monuseg_tile
    with pytest.raises(ValueError, match="unknown output format"):
        TileOutputs(tmp_path, "t", labels.shape, formats=("png", "jpeg"))
    with pytest.raises(ValueError, match="region_prob"):
        exports.nucleus_table(image, labels, region[:10])
    with pytest.raises(ValueError, match="image_rgb"):
        exports.nucleus_table(image.astype(np.float32), labels, region)
    with pytest.raises(ValueError, match="instances"):
        exports.nucleus_table(image, labels.astype(float), region)
    with pytest.raises(ValueError, match="scale"):
        exports.nucleus_table(image, labels, region, boundary, scale=0)
    assert list(tmp_path.iterdir()) == []
