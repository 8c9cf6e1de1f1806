"""bundle.data.channels: network input channels (gray, RGB, hematoxylin) and HED stain jitter, against skimage and
bundle.data.transforms.Grayscale. Other recipe components: test_recipe_components.py, test_recipe_datasets.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.ndimage import gaussian_filter
from skimage.color import hed2rgb, rgb2hed

from bundle.data.channels import (
    ModelInput,
    ModelInputd,
    RandHEDJitterd,
    input_channels,
    rgb_to_hed_unclipped,
)
from bundle.data.transforms import Grayscale

RNG = np.random.default_rng(7)


def rgb_image(h: int = 24, w: int = 20, lo: int = 20, hi: int = 235) -> np.ndarray:
    """(3, H, W) float32 RGB in lo..hi: a smooth colour field plus noise (stain-like, not saturated)."""
    base = gaussian_filter(RNG.random((3, h, w)), (0, 3, 3))
    base = (base - base.min()) / (base.max() - base.min())
    img = lo + (hi - lo) * (0.8 * base + 0.2 * RNG.random((3, h, w)))
    return np.clip(np.round(img), lo, hi).astype(np.float32)


# --- bundle.data.channels -----------------------------------------------------------------------------------------


def test_input_channels():
    assert (input_channels("gray"), input_channels("rgb"), input_channels("hematoxylin")) == (1, 3, 1)
    with pytest.raises(ValueError, match="input mode"):
        input_channels("hed")
    with pytest.raises(ValueError):
        ModelInput("grey")


def reference_input(img: np.ndarray, mode: str) -> np.ndarray:
    if mode == "gray":
        return np.asarray(Grayscale("bt601")(img)) / 255.0
    if mode == "rgb":
        return img / 255.0
    return np.moveaxis(rgb2hed(np.moveaxis(img, 0, -1) / 255.0), -1, 0)[:1]


@pytest.mark.parametrize("mode", ["gray", "rgb", "hematoxylin"])
def test_model_input_matches_references(mode):
    img = rgb_image()
    ref = reference_input(img, mode)
    out = ModelInput(mode)(img)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (input_channels(mode), 24, 20)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    if mode == "hematoxylin":  # the H density is not a rescaled gray: it differs from luma in shape, not only scale
        gray = reference_input(img, "gray")[0]
        assert abs(np.corrcoef(out[0].ravel(), gray.ravel())[0, 1]) < 0.999

    t = ModelInput(mode)(torch.as_tensor(img))
    assert type(t) is torch.Tensor and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), ref, rtol=1e-5, atol=1e-6)

    meta = MetaTensor(torch.as_tensor(img), meta={"filename_or_obj": "x.png"})
    m = ModelInputd("image", mode)({"image": meta, "other": 1})
    assert isinstance(m["image"], MetaTensor) and m["image"].meta["filename_or_obj"] == "x.png" and m["other"] == 1
    np.testing.assert_allclose(m["image"].as_tensor().numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 8, 8), (8, 8, 3)])
def test_model_input_wrong_channel_count_raises(shape):
    with pytest.raises(ValueError, match="RGB"):
        ModelInput("gray")(np.zeros(shape, np.float32))


def test_hed_jitter_identity_up_to_round_trip():
    img = rgb_image(32, 32)
    out = RandHEDJitterd("image", prob=1.0, scale=0.0, shift=0.0)({"image": img})["image"]
    assert out.shape == img.shape and out.dtype == np.float32
    # rgb -> HED -> rgb; before the fix, rgb2hed clipped negative densities and 74 % of these pixels moved (up
    # to 197 grey levels; up to 76 on real H&E tiles)
    np.testing.assert_allclose(out, img, atol=0.01)
    t = RandHEDJitterd("image", prob=1.0, scale=0.0, shift=0.0)({"image": torch.as_tensor(img)})["image"]
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), out, atol=1e-4)


def test_hed_densities_are_rgb2hed_without_its_clipping():
    rgb01 = np.moveaxis(rgb_image(16, 16), 0, -1) / 255.0
    hed = rgb_to_hed_unclipped(rgb01)
    assert (hed < 0).any()  # colours outside the stain cone are in the test image
    np.testing.assert_allclose(np.maximum(hed, 0), rgb2hed(rgb01), atol=1e-12)
    np.testing.assert_allclose(hed2rgb(hed), rgb01, atol=1e-9)


def test_hed_jitter_prob0_returns_input_unchanged():
    img = rgb_image()
    d = {"image": img, "label": np.ones((1, 24, 20))}
    out = RandHEDJitterd("image", prob=0.0, scale=0.5, shift=0.2)(d)
    assert out["image"] is img and out["label"] is d["label"]


def test_hed_jitter_changes_image_and_is_seeded():
    img = rgb_image(32, 32)

    def jitter(seed):
        t = RandHEDJitterd("image", prob=1.0, scale=0.3, shift=0.05)
        t.set_random_state(seed=seed)
        return t({"image": img.copy()})["image"]

    a, b, c = jitter(3), jitter(3), jitter(4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - img).max() > 5.0 and np.abs(a - c).max() > 1.0
    assert a.min() >= 0.0 and a.max() <= 255.0
    with pytest.raises(ValueError):
        RandHEDJitterd("image", scale=-0.1)
