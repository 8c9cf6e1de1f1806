"""Marker-controlled watershed: synthetic touching nuclei, oracle maps from real MoNuSeg labels, tuning, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.transforms import FillHoles
from scipy import ndimage
from skimage.draw import disk
from skimage.measure import label as cc_label
from skimage.morphology import remove_small_objects
from skimage.segmentation import find_boundaries, relabel_sequential

from bundle.data.io import read_label
from bundle.evaluation.instance import aji
from bundle.nuclei.watershed import (
    WatershedParams,
    fill_instance_holes,
    instances_from_maps,
    instances_from_output,
    relabel_consecutive,
    remove_small_instances,
    upsample_labels,
)
from bundle.research.tuning import tune_watershed


def two_touching_disks() -> np.ndarray:
    gt = np.zeros((64, 64), np.int32)
    gt[disk((32, 22), 12, shape=gt.shape)] = 1
    gt[disk((32, 42), 12, shape=gt.shape)] = 2  # overlaps disk 1: the two nuclei touch along a chord
    return gt


def oracle_maps(gt: np.ndarray, boundary_level: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """What a perfect DS-HFN would output: region = foreground, boundary = the transforms' inner boundary target."""
    region = (gt > 0).astype(np.float32)
    boundary = find_boundaries(gt, mode="inner", connectivity=1).astype(np.float32) * boundary_level
    return region, boundary


def check_contract(inst: np.ndarray, shape) -> None:
    assert inst.shape == shape and inst.dtype == np.int32
    ids = np.unique(inst)
    np.testing.assert_array_equal(ids[ids > 0], np.arange(1, inst.max() + 1))  # consecutive 1..N


def test_touching_nuclei_are_separated_by_the_boundary_map():
    gt = two_touching_disks()
    region, boundary = oracle_maps(gt)
    inst = instances_from_maps(region, boundary)
    check_contract(inst, gt.shape)
    assert cc_label(region > 0.5).max() == 1  # without the boundary they are one blob
    assert inst.max() == 2
    assert aji(inst, gt) > 0.95


def test_boundary_outside_the_region_creates_no_instance():
    # boundary probability high everywhere outside the nucleus (subtracting it from a uint8 mask would wrap to 255)
    gt = two_touching_disks()
    region, boundary = oracle_maps(gt)
    boundary = np.maximum(boundary, (gt == 0).astype(np.float32))
    inst = instances_from_maps(region, boundary)
    assert inst.max() == 2
    assert not inst[region <= 0.5].any()


def test_ablated_boundary_falls_back_to_distance_transform_markers():
    gt = two_touching_disks()
    region, _ = oracle_maps(gt)
    fallback = instances_from_maps(region, None)
    np.testing.assert_array_equal(instances_from_maps(region, np.zeros_like(region)), fallback)  # all-zero = ablated
    assert fallback.max() == 2  # the neck between two disks gives two distance peaks
    assert aji(fallback, gt) > 0.9


def test_small_objects_holes_and_unmarked_components():
    region = np.zeros((40, 40), np.float32)
    region[2:4, 2:5] = 1.0  # 6 px speck
    region[10:30, 10:30] = 1.0
    region[18:22, 18:22] = 0.0  # a hole the network left inside a nucleus
    boundary = np.zeros_like(region)
    boundary[10, 10:30] = boundary[29, 10:30] = boundary[10:30, 10] = boundary[10:30, 29] = 1.0
    inst = instances_from_maps(region, boundary, min_size=10)
    assert inst.max() == 1 and not inst[2:4, 2:5].any()  # speck < min_size removed
    assert (inst[10:30, 10:30] == 1).all()  # hole filled
    assert instances_from_maps(region, boundary, min_size=5).max() == 2  # speck kept (6 >= 5)
    # a 3x3 nucleus is all boundary, so it has no marker; keep_unmarked still makes it an instance
    tiny = np.zeros((12, 12), np.float32)
    tiny[4:7, 4:7] = 1.0
    tiny_b = find_boundaries(tiny.astype(int), mode="inner").astype(np.float32)
    assert instances_from_maps(tiny, tiny_b, min_size=5).max() == 1
    assert instances_from_maps(tiny, tiny_b, min_size=5, keep_unmarked=False).max() == 0


