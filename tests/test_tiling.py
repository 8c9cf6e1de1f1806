"""The chunked engine (bundle/inference/): colour maths vs scikit-image, resampling vs PyTorch/MONAI, chunk
geometry, stitched maps vs a whole-image pass, nuclei on chunk borders, outputs, bounded memory, folder mode."""

from __future__ import annotations

import csv
import json
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from PIL import Image
from skimage.color import lab2rgb, rgb2lab
from skimage.draw import disk
from skimage.draw import polygon as draw_polygon

from bundle.core.errors import DataError
from bundle.data.io import read_image
from bundle.data.scale import ToModelScaled
from bundle.data.transforms import Grayscale, ReinhardNormalize
from bundle.inference.chunks import (
    SlidingWindowPredictor,
    _blur_radius,
    chunk_grid,
    model_size,
    predict_chunks,
    resample_matrix,
    to_model_scale,
)
from bundle.inference.colour import (
    image_statistics,
    lab_planes,
    reinhard_gray,
    rgb_planes,
)
from bundle.inference.pipeline import segment_image
from bundle.inference.sources import ArraySource
from bundle.inference.writers import NucleusStream, TileOutputs
from bundle.model.contract import value
from bundle.model.network import DSHFN
from bundle.nuclei.watershed import WatershedParams

REF = value("reinhard_reference")  # the shipped weights' reference (configs/model.json)
#: model scale the synthetic disks, chunks and counts below are sized for (um/px)
MODEL = 0.5
BACKGROUND, NUCLEUS = (225, 190, 215), (90, 40, 130)


