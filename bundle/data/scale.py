"""The scale the network works at: pixel-size checks and the resize of a tile to the model scale.

The network works at a fixed pixel size, the config's ``model_pixel_size``; :data:`MODEL_PIXEL_SIZE`, the functions'
default, is the shipped weights' 0.25 um/px. A tile of pixel size ``p`` is resized by
``p / model_pixel_size`` before the network pass (:class:`ToModelScaled`, the transform of the training chain; the
inference engine computes the same resize chunk by chunk, :mod:`bundle.inference.chunks`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import Resized

from bundle.core.errors import DataError

logger = logging.getLogger(__name__)

#: um/px the shipped weights work at: the functions' default, as ``model_pixel_size`` is the configs'
MODEL_PIXEL_SIZE = 0.25
#: micrometres per pixel assumed for input tiles unless told otherwise (40x scanners: 0.23-0.26)
DEFAULT_PIXEL_SIZE = 0.25


#: micrometres per pixel a scan can have: 0.05 (beyond any optical scanner) .. 5 (about a 2x overview)
PIXEL_SIZE_RANGE = (0.05, 5.0)


def check_pixel_size(pixel_size: float, name: str = "pixel_size") -> float:
    """``pixel_size`` (um/px) if it is in :data:`PIXEL_SIZE_RANGE`, else a one-line :class:`bundle.core.errors.DataError`
    (a ValueError) saying what to give: a magnification typed instead (40, 20) gets the pixel size it means."""
    try:
        value = float(pixel_size)
    except (TypeError, ValueError):
        raise DataError(f"{name}={pixel_size!r} is not a number. Give the size of one pixel in um (0.25 for 40x scans)") from None
    lo, hi = PIXEL_SIZE_RANGE
    if not lo <= value <= hi:  # also NaN
        magnification = {10: 1.0, 20: 0.5, 40: 0.25, 60: 0.17, 80: 0.125}
        if value in magnification:  # a magnification typed where micrometres per pixel belong
            what = f"this looks like a magnification: a {value:g}x scan is about {magnification[value]} um/px, give {name} {magnification[value]}"
        else:
            what = "give the size of one pixel in um, e.g. 0.25 for 40x scans, 0.5 for 20x"
        raise DataError(f"{name}={pixel_size} um/px is outside {lo}..{hi} um/px; {what}")
    return value


def scale_factor(pixel_size: float, model_pixel_size: float = MODEL_PIXEL_SIZE) -> float:
    """Resize factor that brings a tile of ``pixel_size`` um/px to the network's ``model_pixel_size``; both must
    be in :data:`PIXEL_SIZE_RANGE` (:func:`check_pixel_size`)."""
    return check_pixel_size(pixel_size) / check_pixel_size(model_pixel_size, "model_pixel_size")


def model_shape(shape: Sequence[int], factor: float) -> tuple[int, int]:
    """(h, w) of a tile of ``shape`` (..., H, W) resized by ``factor`` (:func:`scale_factor`), as
    :class:`ToModelScaled` resizes it."""
    h, w = shape[-2:]
    return max(1, round(h * factor)), max(1, round(w * factor))


class ToModelScaled(Resized):
    """Resize ``keys`` by ``pixel_size / model_pixel_size`` (anti-aliased bicubic by default); invertible.

    A ``Resized`` whose output size follows each tile's own size, so MONAI's ``Invertd`` maps predictions
    back to the tile's size exactly as it does for any ``Resized``. ``pixel_size_key``: read each item's pixel
    size from that key instead (datalists of several datasets, :func:`bundle.data.datasets.datasets_datalist`).
    """

    def __init__(
        self,
        keys: KeysCollection,
        pixel_size: float = DEFAULT_PIXEL_SIZE,
        model_pixel_size: float = MODEL_PIXEL_SIZE,
        mode: str | Sequence[str] = "bicubic",
        anti_aliasing: bool | Sequence[bool] = True,
        pixel_size_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, spatial_size=(1, 1), mode=mode, anti_aliasing=anti_aliasing, allow_missing_keys=allow_missing_keys)
        self.factor = scale_factor(pixel_size, model_pixel_size)
        self.model_pixel_size = model_pixel_size
        self.pixel_size_key = pixel_size_key

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        key = next(iter(self.key_iterator(d)))
        factor = self.factor
        if self.pixel_size_key is not None:
            factor = scale_factor(float(d[self.pixel_size_key]), self.model_pixel_size)
        # per call: each DataLoader worker owns its copy of the transform, so this is not shared state
        self.resizer.spatial_size = model_shape(d[key].shape, factor)
        return super().__call__(d, lazy=lazy)