def test_eval_output_channels_are_read_by_contract():

    gt = two_touching_disks()
    region, boundary = oracle_maps(gt)
    out = torch.as_tensor(np.stack([region, boundary, region * 1.5]))  # (3, H, W): region, boundary, refined
    np.testing.assert_array_equal(instances_from_output(out), instances_from_maps(region, boundary))
    np.testing.assert_array_equal(instances_from_output(out[:1].numpy()), instances_from_maps(region, None))
    with pytest.raises(ValueError, match="unknown"):
        instances_from_output(out, mask_treshold=0.4)


def test_empty_map_gives_empty_instances():
    inst = instances_from_maps(np.zeros((16, 16)), np.zeros((16, 16)))
    assert inst.dtype == np.int32 and not inst.any()


def test_helpers_match_scikit_image_and_monai():
    rng = np.random.default_rng(0)
    labels = ndimage.label(ndimage.binary_opening(rng.random((60, 60)) > 0.45))[0]
    for min_size in (1, 4, 9):
        np.testing.assert_array_equal(
            remove_small_instances(labels, min_size) > 0, remove_small_objects(labels, max_size=min_size - 1) > 0
        )
    sparse = np.where(labels > 0, labels * 5 + 3, 0)
    np.testing.assert_array_equal(relabel_consecutive(sparse), relabel_sequential(sparse)[0])
    # holes: ring-shaped nuclei, one hole shared by two nuclei (must stay empty), compared with MONAI's FillHoles
    ring = np.zeros((20, 30), np.int32)
    ring[2:9, 2:9] = 1
    ring[4:7, 4:7] = 0  # hole of nucleus 1
    ring[10:17, 10:24] = 2
    ring[10:17, 17:24] = 3
    ring[12:15, 15:19] = 0  # a gap enclosed by nuclei 2 and 3 together: not a hole of either
    np.testing.assert_array_equal(fill_instance_holes(ring), FillHoles(connectivity=1)(ring[None])[0])
    assert (fill_instance_holes(ring)[4:7, 4:7] == 1).all() and not fill_instance_holes(ring)[12:15, 15:19].any()


@pytest.fixture(scope="module")
def monuseg_gt(monuseg_dir):
    ids = sorted(p.stem for p in (monuseg_dir / "labels").glob("*.png"))[:3]
    return [read_label(monuseg_dir / "labels" / f"{i}.png", kind="instance")[:256, :256] for i in ids]


def test_fill_holes_nested_and_border_cases(monuseg_gt):
    # nucleus 2 sits in nucleus 1's hole: the gap between them touches both, so it is nobody's hole (left empty);
    # 2's own hole is filled with 2
    nested = np.zeros((13, 13), np.int32)
    nested[1:12, 1:12] = 1
    nested[3:10, 3:10] = 0
    nested[5:8, 5:8] = 2
    nested[6, 6] = 0
    filled = fill_instance_holes(nested)
    assert filled[6, 6] == 2 and (filled[3:5, 3:10] == 0).all()
    assert np.array_equal(filled[nested > 0], nested[nested > 0])  # nuclei never change
    # a gap open to the image border is outside, even when only one nucleus surrounds the rest of it
    cup = np.zeros((8, 8), np.int32)
    cup[0:6, 1:7] = 1
    cup[0:4, 3:5] = 0
    assert np.array_equal(fill_instance_holes(cup), cup)
    # MoNuSeg annotations: the same as MONAI's FillHoles
    for gt in monuseg_gt:
        np.testing.assert_array_equal(fill_instance_holes(gt), FillHoles(connectivity=1)(gt[None])[0])