class DarkIsNucleus(torch.nn.Module):
    """Stand-in network with DS-HFN's eval contract that returns PERFECT maps for the synthetic images below:
    region = 1 where the standardised gray is dark (a nucleus), boundary = 0, refined = region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = (x < -0.5).float()
        return torch.cat([region, torch.zeros_like(region), region], 1)


def disks_image(shape, centres, radius):
    """RGB image with dark disks (ids 1..n in the returned truth map) on a pink background."""
    truth = np.zeros(shape, np.int32)
    for i, (y, x) in enumerate(centres, start=1):
        truth[disk((y, x), radius, shape=shape)] = i
    rgb = np.empty((*shape, 3), np.uint8)
    rgb[:] = BACKGROUND
    rgb[truth > 0] = NUCLEUS
    return rgb, truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two label maps describe the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


# ------------------------------------------------------------------------------------------------- colour
def test_lab_conversions_match_skimage():
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 5)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.uint8)
    np.testing.assert_allclose(np.stack(lab_planes(grid), -1), rgb2lab(grid / 255.0), atol=2e-3)
    np.testing.assert_allclose(np.stack(lab_planes(grid.astype(np.float32)), -1), rgb2lab(grid / 255.0), atol=2e-3)
    rng = np.random.default_rng(0)
    lab = rgb2lab(grid / 255.0) + rng.normal(0, 20, grid.shape)  # includes out-of-gamut colours and z < 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = lab2rgb(lab) * 255.0
    planes = [np.ascontiguousarray(lab[..., c], np.float32) for c in range(3)]
    np.testing.assert_allclose(np.stack(rgb_planes(planes), -1), expected, atol=5e-3)


def test_reinhard_gray_equals_transforms_with_whole_image_statistics(tnbc_dir):
    rgb = read_image(tnbc_dir / "images" / "01_1.png")[:200, :240]
    stats = image_statistics(ArraySource(rgb), REF)  # every pixel of a small image
    chw = np.moveaxis(rgb, -1, 0).astype(np.float32)
    expected = Grayscale("bt601")(ReinhardNormalize(**REF)(chw))[0]
    np.testing.assert_allclose(reinhard_gray(rgb, stats.lab_mean, stats.lab_std, REF), expected, atol=0.02)
    ours = np.clip(reinhard_gray(rgb, stats.lab_mean, stats.lab_std, REF) / 255.0, 0, 1)
    assert stats.input_mean[0] == pytest.approx(ours.mean(), abs=1e-5) and stats.input_std[0] == pytest.approx(ours.std(), abs=1e-5)
    # the whole image was converted for the statistics: its gray is kept for the chunk pass, bit for bit
    np.testing.assert_array_equal(stats.gray, reinhard_gray(rgb, stats.lab_mean, stats.lab_std, REF))
    # not when the statistics saw only part of it (subsampled, several blocks, or tissue only)
    assert image_statistics(ArraySource(rgb), REF, max_pixels=10_000).gray is None
    assert image_statistics(ArraySource(rgb), REF, block=128).gray is None
    assert image_statistics(ArraySource(rgb), REF, tissue_only=True).gray is None


# ---------------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("n_in,n_out", [(1000, 500), (999, 505), (300, 600), (517, 131)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resample_matrix_equals_torch_interpolate(n_in, n_out, mode):
    x = np.random.default_rng(1).random((n_in, 7)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None, None], size=(n_out, 7), mode=mode, align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(resample_matrix((0, n_out), (0, n_in), n_out, n_in, mode) @ x, ref, atol=1e-4)
    o0, o1 = n_out // 3, n_out // 2  # a crop of the output from a crop of the input
    s = n_in / n_out
    i0, i1 = max(0, int((o0 + 0.5) * s - 0.5) - 2), min(n_in, int((o1 - 0.5) * s - 0.5) + 3)
    crop = resample_matrix((o0, o1), (i0, i1), n_out, n_in, mode) @ x[i0:i1]
    np.testing.assert_allclose(crop, ref[o0:o1], atol=1e-4)
    with pytest.raises(ValueError, match="outside the input"):
        resample_matrix((o0, o1), (i0 + 3, i1), n_out, n_in, mode)


@pytest.mark.parametrize("shape,pixel_size", [((600, 520), 0.25), ((333, 401), 0.31), ((200, 260), 0.7)])
def test_to_model_scale_equals_monai_resize_and_chunks_equal_whole(shape, pixel_size):
    gray = (np.random.default_rng(2).random(shape) * 255).astype(np.float32)
    expected = ToModelScaled("image", pixel_size=pixel_size, model_pixel_size=MODEL)({"image": torch.from_numpy(gray)[None]})["image"][0].numpy()
    f = pixel_size / MODEL
    (h, w), (hm, wm) = shape, (model_size(shape[0], f), model_size(shape[1], f))
    whole = to_model_scale(gray, (0, h), (0, w), (0, hm), (0, wm), (h, w), (hm, wm))
    assert whole.shape == expected.shape
    np.testing.assert_allclose(whole, expected, atol=0.02)  # 0..255 values; float32 sampling positions
    for gy in chunk_grid(h, hm, 48, 16, 64, 48, _blur_radius(h, hm)):
        for gx in chunk_grid(w, wm, 48, 16, 64, 48, _blur_radius(w, wm)):
            crop = gray[slice(*gy.native_read), slice(*gx.native_read)]
            part = to_model_scale(crop, gy.native_read, gx.native_read, gy.net, gx.net, (h, w), (hm, wm))
            np.testing.assert_allclose(part, whole[slice(*gy.net), slice(*gx.net)], atol=1e-4)


@pytest.mark.parametrize("n_native,n_model", [(600, 300), (1000, 1000), (333, 206), (130, 260), (50, 25)])
def test_chunk_grid_partitions_and_aligns_with_the_window_grid(n_native, n_model):
    roi, stride, halo = 64, 48, 16
    chunks = chunk_grid(n_native, n_model, 100, halo, roi, stride, blur_radius=2)
    cores = [c.core for c in chunks]
    native = [c.native_core for c in chunks]
    assert cores[0][0] == 0 and cores[-1][1] == n_model and all(a[1] == b[0] for a, b in zip(cores, cores[1:]))
    assert native[0][0] == 0 and native[-1][1] == n_native and all(a[1] == b[0] for a, b in zip(native, native[1:]))
    for c in chunks:
        assert c.core[0] % stride == 0 and c.net[0] % stride == 0  # on the whole image's window grid
        assert c.exact[0] == max(0, c.core[0] - halo) and c.exact[1] == min(n_model, c.core[1] + halo)
        assert c.net[0] <= max(0, c.exact[0] - roi) and c.net[1] == min(n_model, c.exact[1] + roi)
        assert c.native_exact[0] <= c.native_core[0] and c.native_exact[1] >= c.native_core[1]
        assert c.native_read[0] <= c.native_exact[0] and c.native_read[1] >= c.native_exact[1]
    with pytest.raises(ValueError):
        chunk_grid(n_native, n_model, 0, halo, roi, stride)


# ---------------------------------------------------------------------------------------------- stitching
@pytest.mark.parametrize("mode,reference", [("rgb", REF), ("hematoxylin", REF), ("rgb", None)])
def test_colour_input_chunks_equal_the_training_chain_on_the_whole_image(monuseg_dir, mode, reference):
    """RGB / hematoxylin input: Reinhard (or none), resize of the RGB to model scale, then the input conversion,
    as the training chain orders them; the chunks equal one whole-image pass."""
    from bundle.data.channels import ModelInput
    from bundle.inference.colour import reinhard_rgb

    rgb = read_image(sorted((monuseg_dir / "images").glob("*.png"))[0])[:300, :260]
    torch.manual_seed(0)
    network = DSHFN(in_channels=3 if mode == "rgb" else 1, features=4, levels=2, streams="local")
    predictor = SlidingWindowPredictor(network, roi_size=64, sw_batch_size=16, overlap=0.25)
    source = ArraySource(rgb)
    stats = image_statistics(source, reference, input_mode=mode)
    h, w = rgb.shape[:2]
    hm, wm = model_size(h, 0.5), model_size(w, 0.5)
    # the statistics are those of the converted whole image (every pixel of a small one)
    chw = np.moveaxis(rgb, -1, 0).astype(np.float32)
    norm = ReinhardNormalize(**reference)(chw) if reference is not None else chw
    full = np.asarray(ModelInput(mode)(norm))
    np.testing.assert_allclose(stats.input_mean, full.reshape(len(full), -1).mean(1), atol=2e-3)
    # the training chain: RGB resized to model scale (ToModelScaled), then converted and standardised
    scaled = ToModelScaled("image", pixel_size=0.25, model_pixel_size=MODEL)({"image": torch.from_numpy(norm)})["image"]
    x = np.asarray(ModelInput(mode)(np.asarray(scaled)))
    x = (x - np.asarray(stats.input_mean)[:, None, None]) / np.asarray(stats.input_std)[:, None, None]
    with torch.no_grad():
        whole = SlidingWindowInferer((64, 64), 16, 0.25, mode="gaussian", padding_mode="reflect")(
            torch.from_numpy(x.astype(np.float32))[None], predictor.network)[0, :2].numpy()
    stitched = np.full((2, hm, wm), np.nan, np.float32)
    for m in predict_chunks(source, predictor, stats, reference, 0.5, chunk=96, halo=16, roi=64, stride=predictor.stride):
        (c0, c1), (d0, d1) = m.y.core, m.x.core
        ey, ex = c0 - m.y.exact[0], d0 - m.x.exact[0]
        stitched[0, c0:c1, d0:d1] = m.region[ey : ey + c1 - c0, ex : ex + d1 - d0]
        stitched[1, c0:c1, d0:d1] = m.boundary[ey : ey + c1 - c0, ex : ex + d1 - d0]
    assert not np.isnan(stitched).any() and whole[0].std() > 1e-3
    # the engine's float32 L*a*b* and resampling matrices vs skimage + torch: close, not bit-equal
    assert np.abs(stitched - whole).max() < 2e-2
    if reference is not None:
        np.testing.assert_allclose(reinhard_rgb(rgb, stats.lab_mean, stats.lab_std, reference), np.moveaxis(norm, 0, -1), atol=0.05)


def test_stitched_maps_equal_a_whole_image_pass_without_seams(monuseg_dir):
    rgb = read_image(sorted((monuseg_dir / "images").glob("*.png"))[0])[:560, :528]
    torch.manual_seed(0)  # a small random DS-HFN (no deformable global stream, for speed): context, not accuracy
    network = DSHFN(features=4, levels=2, streams="local")
    predictor = SlidingWindowPredictor(network, roi_size=64, sw_batch_size=16, overlap=0.25)
    source = ArraySource(rgb)
    stats = image_statistics(source, REF)
    h, w = rgb.shape[:2]
    hm, wm = model_size(h, 0.5), model_size(w, 0.5)
    stitched = np.full((2, hm, wm), np.nan, np.float32)
    borders = set()
    for m in predict_chunks(source, predictor, stats, REF, 0.5, chunk=96, halo=16, roi=64, stride=predictor.stride):
        (c0, c1), (d0, d1) = m.y.core, m.x.core
        ey, ex = c0 - m.y.exact[0], d0 - m.x.exact[0]
        stitched[0, c0:c1, d0:d1] = m.region[ey : ey + c1 - c0, ex : ex + d1 - d0]
        stitched[1, c0:c1, d0:d1] = m.boundary[ey : ey + c1 - c0, ex : ex + d1 - d0]
        borders.update([("row", c0), ("col", d0)])
    assert not np.isnan(stitched).any()
    # reference: MONAI's inferer over the whole preprocessed image in one pass
    gray = reinhard_gray(rgb, stats.lab_mean, stats.lab_std, REF)
    x = to_model_scale(gray, (0, h), (0, w), (0, hm), (0, wm), (h, w), (hm, wm))
    x = (np.clip(x / 255.0, 0, 1) - stats.input_mean[0]) / stats.input_std[0]
    with torch.no_grad():
        whole = SlidingWindowInferer((64, 64), 16, 0.25, mode="gaussian", padding_mode="reflect")(
            torch.from_numpy(x.astype(np.float32))[None, None], predictor.network)[0, :2].numpy()
    assert whole[0].std() > 1e-3  # the maps are not constant, so equality means something
    assert np.abs(stitched - whole).max() < 1e-4
    # no seam: at every chunk border the rows/columns on both sides equal the whole-image pass
    rows = sorted(b for k, b in borders if k == "row" and b > 0)
    cols = sorted(b for k, b in borders if k == "col" and b > 0)
    assert len(rows) >= 2 and len(cols) >= 2
    for r in rows:
        assert np.abs(stitched[:, r - 1 : r + 1] - whole[:, r - 1 : r + 1]).max() < 1e-4
    for c in cols:
        assert np.abs(stitched[:, :, c - 1 : c + 1] - whole[:, :, c - 1 : c + 1]).max() < 1e-4


def _border_disks(shape, chunk_native, radius):
    """Disk centres ON the chunk borders (edges and corners) plus some inside."""
    borders = list(range(chunk_native, shape[0], chunk_native))
    centres = [(b, x) for b in borders for x in range(40, shape[1] - 30, 3 * radius)]
    centres += [(y, b) for b in borders for y in range(40 + radius, shape[0] - 30, 3 * radius)]
    centres += [(by, bx) for by in borders for bx in borders]
    keep = []
    for c in centres:  # at least 2 px of background between disks
        if all((c[0] - k[0]) ** 2 + (c[1] - k[1]) ** 2 > (2 * radius + 3) ** 2 for k in keep):
            keep.append(c)
    return keep


@pytest.mark.parametrize("pixel_size,post_scale", [(0.25, "model"), (0.5, "model"), (0.25, "native")])
def test_nuclei_on_chunk_borders_are_neither_duplicated_nor_cut(pixel_size, post_scale, tmp_path):
    f = pixel_size / MODEL
    shape = (304, 336)
    chunk = 48  # model px; cores are 48 px at model scale = 48 / f native px
    centres = _border_disks(shape, round(chunk / f), radius=7)
    rgb, truth = disks_image(shape, centres, 7)
    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=32, sw_batch_size=16, overlap=0.25)
    source = ArraySource(rgb)
    runs = {}
    for name, kw in {"chunked": dict(chunk=chunk, halo=16, post_chunk=40, post_halo=20),
                     "whole": dict(chunk=1000, halo=16, post_chunk=1000)}.items():
        out = TileOutputs(tmp_path / name, "syn", shape, formats=("png",))
        summary = segment_image(source, predictor, out, REF, pixel_size, MODEL, roi=32, post_scale=post_scale, **kw)
        out.close(source)
        runs[name] = (summary, out.labels.astype(np.int64))
    (s_chunk, chunked), (s_whole, whole) = runs["chunked"], runs["whole"]
    assert s_chunk["chunks"] > 9 and s_chunk["blocks"] > s_chunk["chunks"] and s_whole["chunks"] == 1
    assert s_chunk["nuclei"] == s_whole["nuclei"] == len(centres) == chunked.max()
    assert s_chunk["truncated"] == 0 and s_chunk["conflict_pixels"] == 0
    assert same_partition(chunked, whole)
    for i in range(1, len(centres) + 1):  # each disk is one whole nucleus (resampled edges may move by a pixel)
        ids, counts = np.unique(chunked[truth == i], return_counts=True)
        assert len(ids[ids > 0]) == 1, f"disk {i} at {centres[i - 1]} split into {ids}"
        inst = chunked == ids[ids > 0][0]
        assert (inst & (truth == i)).sum() / (inst | (truth == i)).sum() > 0.8


def test_tile_outputs_are_consistent_and_atomic(tmp_path):
    centres = [(30, 30), (30, 90), (100, 60), (150, 150), (150, 175)]
    rgb, truth = disks_image((190, 200), centres, 9)
    out = TileOutputs(tmp_path, "t", truth.shape, formats=("png", "tiff", "geojson", "csv", "overlay"))
    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=32, sw_batch_size=8, overlap=0.25)
    summary = segment_image(ArraySource(rgb), predictor, out, REF, 0.5, MODEL, roi=32, chunk=48, halo=16, post_chunk=64)
    paths = out.close(ArraySource(rgb))
    assert summary["nuclei"] == len(centres)
    labels = np.asarray(Image.open(paths["png"]))
    assert labels.dtype == np.uint16 and same_partition(labels, truth)
    features = json.loads(paths["geojson"].read_text())["features"]
    rows = list(csv.DictReader(open(paths["csv"])))
    assert sorted(int(r["id"]) for r in rows) == sorted(f["properties"]["instance_id"] for f in features) == list(range(1, 6))
    for feat in features:  # polygon rasterised back = the nucleus in the label map
        ring = np.asarray(feat["geometry"]["coordinates"][0], float)
        mask = np.zeros(labels.shape, bool)
        mask[draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, labels.shape)] = True
        assert np.array_equal(mask, labels == feat["properties"]["instance_id"])
    for r in rows:
        assert int(r["area_px"]) == int((labels == int(r["id"])).sum())
    overlay = np.asarray(Image.open(paths["overlay"]))
    assert overlay.shape == rgb.shape and (overlay != rgb).any() and np.array_equal(overlay[truth == 0], rgb[truth == 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())  # no temp files


def test_nucleus_stream_abort_leaves_nothing(tmp_path):
    stream = NucleusStream(tmp_path, "x")
    stream.abort()
    assert list(tmp_path.iterdir()) == []


def test_memory_is_bounded_by_the_chunk_not_the_image():
    """numpy's traced peak while segmenting (slide-style sink: nothing image-sized kept) grows far less than
    the image: 4x the pixels, same chunk."""
    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=32, sw_batch_size=8, overlap=0.25)
    peaks = {}
    for side in (256, 512):
        centres = [(y, x) for y in range(12, side - 8, 24) for x in range(12, side - 8, 24)]
        rgb, _ = disks_image((side, side), centres, 6)
        source = ArraySource(rgb)
        stats = image_statistics(source, REF)

        class Counter:
            nuclei = 0

            def add(self, block):
                self.nuclei += block.count

        tracemalloc.start()
        sink = Counter()
        segment_image(source, predictor, sink, REF, 0.5, MODEL, roi=32, chunk=64, halo=16, post_chunk=64, stats=stats)
        peaks[side] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert sink.nuclei == len(centres)
    assert peaks[512] < 1.3 * peaks[256], peaks


def test_bad_region_raises_data_error():
    class Short(ArraySource):
        def read(self, y0, y1, x0, x1):
            return super().read(y0, y1, x0, x1)[:-1]

    rgb, _ = disks_image((64, 64), [(30, 30)], 5)
    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=32, sw_batch_size=8, overlap=0.25)
    with pytest.raises(DataError, match="region read"):
        list(predict_chunks(Short(rgb, "short"), predictor, image_statistics(ArraySource(rgb), REF), REF, 1.0, roi=32, stride=24))
    assert WatershedParams().min_size > 0


def test_glass_chunks_skip_the_network_and_statistics_ignore_glass():
    centres = [(y, x) for y in range(20, 240, 30) for x in range(20, 110, 30)]
    rgb, truth = disks_image((256, 384), centres, 7)
    rgb[:, 128:] = 245  # glass on the right two thirds

    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=32, sw_batch_size=64, overlap=0.25)

    class Count:
        nuclei = 0

        def add(self, block):
            self.nuclei += block.count

    sink = Count()
    summary = segment_image(ArraySource(rgb), predictor, sink, REF, 0.5, MODEL, roi=32, chunk=96, halo=16, tissue_only=True)
    assert summary["chunks"] == 12 and summary["skipped_chunks"] == 6 and sink.nuclei == len(centres)
    tissue = image_statistics(ArraySource(rgb), REF, tissue_only=True)
    assert tissue.lab_mean == pytest.approx(image_statistics(ArraySource(rgb[:, :128]), REF).lab_mean, abs=1e-3)


def test_large_tiles_get_tiled_tiff_label_map_and_overlay(monkeypatch, tmp_path):
    import tifffile

    from bundle.inference import writers
    from bundle.nuclei.exports import instance_overlay

    monkeypatch.setattr(writers, "PNG_MAX_PIXELS", 100 * 100)
    centres = [(y, x) for y in range(15, 300, 40) for x in range(15, 330, 40)]
    rgb, truth = disks_image((300, 330), centres, 8)
    out = TileOutputs(tmp_path, "big", truth.shape, formats=("png", "overlay", "geojson"))
    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=32, sw_batch_size=32, overlap=0.25)
    segment_image(ArraySource(rgb), predictor, out, REF, 0.5, MODEL, chunk=96, halo=16)
    paths = out.close(ArraySource(rgb), tile=128)
    assert sorted(paths) == ["geojson", "overlay", "tiff"] and paths["overlay"].suffix == ".tif"
    labels = tifffile.imread(paths["tiff"])
    assert labels.dtype == np.uint16 and same_partition(labels, truth)
    np.testing.assert_array_equal(tifffile.imread(paths["overlay"]), instance_overlay(rgb, labels))


def test_predictor_handles_images_smaller_than_a_window():
    class Scale(torch.nn.Module):  # pixel-wise, so the answer is known wherever the padding lands
        def forward(self, x):
            return torch.cat([x, 2 * x, 3 * x], 1)

    x = np.random.default_rng(3).random((20, 100)).astype(np.float32)
    out = SlidingWindowPredictor(Scale(), roi_size=64, sw_batch_size=4, overlap=0.25)(x)
    assert out.shape == (3, 20, 100)
    np.testing.assert_allclose(out, np.stack([x, 2 * x, 3 * x]), atol=1e-5)
