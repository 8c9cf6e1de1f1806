"""Slides through MONAI's WSI reader (bundle/inference/slide.py): region reads equal MONAI's tifffile reader, pyramid levels,
and slide mode on a pyramidal TIFF built from MoNuSeg tiles: one GeoJSON in level-0 pixels, nuclei de-duplicated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from monai.data import WSIReader

from bundle.core.errors import DataError
from bundle.data.io import read_image
from bundle.inference.chunks import SlidingWindowPredictor
from bundle.inference.slide import (
    RegionTiffWSIReader,
    WSISource,
    is_slide,
    open_source,
    read_tiff_region,
    segment_slide,
)
from bundle.inference.sources import ArraySource
from bundle.model.contract import value

REF = value("reinhard_reference")  # the shipped weights' reference (configs/model.json)
UM_PER_CM = 1e4


class DarkIsNucleus(torch.nn.Module):
    """Stand-in network (DS-HFN's eval contract): nucleus = dark standardised gray."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = torch.sigmoid(-6.0 * (x + 0.6))
        return torch.cat([region, torch.zeros_like(region), region], 1)


def write_pyramid(path, image, levels=2, tile=256, pixel_size=0.25, subifds=False):
    """Tiled zlib pyramid: level k = image[::2**k, ::2**k], as reduced-resolution pages or SubIFDs."""
    kw = dict(tile=(tile, tile), compression="zlib", photometric="rgb", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, subifds=levels - 1 if subifds else None, resolution=(UM_PER_CM / pixel_size,) * 2, **kw)
        for k in range(1, levels):
            size = pixel_size * 2**k
            tw.write(image[:: 2**k, :: 2**k], subfiletype=1, resolution=(UM_PER_CM / size,) * 2, **kw)
    return path


@pytest.fixture(scope="module")
def monuseg_slide(monuseg_dir, tmp_path_factory):
    """2000 x 2000 slide: four MoNuSeg tiles 2 x 2, two levels (0.25 and 0.5 um/px)."""
    tiles = [read_image(p) for p in sorted((monuseg_dir / "images").glob("*.png"))[:4]]
    image = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
    return write_pyramid(tmp_path_factory.mktemp("slide") / "mosaic.tif", image), image


def test_region_reader_equals_monai_tifffile_reader(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (700, 900, 3), np.uint8)
    path = write_pyramid(tmp_path / "p.tif", image, tile=128)
    ours, monai = RegionTiffWSIReader(), WSIReader(backend="tifffile")
    wsi, wsi_m = ours.read(str(path)), monai.read(str(path))
    assert ours.get_level_count(wsi) == monai.get_level_count(wsi_m) == 2
    for level in (0, 1):
        assert ours.get_size(wsi, level) == monai.get_size(wsi_m, level)
        assert ours.get_mpp(wsi, level) == pytest.approx(monai.get_mpp(wsi_m, level))
        for loc, size in [((0, 0), (50, 60)), ((130, 250), (129, 300)), ((256, 256), (128, 128)), ((600, 10), (100, 380))]:
            a, meta = ours.get_data(wsi, location=loc, size=size, level=level)
            b, _ = monai.get_data(wsi_m, location=loc, size=size, level=level)
            np.testing.assert_array_equal(a, b)
            ds = 2**level
            y, x = loc[0] // ds, loc[1] // ds
            np.testing.assert_array_equal(np.moveaxis(a, 0, -1), image[::ds, ::ds][y : y + size[0], x : x + size[1]])
    # a SubIFD pyramid: MONAI's reader sees one level, ours both
    sub = write_pyramid(tmp_path / "sub.tif", image, tile=128, subifds=True)
    assert monai.get_level_count(monai.read(str(sub))) == 1
    wsi_s = ours.read(str(sub))
    assert ours.get_level_count(wsi_s) == 2 and ours.get_downsample_ratio(wsi_s, 1) == 2.0
    np.testing.assert_array_equal(read_tiff_region(wsi_s.series[0].levels[1].keyframe, 10, 60, 20, 90), image[::2, ::2][10:60, 20:90])


def test_strips_and_sources(tmp_path, tnbc_dir):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (300, 200, 3), np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", image, rowsperstrip=64, compression="zlib", photometric="rgb")
    source = open_source(tmp_path / "strips.tif")
    assert isinstance(source, WSISource) and source.shape == (300, 200) and not is_slide(tmp_path / "strips.tif")
    np.testing.assert_array_equal(source.read(50, 190, 30, 170), image[50:190, 30:170])
    png = open_source(tnbc_dir / "images" / "01_1.png")
    assert isinstance(png, ArraySource) and png.shape == (512, 512)
    data = (tmp_path / "strips.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.tif"):
        s = WSISource(tmp_path / "cut.tif")
        s.read(0, 300, 0, 200)
    with pytest.raises(DataError, match="level 3"):
        WSISource(tmp_path / "strips.tif", level=3)


def test_vendor_slide_without_openslide_is_a_clear_error(tmp_path):
    pytest.importorskip("tifffile")
    try:
        import openslide  # noqa: F401

        pytest.skip("OpenSlide is installed")
    except ImportError:
        pass
    (tmp_path / "s.svs").write_bytes(b"II*\x00")
    with pytest.raises(DataError, match="openslide"):
        WSISource(tmp_path / "s.svs")


def test_slide_mode_one_geojson_in_level0_pixels_deduplicated(monuseg_slide, tmp_path):
    path, image = monuseg_slide
    assert is_slide(path)
    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=64, sw_batch_size=16, overlap=0.25)
    results = {}
    for name, chunk in (("chunked", 384), ("whole", 4096)):
        out = tmp_path / name
        summary = segment_slide(path, out, predictor, REF, level=1, model_pixel_size=0.5, roi=64, chunk=chunk, halo=24,
                                post_chunk=300)  # level 1 at the model scale: 9 chunks of 384 px
        assert sorted(p.name for p in out.iterdir()) == ["mosaic.geojson", "mosaic_nuclei.csv", "mosaic_summary.json"]
        results[name] = (summary, json.loads((out / "mosaic.geojson").read_text()))
    (s_chunk, geo), (s_whole, geo_whole) = results["chunked"], results["whole"]
    assert s_chunk["chunks"] == 9 and s_whole["chunks"] == 1
    assert s_chunk["pixel_size"] == pytest.approx(0.5) and s_chunk["downsample"] == 2.0  # from the TIFF tags
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == s_chunk["nuclei"] > 300
    assert s_chunk["truncated"] == 0
    # de-duplicated: the same nuclei as a single pass over the level, none twice
    def centroids(g):
        return sorted((round(f["properties"]["measurements"]["centroid_x"], 3),
                       round(f["properties"]["measurements"]["centroid_y"], 3)) for f in g["features"])

    c = centroids(geo)
    assert len(set(c)) == len(c) and c == centroids(geo_whole)
    assert len({f["id"] for f in geo["features"]}) == len(geo["features"])
    # level-0 frame: coordinates span the 2000 px slide, areas are 4x the level-1 pixel counts, and every nucleus
    # sits on dark (haematoxylin) level-0 pixels
    xy = np.concatenate([np.asarray(f["geometry"]["coordinates"][0], float) for f in geo["features"]
                         if f["geometry"]["type"] == "Polygon"])
    assert xy.min() >= 0 and xy.max() <= 2000 and xy.max() > 1900
    gray = image.astype(float) @ [0.299, 0.587, 0.114]
    for f in geo["features"][:: max(1, len(geo["features"]) // 50)]:
        ring = np.asarray(f["geometry"]["coordinates"][0], float) if f["geometry"]["type"] == "Polygon" else None
        if ring is None:
            continue
        area = 0.5 * abs(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[1:, 0], ring[:-1, 1]))
        assert area == pytest.approx(4 * f["properties"]["measurements"]["area_px"])
        cx, cy = f["properties"]["measurements"]["centroid_x"], f["properties"]["measurements"]["centroid_y"]
        x0, y0 = int(ring[:, 0].min()), int(ring[:, 1].min())
        x1, y1 = int(ring[:, 0].max()), int(ring[:, 1].max())
        assert x0 <= cx <= x1 and y0 <= cy <= y1
        assert gray[y0:y1, x0:x1].mean() < gray.mean()
