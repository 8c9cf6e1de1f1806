"""What the network sees of an H&E tile: gray, RGB or hematoxylin, and stain augmentation in HED space.

- :class:`ModelInput` / :class:`ModelInputd`: RGB ``(3, H, W)`` 0..255 -> the network's input channels, about
  0..1 before standardisation: ``"gray"`` (the paper's; BT.601 luma / 255, one channel), ``"rgb"`` (/ 255,
  three channels) or ``"hematoxylin"`` (the H optical density of ``skimage.color.rgb2hed``, Ruifrok & Johnston
  colour deconvolution, one channel: the stain that marks nuclei, separated from eosin).
- :class:`RandHEDJitterd`: Tellez et al. 2018 stain augmentation: each of the H, E, D densities scaled by
  ``U(1 - s, 1 + s)`` and shifted by ``U(-b, b)``, then back to RGB (``skimage.color.hed2rgb``), so the network
  sees the stain variation of other labs and scanners.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import convert_to_dst_type
from skimage.color import hed2rgb, hed_from_rgb, rgb2hed

from bundle.data.transforms import LUMA_WEIGHTS

__all__ = ["INPUT_MODES", "input_channels", "rgb_to_input", "ModelInput", "ModelInputd", "RandHEDJitterd"]

#: input mode -> number of channels the network takes
INPUT_MODES = {"gray": 1, "rgb": 3, "hematoxylin": 1}


def input_channels(mode: str) -> int:
    """Channels of the network input for ``mode`` (``in_channels`` of the network)."""
    if mode not in INPUT_MODES:
        raise ValueError(f"input mode must be one of {sorted(INPUT_MODES)}, got {mode!r}")
    return INPUT_MODES[mode]


def rgb_to_input(rgb: np.ndarray, mode: str) -> np.ndarray:
    """(..., 3) RGB 0..255 (any float or uint8 array, clipped to 0..255) -> (..., C) float32 input channels of
    ``mode``, about 0..1."""
    input_channels(mode)
    # clipped: the bicubic resize to model scale overshoots 0..255 at sharp edges
    x = np.clip(np.asarray(rgb, dtype=np.float32) / np.float32(255.0), 0.0, 1.0)
    if mode == "rgb":
        return x
    if mode == "gray":
        return (x @ np.asarray(LUMA_WEIGHTS["bt601"], np.float32))[..., None]
    return rgb2hed(x)[..., :1].astype(np.float32)


class ModelInput(Transform):
    """RGB ``(3, H, W)`` 0..255 -> ``(C, H, W)`` float32 input channels of ``mode`` (see :func:`rgb_to_input`)."""

    def __init__(self, mode: str = "gray") -> None:
        input_channels(mode)
        self.mode = mode

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        if img.shape[0] != 3:
            raise ValueError(f"ModelInput expects an RGB (3, H, W) image, got shape {tuple(img.shape)}")
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        out = np.moveaxis(rgb_to_input(np.moveaxis(arr, 0, -1), self.mode), -1, 0)
        return convert_to_dst_type(np.ascontiguousarray(out), img, dtype=torch.float32 if isinstance(img, torch.Tensor) else np.float32)[0]


class ModelInputd(MapTransform):
    """Dictionary form of :class:`ModelInput`."""

    def __init__(self, keys: KeysCollection, mode: str = "gray", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convert = ModelInput(mode)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d


def rgb_to_hed_unclipped(rgb01: np.ndarray) -> np.ndarray:
    """(..., 3) RGB 0..1 -> HED optical densities as ``skimage.color.rgb2hed`` computes them, without its clipping
    of negative densities to 0, so that ``hed2rgb`` gives the colour back: H&E tiles have many pixels outside the
    stain cone (negative DAB density), which the clipping shifted by up to ~70 grey levels at zero jitter."""
    return (np.log(np.maximum(rgb01, 1e-6)) / np.log(1e-6)) @ hed_from_rgb


class RandHEDJitterd(RandomizableTransform, MapTransform):
    """With probability ``prob``: RGB 0..255 -> HED optical densities, ``hed * U(1-scale, 1+scale) + U(-shift,
    shift)`` per stain, -> RGB 0..255 (Tellez et al. 2018). Apply to the RGB image before :class:`ModelInputd`."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, scale: float = 0.05, shift: float = 0.02,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if scale < 0 or shift < 0:
            raise ValueError(f"RandHEDJitterd: scale and shift must be >= 0, got {scale}, {shift}")
        self.scale, self.shift = float(scale), float(shift)
        self._alpha = np.ones(3)
        self._beta = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._alpha = self.R.uniform(1 - self.scale, 1 + self.scale, 3)
        self._beta = self.R.uniform(-self.shift, self.shift, 3)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
            hed = rgb_to_hed_unclipped(np.clip(np.moveaxis(arr, 0, -1) / 255.0, 0.0, 1.0))
            rgb = hed2rgb(hed * self._alpha + self._beta)
            out = np.moveaxis(np.clip(rgb, 0.0, 1.0) * 255.0, -1, 0).astype(np.float32)
            d[key] = convert_to_dst_type(np.ascontiguousarray(out), img)[0]
        return d
