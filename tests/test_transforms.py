"""Tests of bundle/data/transforms.py and scripts/reinhard_stats.py on real TNBC / MoNuSeg tiles and hand-built cases, and of
the training / validation chains as configs/train.json builds them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    LoadImaged,
    NormalizeIntensity,
    RandAdjustContrastd,
    Randomizable,
    Resized,
    ScaleIntensityRange,
)
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import rgb2gray, rgb2lab
from skimage.segmentation import find_boundaries

from bundle.core.errors import DataError
from bundle.data.channels import input_channels
from bundle.data.io import read_image, read_label
from bundle.data.transforms import (
    CleanMask,
    CleanMaskd,
    Grayscale,
    LoadTile,
    LoadTiled,
    NucleiTargets,
    NucleiTargetsd,
    ReinhardNormalize,
    ReinhardNormalized,
    clean_label_map,
    lab_statistics,
    reinhard_reference,
)
from bundle.model.contract import value

TNBC_ID = "01_1"
MONUSEG_ID = "TCGA-18-5592-01Z-00-DX1"
# TNBC reference of the report; any plausible H&E statistics work for the chain tests
TNBC_REF = value("reinhard_reference")  # the shipped weights' reference (configs/model.json)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# a 256x256 resize with the modes of the chain's resize to the model scale
RESIZE = Resized(["image", "label"], (256, 256), mode=["bicubic", "nearest-exact"], anti_aliasing=[True, False])


def _pair(dataset_dir: Path, sample_id: str) -> dict[str, str]:
    label_dir = "labels" if (dataset_dir / "labels").is_dir() else "masks"
    return {
        "image": str(dataset_dir / "images" / f"{sample_id}.png"),
        "label": str(dataset_dir / label_dir / f"{sample_id}.png"),
    }


def _train_config(data_root: Path, output_dir: Path) -> ConfigParser:
    """configs/train.json on the datasets under ``data_root``, writing nothing outside ``output_dir``."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"data_root": str(data_root), "output_dir": str(output_dir), "num_workers": 0})
    return parser


@pytest.fixture(scope="module")
def train_config(tnbc_dir, tmp_path_factory) -> ConfigParser:
    return _train_config(tnbc_dir.parent, tmp_path_factory.mktemp("train_config"))


@pytest.fixture(scope="module")
def datalist_items(train_config) -> dict[str, dict]:
    """Every tile of the config's train and validation datalists (with the pixel_size and label_kind the chains
    read), by id."""
    items = train_config.get_parsed_content("train_datalist") + train_config.get_parsed_content("val_datalist")
    return {it["id"]: it for it in items}


@pytest.fixture(scope="module")
def tnbc(tnbc_dir):
    return LoadTiled()(_pair(tnbc_dir, TNBC_ID))


@pytest.fixture(scope="module")
def monuseg(monuseg_dir):
    return LoadTiled()(_pair(monuseg_dir, MONUSEG_ID))


@pytest.fixture(scope="module")
def tnbc_256(tnbc):
    """TNBC tile and label resized as in the chains (label stays an integer map)."""
    return RESIZE(dict(tnbc))


# ------------------------------------------------------------------------------------------------- loading
def test_load_tiled_matches_bundle_io_and_keeps_path(tnbc_dir, monuseg_dir, tnbc, monuseg):
    paths = _pair(tnbc_dir, TNBC_ID)
    image, label = tnbc["image"], tnbc["label"]
    assert isinstance(image, MetaTensor) and image.shape == (3, 512, 512) and image.dtype == torch.float32
    assert label.shape == (1, 512, 512) and label.dtype == torch.int32
    np.testing.assert_array_equal(image.numpy(), np.moveaxis(read_image(paths["image"]), -1, 0))
    np.testing.assert_array_equal(label.numpy()[0], read_label(paths["label"]))
    assert image.meta["filename_or_obj"] == paths["image"] and label.meta["filename_or_obj"] == paths["label"]
    assert label.meta["label_kind"] == "binary" and set(np.unique(label.numpy())) == {0, 1}
    assert monuseg["label"].meta["label_kind"] == "instance" and int(monuseg["label"].max()) > 100
    # rows stay rows (no PILReader-style transpose): compare with PIL directly
    np.testing.assert_array_equal(image.numpy()[0], np.asarray(Image.open(paths["image"]).convert("RGB"))[..., 0])


def test_tile_reader_works_inside_monai_loadimaged(tnbc_dir, tnbc):
    load = LoadImaged(
        "label", reader="bundle.data.transforms.TileReader", kind="label", ensure_channel_first=True, dtype=np.int32
    )
    out = load(_pair(tnbc_dir, TNBC_ID))
    np.testing.assert_array_equal(out["label"].numpy(), tnbc["label"].numpy())