def test_oracle_maps_reproduce_monuseg_instances(monuseg_gt):
    for gt in monuseg_gt:
        region, boundary = oracle_maps(gt)
        inst = instances_from_maps(region, boundary)
        check_contract(inst, gt.shape)
        assert aji(inst, gt) > 0.95
        # fallback without boundary map: worse than the oracle boundary, better than plain connected components
        assert aji(cc_label(region > 0.5, connectivity=1), gt) < aji(instances_from_maps(region, None), gt)


def test_tune_watershed_finds_the_threshold_that_splits(monuseg_gt):
    # a timid boundary decoder: 0.4 on boundaries, so the default boundary_threshold 0.5 never splits touching nuclei
    items = [(*oracle_maps(gt, boundary_level=0.4), gt) for gt in monuseg_gt[:2]]
    grid = {"boundary_threshold": (0.5, 0.3), "mask_threshold": (0.5,)}
    best, table = tune_watershed(items, grid, return_table=True)
    assert [p.boundary_threshold for p, _ in table] == [0.5, 0.3]
    assert best.boundary_threshold == 0.3
    assert table[1][1] > table[0][1] + 0.02  # splitting really helps on MoNuSeg crops
    assert best == dataclasses.replace(WatershedParams(), boundary_threshold=0.3, mask_threshold=0.5)
    assert tune_watershed(items, grid, metric="pq").boundary_threshold == 0.3


def test_params_round_trip_and_bad_input():
    params = WatershedParams(mask_threshold=0.4, min_size=12)
    assert WatershedParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match="unknown"):
        WatershedParams.from_dict({"mask_treshold": 0.4})
    with pytest.raises(ValueError, match="mask_threshold"):
        WatershedParams(mask_threshold=1.5)
    with pytest.raises(ValueError, match="min_size"):
        WatershedParams(min_size=-1)
    region = np.zeros((8, 8))
    with pytest.raises(ValueError, match="shape"):
        instances_from_maps(region, np.zeros((8, 9)))
    with pytest.raises(ValueError, match="2D"):
        instances_from_maps(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        instances_from_maps(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="val_items"):
        tune_watershed([])
    with pytest.raises(ValueError, match="unknown grid"):
        tune_watershed([(region, None, np.zeros((8, 8), int))], {"radius": (1,)})


@pytest.mark.parametrize("n_in,n_out", [(500, 1000), (256, 512), (300, 1000), (517, 131), (7, 7)])
def test_upsample_labels_equals_torch_nearest_exact(n_in, n_out):
    import torch.nn.functional as F

    from bundle.nuclei.watershed import nearest_index

    labels = np.random.default_rng(0).integers(0, 50, (n_in, n_in + 3)).astype(np.int32)
    shape = (n_out, n_out + 5)
    ref = F.interpolate(torch.from_numpy(labels.astype(np.float64))[None, None], size=shape, mode="nearest-exact")[0, 0]
    np.testing.assert_array_equal(upsample_labels(labels, shape), ref.numpy().astype(np.int32))
    a, b = n_out // 3, n_out // 2  # a window
    np.testing.assert_array_equal(nearest_index(n_out, n_in, a, b), nearest_index(n_out, n_in)[a:b])
    with pytest.raises(ValueError, match="window"):
        nearest_index(n_out, n_in, 0, n_out + 1)


def test_flood_skips_single_marker_components_with_the_same_result(monuseg_gt):
    from monai.apps.pathology.transforms.post.array import Watershed

    from bundle.nuclei.watershed import _flood

    rng = np.random.default_rng(3)
    for gt in monuseg_gt:
        region, boundary = oracle_maps(gt)
        region = np.clip(region + rng.normal(0, 0.2, region.shape), 0, 1)
        mask = region > 0.5
        markers = ndimage.label((region > 0.6) & (boundary < 0.5))[0].astype(np.int32) * mask
        elevation = ndimage.gaussian_filter(1 - region, 1).astype(np.float32)
        ref = np.asarray(Watershed(connectivity=1, dtype=np.int32)(elevation[None], mask[None], markers[None]))[0]
        np.testing.assert_array_equal(_flood(elevation, markers, ndimage.label(mask)[0]), ref)


