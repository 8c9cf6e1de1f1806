"""Watershed tuning on validation tiles (bundle.research.tuning, scripts/tune_watershed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import disk
from skimage.segmentation import find_boundaries

from bundle.evaluation.instance import aji
from bundle.inference.chunks import SlidingWindowPredictor
from bundle.model.contract import value
from bundle.nuclei.watershed import (
    WatershedParams,
    instances_from_maps,
    upsample_labels,
)
from bundle.research.tuning import model_scale_maps, score_watershed, tune_in_stages

REF = value("reinhard_reference")  # the shipped weights' reference (configs/model.json)


class DarkIsNucleus(torch.nn.Module):
    """Region = dark pixels of the standardised gray, boundary = 0 (DS-HFN's eval contract)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = (x < -0.5).float()
        return torch.cat([region, torch.zeros_like(region), region], 1)


def test_model_scale_maps_stitch_chunks_like_one_pass():
    rng = np.random.default_rng(0)
    truth = np.zeros((300, 260), np.int32)
    for i, (y, x) in enumerate(rng.integers(15, 245, (25, 2)), start=1):
        truth[disk((y, x), 8, shape=truth.shape)] = i
    rgb = np.full((*truth.shape, 3), (225, 190, 215), np.uint8)
    rgb[truth > 0] = (90, 40, 130)
    predictor = SlidingWindowPredictor(DarkIsNucleus(), roi_size=32, sw_batch_size=8, overlap=0.25)
    whole = model_scale_maps(predictor, rgb, REF, 0.25, 0.5, chunk=1000)
    chunked = model_scale_maps(predictor, rgb, REF, 0.25, 0.5, chunk=48)
    assert whole[0].shape == (150, 130)
    np.testing.assert_allclose(chunked[0], whole[0], atol=1e-5)
    # the disks at half size: the region map is the true foreground, downsampled
    down = upsample_labels(truth, (150, 130)) > 0
    assert ((whole[0] > 0.5) == down).mean() > 0.97


def test_scoring_at_model_scale_and_staged_search():
    # two touching disks at native size, maps at half size with a boundary line between them
    gt = np.zeros((80, 80), np.int32)
    gt[disk((40, 26), 15, shape=gt.shape)] = 1
    gt[disk((40, 54), 15, shape=gt.shape)] = 2
    half = gt[::2, ::2]
    region = (half > 0).astype(np.float32)
    boundary = find_boundaries(half, mode="inner").astype(np.float32) * (half > 0) * 0.6  # uncertain band at 0.6
    items = [(region, boundary, gt)]
    # scored at the truth's size after resizing (by hand: the same call, then AJI at native size)
    p = WatershedParams(boundary_threshold=0.5)
    expected = aji(upsample_labels(instances_from_maps(region, boundary, p), gt.shape), gt)
    assert score_watershed(items, p) == pytest.approx(expected)
    # a boundary threshold above 0.6 ignores the band, merges the pair (AJI ~0.5); the search must find <= 0.6
    merged = WatershedParams(boundary_threshold=0.7)
    assert score_watershed(items, merged) < 0.6
    best, table = tune_in_stages(items, merged)
    assert best.boundary_threshold <= 0.6 and max(r["score"] for r in table) > 0.8
    assert table[0]["stage"] == 0 and table[0]["params"] == merged.to_dict() and {r["stage"] for r in table} == {0, 1, 2}


def test_native_items_and_scaled_grid():
    import torch.nn.functional as F

    from bundle.research.tuning import SIZE_GRID, native_items, scaled_grid

    rng = np.random.default_rng(2)
    region, boundary = rng.random((20, 30)).astype(np.float32), rng.random((20, 30)).astype(np.float32)
    gt = np.zeros((40, 60), np.int32)
    ((r, b, g),) = native_items([(region, boundary, gt)])
    ref = F.interpolate(torch.from_numpy(region)[None, None], size=(40, 60), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(r, ref.numpy(), atol=1e-5)  # what Invertd / segment_blocks(post_scale="native") do
    assert b.shape == g.shape == (40, 60)
    grid = scaled_grid(SIZE_GRID, 2.0)
    assert grid["min_size"] == tuple(4 * v for v in SIZE_GRID["min_size"])  # areas: factor squared
    assert grid["smooth_sigma"] == tuple(2 * v for v in SIZE_GRID["smooth_sigma"])  # lengths: factor
    assert scaled_grid({"mask_threshold": (0.4, 0.5)}, 2.0) == {"mask_threshold": (0.4, 0.5)}  # probabilities unchanged
