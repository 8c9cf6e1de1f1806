"""bundle.handlers.instance_eval: the nuclei a user gets (model-scale watershed, labels at the tile's size) scored in
the evaluator, checked against MONAI's padding and resizing and against values worked out by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.transforms import SpatialPad

from bundle.data.scale import ToModelScaled, model_shape, scale_factor
from bundle.evaluation.instance import instance_metrics
from bundle.handlers.instance_eval import (
    InstanceMetricsHandler,
    native_nuclei,
    nuclei_scores,
    unpad,
)
from bundle.nuclei.watershed import WatershedParams


@pytest.mark.parametrize("shape", [(20, 20), (17, 30), (1, 31), (32, 32)])
def test_unpad_undoes_monai_spatial_pad(shape):
    maps = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    padded = SpatialPad((32, 32), mode="constant")(torch.from_numpy(maps))
    np.testing.assert_array_equal(unpad(padded, shape), maps)
    with pytest.raises(ValueError, match="smaller than the tile"):
        unpad(maps, (shape[0] + 1, shape[1]))


@pytest.mark.parametrize("shape, pixel_size, model_pixel_size", [((40, 40), 0.5, 1.0), ((37, 51), 0.25, 0.5),
                                                                  ((50, 30), 0.5, 0.25), ((9, 11), 0.227, 0.25)])
def test_model_shape_is_the_size_to_model_scaled_makes(shape, pixel_size, model_pixel_size):
    item = {"image": torch.zeros(1, *shape), "pixel_size": pixel_size}
    scaled = ToModelScaled("image", model_pixel_size=model_pixel_size, pixel_size_key="pixel_size")(item)
    assert tuple(scaled["image"].shape[-2:]) == model_shape(shape, scale_factor(pixel_size, model_pixel_size))


def _two_squares() -> np.ndarray:
    gt = np.zeros((40, 40), np.int32)
    gt[4:14, 4:14], gt[24:34, 20:30] = 1, 2  # even corners and sides: exact at half size
    return gt


def test_nuclei_scores_by_hand():
    gt = _two_squares()
    pred = np.zeros_like(gt)
    pred[4:14, 4:14] = 7  # the first nucleus, other id
    row = nuclei_scores(pred, gt)
    assert row["nuclei_dice"] == pytest.approx(2 * 100 / (100 + 200))
    assert row["aji"] == pytest.approx(100 / 200) and row["pq"] == pytest.approx(1 / 1.5)  # DQ 1 / (1 + 0.5), SQ 1
    for name, value in instance_metrics(pred.astype(np.int64), gt.astype(np.int64)).items():
        assert row[name] == pytest.approx(value), name
    assert row["nuclei_bf1"] == pytest.approx(2 * 36 / (36 + 72))  # every predicted contour pixel is right
    binary = nuclei_scores(pred, (gt > 0).astype(np.int32), instances=False)
    assert binary["nuclei_dice"] == row["nuclei_dice"] and math.isnan(binary["aji"]) and math.isnan(binary["pq"])
    assert nuclei_scores(np.zeros_like(gt), np.zeros_like(gt))["nuclei_dice"] == 1.0  # nothing to find, nothing found
    with pytest.raises(ValueError, match="differ in size"):
        nuclei_scores(pred[:20], gt)


def _model_scale_maps(gt: np.ndarray, window: int = 32) -> torch.Tensor:
    """Region map of ``gt`` at half size (pixel 0.5 um, model 1.0 um), padded to the window as the chain pads."""
    region = (gt[::2, ::2] > 0).astype(np.float32)
    maps = np.stack([region, np.zeros_like(region)])
    return SpatialPad((window, window), mode="constant")(torch.from_numpy(maps))


def test_handler_brings_model_scale_maps_to_each_tile_and_skips_binary_labels():
    gt = _two_squares()
    maps = _model_scale_maps(gt)
    handler = InstanceMetricsHandler(pred_key="maps", label_key="label", model_pixel_size=1.0,
                                     watershed={"min_size": 4, "min_marker_size": 4})
    direct = native_nuclei(maps, gt.shape, handler.params, (20, 20))
    np.testing.assert_array_equal(direct > 0, gt > 0)  # the padding cut off, nuclei back at the tile's size
    shifted = torch.roll(maps, shifts=2, dims=-1)  # a crop off by 2 model pixels would miss by 4 tile pixels
    state = SimpleNamespace(
        output=[{"maps": maps}, {"maps": shifted}, {"maps": maps}],
        batch=[{"label": torch.from_numpy(gt)[None], "pixel_size": torch.tensor(0.5), "label_kind": "instance"},
               {"label": torch.from_numpy(gt)[None], "pixel_size": 0.5, "label_kind": "instance"},
               {"label": torch.from_numpy(gt > 0)[None].int(), "pixel_size": 0.5, "label_kind": "binary"}],
        metrics={})
    handler(SimpleNamespace(state=state))
    aji = state.metric_details["aji"][:, 0]
    assert aji[0] == pytest.approx(1.0) and aji[1] == pytest.approx((2 * 60) / (2 * 140)) and math.isnan(aji[2])
    assert state.metrics["aji"] == pytest.approx((1.0 + 120 / 280) / 2)  # binary tiles left out of the mean
    np.testing.assert_allclose(state.metric_details["nuclei_dice"][:, 0], [1.0, 120 / 200, 1.0])
    with pytest.raises(KeyError, match="pixel_size"):
        handler(SimpleNamespace(state=SimpleNamespace(output=[{"maps": maps}], batch=[{"label": gt[None]}], metrics={})))
    with pytest.raises(ValueError, match="model_pixel_size"):
        InstanceMetricsHandler(pred_key="maps", label_key="label").score(maps, gt)


def test_recipe_scores_are_the_handler_scores():
    """research.recipe.score_tiles and the evaluator's handler give one tile the same numbers."""
    from bundle.research.recipe import score_tiles

    gt = _two_squares()
    maps = _model_scale_maps(gt)[:, 6:26, 6:26].numpy()  # recipe tiles hold unpadded model-scale maps
    params = WatershedParams(min_size=4, min_marker_size=4)
    (row,) = score_tiles([{"id": "t", "dataset": "d", "kind": "instance", "region": maps[0], "boundary": maps[1],
                           "truth": gt}], params)
    scores = InstanceMetricsHandler(watershed=params.to_dict(), model_pixel_size=1.0).score(maps, gt, 0.5)
    assert (row["dice"], row["aji"], row["pq"], row["bf1"], row["hd95"]) == pytest.approx(
        (scores["nuclei_dice"], scores["aji"], scores["pq"], scores["nuclei_bf1"], scores["nuclei_hd95"]))
