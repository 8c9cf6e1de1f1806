"""bundle.nuclei.measure (all nuclei at once) against skimage.measure.regionprops (one nucleus at a time)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import disk, line
from skimage.measure import regionprops_table

from bundle.data.io import read_image, read_label
from bundle.nuclei.measure import label_properties

PROPS = ("label", "centroid", "area", "perimeter", "eccentricity", "solidity", "intensity_mean")


def assert_matches_regionprops(labels: np.ndarray, intensity: np.ndarray) -> None:
    ref = regionprops_table(labels, intensity_image=intensity, properties=PROPS)
    got = label_properties(labels, intensity)
    assert sorted(got) == sorted(ref)
    np.testing.assert_array_equal(got["label"], ref["label"])
    np.testing.assert_array_equal(got["area"], ref["area"])
    for key in ref:
        # rtol 1e-12: only the order of float64 sums differs; solidity (integer ratio) must agree exactly
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=0, err_msg=key)


def test_constructed_shapes():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 50), np.int32)
    labels[disk((10, 10), 6)] = 3  # ids need not be consecutive
    labels[0:5, 30:50] = 7  # touches two image borders
    labels[20, 20] = 9  # one pixel: eccentricity 0, perimeter 0, solidity 1
    rr, cc = line(25, 2, 38, 30)
    labels[rr, cc] = 11  # a diagonal line: 8-connected only
    labels[30:39, 35:48] = 12
    labels[33:36, 38:45] = 0  # a hole
    labels[34, 40] = 13  # an object inside another object's hole
    labels[15:18, 40:43] = 14
    labels[18:21, 43:46] = 14  # two squares touching at a corner: one id, two parts
    labels[12:14, 20:30] = 15
    labels[12:14, 23] = 16  # another id cuts it in two
    intensity = rng.random((40, 50, 2))
    assert_matches_regionprops(labels, intensity)


def test_random_label_maps():
    rng = np.random.default_rng(1)
    for _ in range(20):
        labels = (rng.integers(0, 6, (24, 24)) * (rng.random((24, 24)) < 0.7)).astype(np.uint16)
        assert_matches_regionprops(labels, rng.random((24, 24, 1)))


def test_empty_and_planes():
    out = label_properties(np.zeros((5, 5), np.int32), np.zeros((5, 5)))
    assert all(len(v) == 0 for v in out.values())
    labels = np.zeros((6, 6), np.int64)
    labels[1:3, 1:4] = 2
    img = np.arange(36.0).reshape(6, 6)
    got = label_properties(labels, [img, 2 * img])  # a list of planes = channels
    assert got["intensity_mean-0"][0] == pytest.approx((7 + 8 + 9 + 13 + 14 + 15) / 6)
    assert got["intensity_mean-1"][0] == pytest.approx(2 * got["intensity_mean-0"][0])
    with pytest.raises(ValueError, match="2D integer"):
        label_properties(np.zeros((4, 4), np.float32))


def test_whole_monuseg_tiles(monuseg_dir):
    for path in sorted((monuseg_dir / "labels").glob("*.png"))[:2]:
        labels = read_label(path, kind="instance")
        assert_matches_regionprops(labels, read_image(monuseg_dir / "images" / path.name).astype(np.float64))