def test_load_tile_bad_files_raise_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="nothere.png"):
        LoadTile("image")(tmp_path / "nothere.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        LoadTile("label")(broken)
    with pytest.raises(ValueError, match="kind"):
        LoadTile("mask")


# ------------------------------------------------------------------------------------------------- Reinhard
def test_reinhard_matches_reference_statistics(tnbc, monuseg):
    """Output L*a*b* means within 0.5 and stds within 8 % of the reference (lab2rgb clips out-of-gamut colours, so
    it is not exact), starting from a MoNuSeg tile whose statistics are far from the TNBC reference."""
    image = monuseg["image"]
    before, _ = lab_statistics(image)
    assert np.abs(before - TNBC_REF["means"]).max() > 20
    out = ReinhardNormalize(**TNBC_REF)(image)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.shape == image.shape
    assert out.meta["filename_or_obj"] == image.meta["filename_or_obj"]
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    means, stds = lab_statistics(out)
    np.testing.assert_allclose(means, TNBC_REF["means"], atol=0.5)
    np.testing.assert_allclose(stds, TNBC_REF["stds"], rtol=0.08)  # measured: -6 % on a*
    # the channel-wise affine map in L*a*b*, checked pixelwise on unclipped pixels against rgb2lab directly
    lab_in = rgb2lab(np.moveaxis(image.numpy()[:, :64, :64], 0, -1) / 255.0)
    full = rgb2lab(np.moveaxis(image.numpy(), 0, -1) / 255.0).reshape(-1, 3)
    expected = (lab_in - full.mean(0)) / full.std(0) * TNBC_REF["stds"] + TNBC_REF["means"]
    got = rgb2lab(np.moveaxis(out.numpy()[:, :64, :64], 0, -1).astype(np.float64) / 255.0)
    inside = ((out.numpy()[:, :64, :64] > 0.5) & (out.numpy()[:, :64, :64] < 254.5)).all(0)
    assert inside.mean() > 0.9
    np.testing.assert_allclose(got[inside], expected[inside], atol=0.3)  # float32 output rounding only


def test_reinhard_identity_with_own_statistics_and_forms_agree(tnbc):
    image = tnbc["image"]
    means, stds = lab_statistics(image)
    same = ReinhardNormalize(means, stds)(image)
    np.testing.assert_allclose(same.numpy(), image.numpy(), atol=0.01)
    as_numpy = ReinhardNormalize(**TNBC_REF)(image.numpy())
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    as_dict = ReinhardNormalized("image", **TNBC_REF)({"image": image})["image"]
    np.testing.assert_allclose(as_dict.numpy(), as_numpy, atol=1e-4)
    with pytest.raises(ValueError, match="3 L\\*a\\*b\\* means"):
        ReinhardNormalize([1.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="\\(3, H, W\\)"):
        ReinhardNormalize(**TNBC_REF)(image[:1])


def test_reinhard_reference_is_mean_of_per_image_statistics(tnbc, monuseg):
    images = [np.moveaxis(d["image"].numpy().astype(np.uint8), 0, -1) for d in (tnbc, monuseg)]
    ref = reinhard_reference(images)
    per_image = [rgb2lab(im).reshape(-1, 3) for im in images]  # skimage on uint8 scales by 255 itself
    np.testing.assert_allclose(ref["means"], np.mean([p.mean(0) for p in per_image], 0), atol=1e-3)
    np.testing.assert_allclose(ref["stds"], np.mean([p.std(0) for p in per_image], 0), atol=1e-3)
    ReinhardNormalize(**ref)  # ready to use as constructor arguments
    with pytest.raises(ValueError, match="no images"):
        reinhard_reference([])


def test_reinhard_stats_script(tnbc_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import reinhard_stats

    output = tmp_path / "ref.json"
    assert reinhard_stats.main(["--dataset_dir", str(tnbc_dir), "--ids", "01_1,02_1", "--output", str(output)]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = reinhard_reference(read_image(tnbc_dir / "images" / f"{i}.png") for i in ("01_1", "02_1"))
    assert printed == expected == json.loads(output.read_text())
    assert reinhard_stats.main(["--dataset_dir", str(tnbc_dir), "--ids", "99_9"]) == 1
    assert "99_9" in capsys.readouterr().err
    # --fold picks the training part of the grouped split (patients of fold 0's test/val parts are left out)
    from bundle.data.layout import get_datalist

    args = reinhard_stats.argparse.Namespace(
        dataset_dir=str(tnbc_dir), ids=None, split_file=str(tmp_path / "split.json"), fold=0, n_folds=5, seed=42
    )
    paths = reinhard_stats.image_paths(args)
    test_ids = {it["id"] for it in get_datalist(tnbc_dir, 0, "test", tmp_path / "split.json")}
    assert 0 < len(paths) < 50 and not {Path(p).stem for p in paths} & test_ids


# ------------------------------------------------------------------------------------------------ grayscale
def test_grayscale_bt709_equals_skimage_and_bt601_equals_pil(tnbc_dir, tnbc):
    image = tnbc["image"]
    ski = rgb2gray(np.moveaxis(image.numpy(), 0, -1) / 255.0) * 255.0
    out709 = Grayscale("bt709")(image)
    assert isinstance(out709, MetaTensor) and out709.shape == (1, 512, 512) and out709.dtype == torch.float32
    np.testing.assert_allclose(out709.numpy()[0], ski, atol=1e-3)
    pil = np.asarray(Image.open(tnbc_dir / "images" / f"{TNBC_ID}.png").convert("RGB").convert("L"), dtype=np.float32)
    out601 = Grayscale()(image.numpy())
    assert isinstance(out601, np.ndarray)
    assert np.abs(out601[0] - pil).max() <= 0.51  # PIL rounds to uint8
    np.testing.assert_allclose(Grayscale()(image).numpy(), out601, atol=1e-4)  # a tensor gives the same
    with pytest.raises(ValueError, match="weights"):
        Grayscale("bt2020")


def test_intensity_chain_gives_zero_mean_unit_variance(monuseg):
    gray = Grayscale()(monuseg["image"])
    scaled = ScaleIntensityRange(a_min=0, a_max=255, b_min=0, b_max=1, clip=True)(gray)
    assert 0.0 <= float(scaled.min()) and float(scaled.max()) <= 1.0
    out = NormalizeIntensity()(scaled).numpy()
    assert abs(out.mean()) < 1e-4 and abs(out.std() - 1.0) < 1e-3


# ------------------------------------------------------------------------------------------------- resizing
def test_resize_shapes_label_values_and_monai_bicubic(tnbc, tnbc_256, monuseg):
    assert tnbc_256["image"].shape == (3, 256, 256) and tnbc_256["label"].shape == (1, 256, 256)
    assert set(np.unique(tnbc_256["label"].numpy())) <= set(np.unique(tnbc["label"].numpy()))
    big = RESIZE(dict(monuseg))
    lab_in, lab_out = monuseg["label"].numpy()[0], big["label"].numpy()[0]
    assert lab_out.shape == (256, 256) and set(np.unique(lab_out)) <= set(np.unique(lab_in))
    # "nearest-exact" samples pixel centres: out[i, j] = in[floor((i + .5) * s), floor((j + .5) * s)]
    idx = np.floor((np.arange(256) + 0.5) * 1000 / 256).astype(int)
    np.testing.assert_array_equal(lab_out, lab_in[np.ix_(idx, idx)])
    # without anti-aliasing MONAI's bicubic is torch's interpolate(mode="bicubic", align_corners=False)
    plain = Resized("image", (256, 256), mode="bicubic")({"image": tnbc["image"]})["image"]
    ref = torch.nn.functional.interpolate(tnbc["image"].as_tensor()[None], size=(256, 256), mode="bicubic")[0]
    np.testing.assert_allclose(plain.numpy(), ref.numpy(), atol=1e-3)


# -------------------------------------------------------------------------------------------------- targets
def test_nuclei_targets_on_real_labels(tnbc_256, monuseg):
    for label in (tnbc_256["label"], monuseg["label"]):
        target = NucleiTargets()(label)
        ids = label.numpy()[0]
        assert target.shape == (2, *ids.shape) and target.dtype == torch.float32
        np.testing.assert_array_equal(target.numpy()[0], ids > 0)
        np.testing.assert_array_equal(target.numpy()[1], find_boundaries(ids, mode="inner"))
        assert (target.numpy()[1] <= target.numpy()[0]).all()  # inner boundary lies inside the nuclei
        assert 0 < target.numpy()[1].sum() < target.numpy()[0].sum()
    thick = NucleiTargets(mode="thick", connectivity=2)(monuseg["label"].numpy())
    np.testing.assert_array_equal(thick[1], find_boundaries(monuseg["label"].numpy()[0], 2, mode="thick"))


def test_nuclei_targets_separate_touching_instances_by_hand():
    label = np.zeros((1, 8, 12), np.int32)
    label[0, 2:6, 2:6] = 1
    label[0, 2:6, 6:10] = 2  # touches instance 1 along columns 5 | 6
    expected = np.zeros((8, 12), np.float32)
    for c0, c1 in ((2, 5), (6, 9)):  # the 4x4 squares' own outlines
        expected[2, c0 : c1 + 1] = expected[5, c0 : c1 + 1] = 1
        expected[2:6, c0] = expected[2:6, c1] = 1
    inst = NucleiTargets()(label)
    np.testing.assert_array_equal(inst[0], label[0] > 0)
    np.testing.assert_array_equal(inst[1], expected)
    # the same pixels as one binary blob: no boundary between the two nuclei
    binary = NucleiTargets()((label > 0).astype(np.int32))
    assert binary[1][3:5, 5:7].sum() == 0 and inst[1][3:5, 5:7].sum() == 4
    # a label resampled with mode="nearest" is float; ids are rounded back
    as_float = torch.from_numpy(label.astype(np.float32) + 1e-4)
    np.testing.assert_array_equal(NucleiTargets()(as_float).numpy(), inst)
    as_dict = NucleiTargetsd()({"label": torch.from_numpy(label)})["label"]
    np.testing.assert_array_equal(as_dict.numpy(), inst)
    with pytest.raises(ValueError, match="\\(1, H, W\\)"):
        NucleiTargets()(label[0])
    # a nucleus cut by the tile edge has no boundary along the edge
    corner = np.zeros((1, 6, 6), np.int32)
    corner[0, :3, :3] = 1
    ring = np.zeros((6, 6), np.float32)
    ring[:3, 2] = ring[2, :3] = 1
    np.testing.assert_array_equal(NucleiTargets()(corner)[1], ring)


# ----------------------------------------------------------------------------------------------- mask clean
def test_clean_mask_by_hand():
    binary = np.zeros((30, 30), np.int32)
    binary[2:4, 2:4] = 1  # 4-pixel speck -> removed
    binary[10:20, 10:20] = 1
    binary[14, 14] = 0  # 1-pixel hole -> filled
    binary[22:29, 22:29] = 1
    binary[23:28, 23:28] = 0  # 25-pixel hole > max_hole_size -> kept
    out = clean_label_map(binary, min_size=10, max_hole_size=10)
    expected = binary.copy()
    expected[2:4, 2:4] = 0
    expected[14, 14] = 1
    np.testing.assert_array_equal(out, expected)
    # instances: a 4-pixel gap enclosed by two different nuclei is background, not a hole of either
    inst = np.zeros((12, 12), np.int32)
    inst[2:8, 2:5] = 1
    inst[2:8, 7:10] = 2
    inst[2:4, 5:7] = 2
    inst[6:8, 5:7] = 1
    assert ndi.binary_fill_holes(inst > 0)[4:6, 5:7].all()  # the union would fill it
    np.testing.assert_array_equal(clean_label_map(inst, 10, 10), inst)
    inst[4, 3] = 0  # a real hole inside nucleus 1 takes its id
    assert clean_label_map(inst, 10, 10)[4, 3] == 1


def test_clean_mask_on_tnbc(tnbc):
    label = tnbc["label"]
    out = CleanMask(min_size=10, max_hole_size=10)(label)
    assert isinstance(out, MetaTensor) and out.dtype == label.dtype and out.shape == label.shape
    before, after = label.numpy()[0] > 0, out.numpy()[0] > 0
    comps, n = ndi.label(before, structure=np.ones((3, 3)))
    sizes = np.bincount(comps.ravel())[1:]
    comps_after, n_after = ndi.label(after, structure=np.ones((3, 3)))
    assert n_after == n - int((sizes < 10).sum())
    assert np.bincount(comps_after.ravel())[1:].min() >= 10
    assert (after & ~before).sum() <= 10 * n  # only small holes were added
    np.testing.assert_array_equal(CleanMaskd("label")({"label": label})["label"].numpy(), out.numpy())


# -------------------------------------------------------------------------------------------- augmentation
def test_augmentations_keep_image_and_label_aligned(tnbc_256, train_config):
    """Image := its own label (0/1): after the random geometric steps (bilinear vs nearest) they still agree."""
    label = tnbc_256["label"]
    chain = Compose(train_config.get_parsed_content("train#augmentation", instantiate=True))
    changed = 0
    for seed in range(6):
        chain.set_random_state(seed)
        out = chain({"image": (label > 0).float(), "label": label.clone()})
        lab = out["label"].numpy()[0]
        assert set(np.unique(lab)) <= {0, 1}
        agree = ((out["image"].numpy()[0] > 0.5) == (lab > 0)).mean()
        assert agree > 0.97, f"seed {seed}: image and label agree on only {agree:.3f}"
        changed += not np.array_equal(lab, label.numpy()[0])
        target = NucleiTargets()(out["label"])
        assert set(np.unique(target.numpy())) <= {0.0, 1.0}
    assert changed >= 3  # the steps really moved the label


def test_elastic_and_rotation_keep_instance_ids_aligned(monuseg, train_config):
    """With every geometric step forced on, an instance map and its copy as an image (bilinear) stay aligned."""
    small = Resized("label", (256, 256), mode="nearest-exact")({"label": monuseg["label"]})["label"]
    augmentation = train_config.get_parsed_content("train#augmentation", instantiate=True)
    steps = [t for t in augmentation if not isinstance(t, RandAdjustContrastd)]  # the geometric ones
    assert len(steps) == len(augmentation) - 1
    for step in steps:
        step.prob = 1.0
    chain = Compose(steps).set_random_state(3)
    out = chain({"image": (small > 0).float(), "label": small.clone()})
    ids = out["label"].numpy()[0]
    assert set(np.unique(ids)) <= set(np.unique(small.numpy()))
    assert ((out["image"].numpy()[0] > 0.5) == (ids > 0)).mean() > 0.95


# -------------------------------------------------------------------------------------------------- chains
@pytest.mark.parametrize("fixture_dir,sample_id", [("tnbc_dir", TNBC_ID), ("monuseg_dir", MONUSEG_ID)])
def test_full_train_chain(request, fixture_dir, sample_id, train_config, datalist_items):
    """train#preprocessing and validate#preprocessing of configs/train.json on a real tile of its datalists."""
    request.getfixturevalue(fixture_dir)
    item = datalist_items[sample_id]
    channels = input_channels(train_config.get_parsed_content("input_mode"))
    size = tuple(train_config.get_parsed_content("spatial_size"))
    chain = train_config.get_parsed_content("train#preprocessing", instantiate=True).set_random_state(0)
    out = chain(dict(item))
    image, label = out["image"], out["label"]
    assert image.shape == (channels, *size) and image.dtype == torch.float32
    # foreground, boundary, boundary weight (1 for instance labels, 0 for binary masks)
    assert label.shape == (3, *size) and label.dtype == torch.float32
    assert set(np.unique(label[:2].numpy())) <= {0.0, 1.0} and label[0].sum() > 0 and label[1].sum() > 0
    assert (label[1] <= label[0]).all()
    assert set(np.unique(label[2].numpy())) == {1.0 if item["label_kind"] == "instance" else 0.0}
    for c in range(channels):  # per-channel z-score
        assert abs(float(image[c].mean())) < 1e-4 and abs(float(image[c].std(unbiased=False)) - 1) < 1e-3
    assert image.meta["filename_or_obj"] == item["image"]

    evaluated = train_config.get_parsed_content("validate#preprocessing", instantiate=True)(dict(item))
    # the whole tile at the model scale, padded to at least one window
    scale = item["pixel_size"] / train_config.get_parsed_content("model_pixel_size")
    native = read_image(item["image"]).shape[:2]
    expected = tuple(max(round(n * scale), s) for n, s in zip(native, size))
    assert evaluated["image"].shape == (channels, *expected) and evaluated["label"].shape == (3, *expected)
    assert evaluated["image"].meta["filename_or_obj"] == item["image"]

    # the inference engine's input equals this chain's on a whole image: tests/test_tiling.py
    # (test_colour_input_chunks_equal_the_training_chain_on_the_whole_image)


def test_train_chain_order_and_determinism(tnbc_dir, train_config, datalist_items):
    """The chain caches only deterministic steps, draws targets after every random step, and is reproducible."""
    chain = train_config.get_parsed_content("train#preprocessing", instantiate=True)
    names = [type(t).__name__ for t in chain.transforms]
    first_random = next(i for i, t in enumerate(chain.transforms) if isinstance(t, Randomizable))
    base = train_config.get_parsed_content("base_transforms", instantiate=True)
    assert first_random == len(base) and names[:first_random] == [type(t).__name__ for t in base]
    assert names[first_random] == "RandSpatialCropd" and "ReinhardNormalized" in names[:first_random]
    last_random = max(i for i, t in enumerate(chain.transforms) if isinstance(t, Randomizable))
    assert names.index("NucleiTargetsd") > last_random
    validate = train_config.get_parsed_content("validate#preprocessing", instantiate=True)
    assert not any(isinstance(t, Randomizable) for t in validate.transforms)
    item = datalist_items[TNBC_ID]
    a = chain.set_random_state(7)(dict(item))
    b = chain.set_random_state(7)(dict(item))
    for key in ("image", "label"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-5)
